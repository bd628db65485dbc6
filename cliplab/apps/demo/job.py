"""The demo job: synthetic gallery -> embed -> index -> text and image queries -> zero-shot -> HTML report.

Everything runs offline on the shipped default model (``shapes-tiny``) in well under a minute on a laptop CPU.
Any other model can be swapped in (``model=``); with random weights (e.g. ``test-tiny``) the machinery runs the
same, and the report says that its numbers are chance level.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["run_demo", "DemoResult", "TEXT_QUERIES"]

#: example text queries, in the caption grammar of the synthetic world
TEXT_QUERIES = [
    "a large red circle",
    "a small blue square",
    "two green stars",
    "a yellow triangle to the left of a purple ring",
    "a medium orange dotted hexagon",
    'a pink cross, and the word "cat"',
]


@dataclass
class DemoResult:
    out_dir: Path
    report: Path
    summary: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict, repr=False)


def _retrieval_metrics(img: np.ndarray, txt: np.ndarray, ks=(1, 5, 10)) -> dict[str, Any]:
    """Caption i describes image i: recall@k both ways (ranks from the evaluation harness, so ties are broken the
    same way as in ``cliplab eval``), and the cosine of matching vs other pairs."""
    import torch

    from ...eval.metrics import retrieval_ranks

    sims = txt @ img.T  # [captions, images]
    n = len(sims)
    diag = np.diag(sims)
    i2t, t2i = retrieval_ranks(torch.from_numpy(sims.T.copy()), torch.arange(n))
    i2t_rank, t2i_rank = i2t.numpy(), t2i.numpy()
    out = {"n": n}
    for k in ks:
        out[f"text_to_image_r@{k}"] = float((t2i_rank < k).mean())
        out[f"image_to_text_r@{k}"] = float((i2t_rank < k).mean())
    off = sims[~np.eye(n, dtype=bool)]
    out["mean_cos_match"] = float(diag.mean())
    out["mean_cos_other"] = float(off.mean())
    curves = {"k": list(range(1, 11)),
              "text_to_image": [float((t2i_rank < k).mean()) for k in range(1, 11)],
              "image_to_text": [float((i2t_rank < k).mean()) for k in range(1, 11)]}
    rng = np.random.default_rng(0)
    sample = off if len(off) <= 20000 else rng.choice(off, 20000, replace=False)
    return out | {"_curves": curves, "_match": diag, "_other": sample}


def _zero_shot(model, kind: str, n_per_class: int, seed: int, size: int) -> dict[str, Any]:
    import torch

    from ...data.synthetic import zero_shot_task
    from ...zeroshot import ZeroShotClassifier

    task = zero_shot_task(kind, n_per_class=n_per_class, seed=seed, image_size=size)
    clf = ZeroShotClassifier.from_prompts(model, task.prompts, task.classnames)
    with torch.inference_mode():
        feats = model.encode_images(task.images, batch_size=128)
    pred = clf.predict(feats).argmax(dim=-1).numpy()
    labels = np.asarray(task.labels)
    c = len(task.classnames)
    confusion = np.zeros((c, c), dtype=int)
    np.add.at(confusion, (labels, pred), 1)
    examples = [{"image": task.images[i], "label": task.classnames[labels[i]], "pred": task.classnames[pred[i]]}
                for i in range(0, len(labels), max(1, n_per_class))]
    return {"kind": kind, "classes": task.classnames, "n": int(len(labels)), "accuracy": float((pred == labels).mean()),
            "chance": 1.0 / c, "prompts_per_class": len(task.prompts[0]), "confusion": confusion.tolist(),
            "_examples": examples}


def run_demo(model=None, out_dir: str | Path = "cliplab-demo", *, n: int = 500, seed: int = 0, k: int = 5,
             n_per_class: int = 12, progress: bool | None = None, image_size: int = 64) -> DemoResult:
    """Run the whole demo and write ``out_dir/report.html`` (+ ``summary.json``, the embeddings and the index).

    ``model``: ``None`` for the shipped default (``shapes-tiny``), or any name/path/``CLIP`` (see
    :func:`cliplab.pipeline.resolve_model`)."""
    import torch

    from ...data.synthetic import SceneWorld
    from ...index import Index
    from ...pipeline import EmbedJob, SyntheticSource, read_embeddings
    from .report import write_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    # 1. gallery -> embeddings
    t = time.perf_counter()
    source = SyntheticSource(n, seed=seed, size=image_size)
    job = EmbedJob(source, out / "embeddings", model, overwrite=True, shard_size=max(1, min(1000, n)),
                   batch_size=128, progress=progress)
    res = job.run()
    net = job.model
    timings["embed"] = time.perf_counter() - t
    emb = read_embeddings(out / "embeddings")

    # 2. index
    t = time.perf_counter()
    index = Index.build(emb, field="image", model=net)
    index.save(out / "embeddings" / "index")
    timings["index"] = time.perf_counter() - t

    # 3. queries
    t = time.perf_counter()
    world = SceneWorld(image_size=image_size, seed=seed)
    text_results = []
    held_out = [world.sample(n + 1000 + j) for j in range(2)]
    queries = TEXT_QUERIES + [s.short_caption for s in held_out]
    for q, hits in zip(queries, index.search_text(queries, k=k, model=net)):
        text_results.append({"query": q, "hits": [h.to_dict() for h in hits]})
    image_results = []
    query_scenes = [world.sample(n + 2000 + j) for j in range(3)]
    hits_all = index.search_image([s.render() for s in query_scenes], k=k, model=net)
    for s, hits in zip(query_scenes, hits_all):
        image_results.append({"query_caption": s.short_caption, "query_image": s.render(),
                              "hits": [h.to_dict() for h in hits]})
    timings["queries"] = time.perf_counter() - t

    # 4. retrieval quality on the gallery's own captions, and zero-shot colour/shape
    t = time.perf_counter()
    retrieval = _retrieval_metrics(emb.image, emb.text)
    zs = [_zero_shot(net, kind, n_per_class, seed, image_size) for kind in ("colour", "shape")]
    timings["evaluate"] = time.perf_counter() - t

    own_top5 = 0
    for q in range(min(200, n)):
        hits = index.search(emb.text[q], k=5)
        own_top5 += any(h.id == emb.ids[q] for h in hits)
    info = res.manifest["model"]
    random_weights = info.get("kind") == "random"
    summary = {
        "model": info["name"], "model_source": info.get("source"), "random_weights": random_weights,
        "gallery": n, "seed": seed, "rows": res.rows, "rejects": res.rejects,
        "embed_items_per_s": round(n / max(timings["embed"], 1e-9), 1),
        "index": {"kind": index.kind, "n": len(index), "dim": index.dim, "recall_at_10": index.recall_at_10},
        "retrieval": {kk: round(v, 4) for kk, v in retrieval.items() if not kk.startswith("_")},
        "caption_finds_own_scene_top5": round(own_top5 / max(1, min(200, n)), 4),
        "zero_shot": {z["kind"]: {"accuracy": round(z["accuracy"], 4), "chance": round(z["chance"], 4),
                                  "n": z["n"]} for z in zs},
        "text_queries": [{"query": r["query"], "top": [h["caption"] for h in r["hits"][:3]]} for r in text_results],
        "timings_s": {kk: round(v, 2) for kk, v in timings.items()},
        "torch_threads": torch.get_num_threads(),
    }
    details = {"text_results": text_results, "image_results": image_results, "retrieval": retrieval, "zero_shot": zs,
               "source": source, "manifest": res.manifest, "index_info": index.info}
    t = time.perf_counter()
    report = write_report(out / "report.html", summary, details)
    timings["report"] = time.perf_counter() - t
    summary["timings_s"]["report"] = round(timings["report"], 2)
    summary["timings_s"]["total"] = round(time.perf_counter() - t_all, 2)
    summary["report"] = str(report)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return DemoResult(out, report, summary, details)
