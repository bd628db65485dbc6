"""READ's Similarity-as-Points against the single argmax point: the same shipped point segmenter, the same maps
from the shipped model, held-out synthetic scenes (world seed 1).

For every scene and every class present in it (labels by colour, then by shape), the query is the class name; the
mask predicted from the points is scored by IoU against that class's pixels. Arms differ only in the prompts:
``sasp`` (READ's rule: up to 30 positive / negative / neutral points from the min-max normalised map) or ``argmax``
(one positive point at the best cell). Also written: the figure docs/img/read_sasp.png (image, map overlaid,
points, masks).

    python experiments/read_sasp_effect.py [--scenes 300]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import cliplab
from cliplab.data.synthetic import SceneWorld
from cliplab.dense import SyntheticSegmentation
from cliplab.dense.promptable import PointSegmenter
from cliplab.dense.read_sasp import read_sasp_segment

ROOT = Path(__file__).resolve().parents[1]
SEGMENTER = ROOT / "cliplab" / "dense" / "pretrained" / "point-seg-64"


def mean_iou(model, segmenter, data, method: str, prompts: str) -> tuple[float, int]:
    ious = []
    for sample in data:
        present = [k for k in np.unique(sample.label) if k != 0]
        if not present:
            continue
        names = [sample.classes[k] for k in present]
        out = read_sasp_segment(model, segmenter, [sample.image], names, method=method, prompts=prompts)
        for j, k in enumerate(present):
            pred = out.masks[0, j].numpy()
            target = sample.label == k
            ious.append((pred & target).sum() / max(1, (pred | target).sum()))
    return float(np.mean(ious)), len(ious)


def figure(model, segmenter, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    data = SyntheticSegmentation(SceneWorld(image_size=64, seed=1), n=3, by="shape")
    fig, axes = plt.subplots(3, 3, figsize=(7.5, 7.5))
    for row, sample in enumerate(data):
        k = int([c for c in np.unique(sample.label) if c != 0][0])
        name = sample.classes[k]
        out = {p: read_sasp_segment(model, segmenter, [sample.image], [name], method="sclip", prompts=p)
               for p in ("sasp", "argmax")}
        grid = out["sasp"].maps[0, 0]
        full = F.interpolate(grid[None, None], size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
        axes[row, 0].imshow(sample.image)
        axes[row, 0].imshow(full, cmap="jet", alpha=0.5)
        pts, lab = out["sasp"].points[0][0], out["sasp"].labels[0][0]
        for colour, value in (("lime", 1), ("red", 0)):
            sel = lab == value
            axes[row, 0].scatter(pts[sel, 0], pts[sel, 1], s=12, c=colour, edgecolors="black", linewidths=0.4)
        axes[row, 0].set_title(f'"{name}": map + SasP points', fontsize=8)
        for col, p in ((1, "sasp"), (2, "argmax")):
            mask = out[p].masks[0, 0].numpy()
            target = sample.label == k
            iou = (mask & target).sum() / max(1, (mask | target).sum())
            axes[row, col].imshow(sample.image)
            axes[row, col].imshow(np.ma.masked_where(~mask, mask), cmap="autumn", alpha=0.6)
            axes[row, col].contour(target, levels=[0.5], colors="white", linewidths=0.8)
            axes[row, col].set_title(f"mask from {p} points (IoU {iou:.2f})", fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle("READ SasP on shapes-tiny (sclip maps): green positive, red negative points; white = truth",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenes", type=int, default=300)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "read_sasp-2026-12-07.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    model = cliplab.load("shapes-tiny").eval()
    segmenter = PointSegmenter.load(SEGMENTER).eval()
    results = {"model": "shapes-tiny", "segmenter": "point-seg-64", "scenes": args.scenes, "world_seed": 1,
               "arms": {}}
    for by in ("colour", "shape"):
        data = SyntheticSegmentation(SceneWorld(image_size=64, seed=1), n=args.scenes, by=by)
        for method in ("naive", "sclip"):
            for prompts in ("sasp", "argmax"):
                iou, n = mean_iou(model, segmenter, data, method, prompts)
                results["arms"][f"{by}/{method}/{prompts}"] = {"mean_iou": iou, "queries": n}
                print(f"{by:6} {method:6} {prompts:6} mean IoU {iou:.3f} over {n} queries", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    figure(model, segmenter, ROOT / "docs" / "img" / "read_sasp.png")


if __name__ == "__main__":
    main()
