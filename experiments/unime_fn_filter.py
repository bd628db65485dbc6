"""Does UniME's false-negative filter help when captions repeat? Filter on vs off, same seeds, data and steps.

    python experiments/unime_fn_filter.py [--steps 300] [--seeds 0 1]

World: single-object scenes over 4 colours x 4 shapes, one size, plain texture, no words or clutter, so there are
only 16 distinct short captions and a batch of 32 holds each caption about twice (a caption's repeat is an exact
false negative of its image). Each arm trains the ``tiny-smoke`` model from scratch with loss ``unime`` (k = 8 hard
negatives, temperature 0.02); the arms differ only in ``margin``:

* ``off``: ``margin = inf`` (no candidate is filtered);
* ``code``: ``margin = 0.1``, the official code's filter (drop ``S_ij > S_ii + 0.1``);
* ``below``: ``margin = -0.1``, the issue's wording (drop candidates above the positive's similarity minus 0.1),
  which also drops exact repeats (their score equals the positive's);
* ``ties``: ``margin = -1e-4``, a diagnostic: drops (almost) only the exact repeats and anything above the positive.

Metric: on 320 held-out scenes (world seed 1), image -> caption accuracy among the 16 captions. Numbers go to
``experiments/results/unime_fn_filter.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from cliplab.data.synthetic import SceneWorld
from cliplab.train import Trainer, get_preset

WORLD = dict(max_objects=1, colours=["red", "blue", "green", "yellow"], shapes=["circle", "square", "triangle", "star"],
             sizes=["medium"], textures=["plain"], word_prob=0.0, clutter_prob=0.0)
ARMS = {"off": math.inf, "code": 0.1, "below": -0.1, "ties": -1e-4}
OUT = Path(__file__).parent / "results" / "unime_fn_filter.json"


def train_arm(margin: float, seed: int, steps: int, out_dir: str):
    cfg = get_preset("unime-tiny").replace(
        loss_kwargs={"k": 8, "margin": margin, "temperature": 0.02}, steps=steps, seed=seed,
        log_every=max(1, steps // 10), checkpoint_every=0, keep_checkpoints=0, progress=False, out_dir=out_dir)
    cfg.data.options = {"world": WORLD}
    result = Trainer(cfg).fit()
    filtered = [r.get("filtered") for r in result.records if "filtered" in r]
    return result.model, filtered


@torch.no_grad()
def caption_accuracy(model, n: int = 320) -> float:
    world = SceneWorld(64, seed=1, **WORLD)
    scenes = [world.sample(i) for i in range(n)]
    train_world = SceneWorld(64, seed=0, **WORLD)
    captions = sorted({s.short_caption for s in scenes} | {train_world.sample(i).short_caption for i in range(400)})
    model.eval()
    img = model.encode_images([s.render() for s in scenes], normalize=True)
    txt = model.encode_texts(captions, normalize=True)
    truth = torch.tensor([captions.index(s.short_caption) for s in scenes])
    return float(((img @ txt.t()).argmax(1) == truth).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    torch.set_num_threads(1)
    res = {"world": WORLD, "steps": args.steps, "batch_size": 32, "k": 8, "temperature": 0.02, "arms": {}}
    t0 = time.perf_counter()
    for name, margin in ARMS.items():
        arm = res["arms"][name] = {"margin": margin if math.isfinite(margin) else "inf", "accuracy": [],
                                   "filtered_share": []}
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as d:
                model, filtered = train_arm(margin, seed, args.steps, d)
            arm["accuracy"].append(round(caption_accuracy(model), 4))
            arm["filtered_share"].append(round(sum(filtered) / max(1, len(filtered)), 4))
            print(name, seed, arm["accuracy"][-1], arm["filtered_share"][-1], f"{time.perf_counter() - t0:.0f}s",
                  flush=True)
        arm["mean_accuracy"] = round(sum(arm["accuracy"]) / len(arm["accuracy"]), 4)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
