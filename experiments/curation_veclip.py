"""VeCLIP effect on a synthetic web-like pool: alt-texts name a brand that stands for the main object's colour,
boilerplate, and the shape only sometimes (never a colour word). A tiny CLIP is trained with the same steps and seed
on: the alt-text only; VeC-mixing (alt-text or the fused VeC, 1/2 each); the VeC only; and VeC-mixing with an
identity fuser (the control). Scored by zero-shot colour classification with visual prompts ("a red circle") and
with entity prompts (the brand in alt-text style: "ferrari", "ferrari sale", ...).

    PYTHONPATH=. python experiments/curation_veclip.py [--pool 1500] [--steps 300] [--seeds 0 1]
Writes experiments/results/curation_veclip.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from cliplab.curation.captioners import describe_objects
from cliplab.curation.evaluation import train_on_table, zero_shot_accuracy
from cliplab.curation.pools import BRANDS, web_pool, write_scene_pool
from cliplab.curation.veclip import (ALT_COLUMNS, FUSED_COLUMNS, VEC_COLUMNS, ConceptFuser, IdentityFuser,
                                     SceneGraphCaptioner, enrich_table)
from cliplab.data.synthetic import zero_shot_task
from cliplab.data.synthetic.vocabulary import SHAPES

ENTITY_SUFFIXES = ("", " sale", " official store", " new")


def scores(model, task) -> dict:
    visual = [[describe_objects([{"colour": c, "shape": s}]) for s in SHAPES] for c in task.classnames]
    entity = [[f"{BRANDS[c]}{x}" for x in ENTITY_SUFFIXES] for c in task.classnames]
    return {"visual": zero_shot_accuracy(model, task.images, task.labels, visual),
            "entity": zero_shot_accuracy(model, task.images, task.labels, entity)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default="experiments/results/curation_veclip.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="curation_veclip_"))
    scenes, rows = web_pool(args.pool, seed=0)
    table = write_scene_pool(work, scenes, rows)
    enrich_table(table, work / "vec.parquet", SceneGraphCaptioner(seed=0), ConceptFuser(), progress=False)
    enrich_table(table, work / "vec_identity.parquet", SceneGraphCaptioner(seed=0), IdentityFuser(), progress=False)
    import pyarrow.parquet as pq
    vec_rows = pq.read_table(work / "vec.parquet").to_pylist()
    sample = [{k: r[k] for k in ("caption", "visual_caption", "vec_caption")} for r in vec_rows[:6]]
    task = zero_shot_task("colour", 20, seed=1)
    arms = {"alt_only": ("vec.parquet", ALT_COLUMNS), "vec_mix": ("vec.parquet", VEC_COLUMNS),
            "vec_only": ("vec.parquet", FUSED_COLUMNS), "identity_mix": ("vec_identity.parquet", VEC_COLUMNS)}
    runs = []
    for seed in args.seeds:
        for arm, (name, cols) in arms.items():
            t0 = time.time()
            tr = train_on_table(work / name, work / f"run-{arm}-{seed}", columns=list(cols), steps=args.steps, seed=seed)
            runs.append({"arm": arm, "seed": seed, **scores(tr.model, task), "seconds": time.time() - t0,
                         "losses": [float(x) for x in tr.result.losses[-2:]]})
            print(runs[-1], flush=True)
    summary = {arm: {k: float(np.mean([r[k] for r in runs if r["arm"] == arm])) for k in ("visual", "entity")}
               for arm in arms}
    out = {"pool": args.pool, "steps": args.steps, "seeds": args.seeds, "samples": sample, "runs": runs,
           "summary": summary, "note": "measured under load (2 shared cores)"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
