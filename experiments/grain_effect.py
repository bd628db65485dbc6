"""GRAIN against the CLIP-only control on part-defined classes (docs/methods/grain.md).

Two tiny models from scratch, same data, steps and seed: CLIP loss only (control) and GRAIN (CLIP + box + region-
description losses). Each is evaluated with plain class-name prompts and with description-ensemble prompts on
classes with opaque names defined by two parts ("a zorp" = a red circle and a blue square), and its box head's mean
IoU (Hungarian-matched) on held-out scenes. Writes experiments/results/grain.json and docs/img/grain_effect.png.

    python experiments/grain_effect.py --steps 500 --seeds 0 1 2                      # results/grain.json
    python experiments/grain_effect.py --steps 300 --seeds 0 1 2 --caption no-colour \
        --parts "red circle,blue circle,green square,yellow square" --name grain_no_colour
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from cliplab.data.synthetic import SceneWorld
from cliplab.zeroshot import grain as G

ROOT = Path(__file__).resolve().parents[1]


def run(steps: int, seed: int, n_per_class: int, heldout: int, caption: str, parts) -> dict:
    torch.set_num_threads(1)
    cfg = G.GrainConfig(steps=steps, seed=seed, caption=caption)
    data = G.build_grain_data(cfg.train_scenes, SceneWorld(64, seed=cfg.world_seed), caption=caption)
    held = G.build_grain_data(heldout, SceneWorld(64, seed=cfg.world_seed), offset=1_000_000)
    task = G.part_class_task(n_per_class=n_per_class, parts=parts)
    out = {"seed": seed, "arms": {}}
    for arm, arm_cfg in (("control", cfg.control()), ("grain", cfg)):
        model, hist = G.train_grain(arm_cfg, data=data, log_every=50)
        plain = G.zero_shot_accuracy(model, task, descriptions=False)
        desc = G.zero_shot_accuracy(model, task, descriptions=True)
        out["arms"][arm] = {
            "config": asdict(arm_cfg), "train_seconds": round(hist.seconds, 1),
            "first_losses": {k: hist.mean(k, first=20) for k in hist.terms[0]},
            "last_losses": {k: hist.mean(k, last=20) for k in hist.terms[0]},
            "zero_shot_plain": plain, "zero_shot_descriptions": desc, "description_gain": desc - plain,
            "box_mean_iou_heldout": G.box_mean_iou(model, held),
        }
        print(arm, json.dumps(out["arms"][arm]["last_losses"]), f"plain {plain:.3f} desc {desc:.3f}",
              f"iou {out['arms'][arm]['box_mean_iou_heldout']:.3f}", flush=True)
        if arm == "grain":
            out["_model"] = model
    return out


def figure(results: dict, model, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from cliplab.zeroshot.matching import box_cxcywh_to_xyxy

    fig, axes = plt.subplots(1, 4, figsize=(11, 2.8), gridspec_kw={"width_ratios": [2, 1, 1, 1]})
    arms = ["control", "grain"]
    seeds = results["runs"]
    for k, (key, label) in enumerate((("zero_shot_plain", "class name"), ("zero_shot_descriptions", "descriptions"))):
        vals = [sum(r["arms"][a][key] for r in seeds) / len(seeds) for a in arms]
        axes[0].bar([i + 0.38 * k for i in range(2)], vals, width=0.36, label=label)
    axes[0].axhline(1 / 6, color="grey", ls=":", lw=1, label="chance")
    axes[0].set_xticks([0.19, 1.19], ["CLIP loss only", "GRAIN"])
    axes[0].set_ylabel("zero-shot top-1")
    axes[0].legend(fontsize=7)
    world = SceneWorld(64, seed=0)
    for ax, i in zip(axes[1:], range(3)):
        scene = world.sample(1_000_000 + i)
        px = G._pixels([scene.image], 64)
        with torch.no_grad():
            boxes = box_cxcywh_to_xyxy(model(px).boxes[0]) * 64
        ax.imshow(scene.image)
        for x0, y0, x1, y1 in boxes.tolist():
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="white", lw=1))
        for x0, y0, x1, y1 in scene.boxes:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="black", lw=0.8, ls="--"))
        ax.set_axis_off()
    axes[1].set_title("GRAIN boxes (white) vs truth (dashed)", fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--n-per-class", type=int, default=50)
    ap.add_argument("--heldout", type=int, default=300)
    ap.add_argument("--caption", choices=G.CAPTION_MODES, default="short")
    ap.add_argument("--parts", default="red circle,blue square,green triangle,yellow star",
                    help="comma-separated 'colour shape' parts; every pair of them is a class")
    ap.add_argument("--name", default="grain", help="results/<name>.json and docs/img/<name>_effect.png")
    args = ap.parse_args()
    parts = [tuple(p.split()) for p in args.parts.split(",")]
    start = time.time()
    runs = [run(args.steps, s, args.n_per_class, args.heldout, args.caption, parts) for s in args.seeds]
    model = runs[-1].pop("_model")
    for r in runs[:-1]:
        r.pop("_model")
    results = {"steps": args.steps, "seeds": args.seeds, "n_per_class": args.n_per_class, "classes": 6,
               "caption": args.caption, "parts": [" ".join(p) for p in parts],
               "heldout_scenes": args.heldout, "runs": runs, "wall_seconds": round(time.time() - start, 1)}
    for arm in ("control", "grain"):
        results[f"mean_gain_{arm}"] = sum(r["arms"][arm]["description_gain"] for r in runs) / len(runs)
    out = ROOT / "experiments" / "results" / f"{args.name}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    figure(results, model, ROOT / "docs" / "img" / f"{args.name}_effect.png")
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
