"""The training-free dense baselines on the shipped model: naive / MaskCLIP / SCLIP similarity maps -> segmentation,
scored on held-out synthetic scenes (world seed 1; shapes-tiny trained on seed 0's) labelled by shape and by colour.

    python experiments/dense_baselines.py [--n 500]

Writes ``experiments/results/dense_baselines-2026-12-07.json`` and the figure ``docs/img/dense_baselines.png``
(rows: methods; columns: the image, the true class's similarity map over it, the predicted mask, the true mask).
The numbers are the table of ``docs/dense.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import cliplab
from cliplab.data.synthetic import SceneWorld
from cliplab.dense import (METHODS, SyntheticSegmentation, evaluate_segmentation, label_features, overlay_image,
                           segment, similarity_maps)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "dense_baselines-2026-12-07.json"
FIGURE = ROOT / "docs" / "img" / "dense_baselines.png"
TEMPLATES = "generic"


def table(model, n: int) -> list[dict]:
    rows = []
    for by in ("shape", "colour"):
        data = SyntheticSegmentation(SceneWorld(image_size=64, seed=1), n=n, by=by)
        for method in METHODS:
            t0 = time.perf_counter()
            res = evaluate_segmentation(model, data, method=method, templates=TEMPLATES)
            res.update(by=by, seconds=round(time.perf_counter() - t0, 1))
            rows.append(res)
            print(f"{by:6s} {method:8s} mIoU {100 * res['miou']:5.1f}  fg mIoU {100 * res['miou_foreground']:5.1f}  "
                  f"pixel acc {100 * res['pixel_acc']:5.1f}  ({res['seconds']} s)", flush=True)
    return rows


def chance(n: int) -> dict:
    """Reference points: every pixel background; and the pixel share of the background (what it scores)."""
    data = SyntheticSegmentation(SceneWorld(image_size=64, seed=1), n=n, by="shape")
    bg = float(np.mean([(s.label == 0).mean() for s in data]))
    return {"all_background_pixel_acc": bg, "all_background_miou_with_background": bg / len(data.classes)}


def figure(model, index: int = 7, by: str = "shape") -> None:
    data = SyntheticSegmentation(SceneWorld(image_size=64, seed=1), n=index + 1, by=by)
    sample = data[index]
    labels = data.classes[1:]
    present = [int(k) for k in np.unique(sample.label) if k not in (0, 255)]
    target = max(present, key=lambda k: (sample.label == k).sum())  # the largest object's class
    panels = []
    with torch.no_grad():
        pixels = model.preprocessor(sample.image)[None]
        text = label_features(model, [labels[target - 1]], TEMPLATES)
        for method in METHODS:
            heat = similarity_maps(model, pixels, text, method)[0, 0]
            res = segment(model, [sample.image], labels, method=method, templates=TEMPLATES)
            panels.append([
                overlay_image(sample.image, np.zeros_like(sample.label), ["background"], min_side=192),
                overlay_image(sample.image, np.zeros_like(sample.label), ["background"], heat=heat, min_side=192),
                overlay_image(sample.image, res.masks[0], res.labels, areas=res.areas()[0], min_side=192),
                overlay_image(sample.image, np.where(sample.label == 255, 0, sample.label), data.classes,
                              min_side=192)])
    titles = ["image", f"map of '{labels[target - 1]}'", "predicted mask", "true mask"]
    widths = [max(p[c].width for p in panels) for c in range(4)]
    heights = [max(p.height for p in row) for row in panels]
    label_w, head_h = 80, 22
    canvas = Image.new("RGB", (label_w + sum(widths) + 8 * 4, head_h + sum(heights) + 8 * len(panels)), "white")
    draw = ImageDraw.Draw(canvas)
    x = label_w
    for c, title in enumerate(titles):
        draw.text((x + 4, 4), title, fill="black")
        x += widths[c] + 8
    y = head_h
    for method, row in zip(METHODS, panels):
        draw.text((6, y + 80), method, fill="black")
        x = label_w
        for c, panel in enumerate(row):
            canvas.paste(panel, (x, y))
            x += widths[c] + 8
        y += heights[METHODS.index(method)] + 8
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(FIGURE)
    print(f"wrote {FIGURE.relative_to(ROOT)} (scene {index} of world seed 1, by {by})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=500)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = cliplab.load("shapes-tiny").eval()
    rows = table(model, args.n)
    out = {"model": "shapes-tiny", "world_seed": 1, "scenes": args.n, "templates": TEMPLATES,
           "background": "prompt", "reference": chance(args.n), "results": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2), encoding="utf-8")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    figure(model)


if __name__ == "__main__":
    main()
