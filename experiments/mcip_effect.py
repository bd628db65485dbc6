"""MCIP / 2SFT on the shipped model: near-duplicate image retrieval against text search and zero-shot.

Arms, all from ``shapes-tiny`` with the same seed, data (``mcip-views``), steps, batch and rate:

* ``start``: the shipped model (the control);
* ``arcmargin``: stage 1 only (retrieval-only fine-tuning: the paper's "misaligned" arm);
* ``2sft``: stage 1, then ``realign_steps`` of CLIP's loss on the text tower (image tower frozen);
* ``mcip``: ArcMargin + MCArcMargin (pseudo-captions), one stage.

Writes ``experiments/results/mcip_effect.json`` and ``docs/img/mcip_effect.png``::

    python experiments/mcip_effect.py --steps 60 --realign-steps 60 --lr 3e-4
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

import cliplab
from cliplab.objectives.mcip import (evaluate_mcip, mcip_config, mcip_finetune, near_duplicate_benchmark, run_stage,
                                     two_stage_finetune)

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--realign-steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--realign-lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-classes", type=int, default=128)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--siblings", type=int, default=4)
    ap.add_argument("--arms", default="start,arcmargin,2sft,mcip")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "mcip_effect.json"))
    ap.add_argument("--figure", default=str(ROOT / "docs" / "img" / "mcip_effect.png"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    bench = near_duplicate_benchmark()
    opts = dict(steps=args.steps, lr=args.lr, batch_size=args.batch_size, num_classes=args.num_classes,
                views=args.views, siblings=args.siblings, threads=args.threads)
    results: dict[str, dict] = {}
    tmp = tempfile.mkdtemp(prefix="mcip_effect_")  # the runs' checkpoints are not kept
    for arm in args.arms.split(","):
        model = cliplab.load("shapes-tiny")
        t0 = time.time()
        run = Path(tmp) / arm
        if arm == "arcmargin":
            run_stage(model, mcip_config("arcmargin", out_dir=str(run), init_from=None, **opts))
        elif arm == "2sft":
            two_stage_finetune(model, realign_steps=args.realign_steps, realign_lr=args.realign_lr,
                               out_dir=str(run), **opts)
        elif arm == "mcip":
            mcip_finetune(model, out_dir=str(run), **opts)
        elif arm != "start":
            raise SystemExit(f"unknown arm {arm!r}")
        train_s = time.time() - t0
        results[arm] = {**evaluate_mcip(model, bench), "train_s_under_load": round(train_s, 1)}
        print(arm, json.dumps(results[arm]), flush=True)
    shutil.rmtree(tmp, ignore_errors=True)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": vars(args), "benchmark": {"n_scenes": 60, "views": 3,
                                          "distractors": 2, "seed": 2026}, "results": results}, indent=2) + "\n")
    figure(results, args.figure)


def figure(results: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("i2i_mAP", "near-dup. mAP"), ("i2i_R@1", "near-dup. R@1"), ("t2i_R@1", "text->image R@1"),
               ("zs_shape", "zero-shot shape")]
    arms = list(results)
    fig, ax = plt.subplots(figsize=(6.4, 2.8), dpi=100)
    width = 0.8 / len(arms)
    for k, arm in enumerate(arms):
        ax.bar([i + k * width for i in range(len(metrics))], [results[arm][m] for m, _ in metrics], width,
               label=arm)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(metrics))], [name for _, name in metrics])
    ax.set_ylim(0.5, 1.0)
    ax.legend(fontsize=7, ncol=len(arms))
    ax.set_title("MCIP / 2SFT from shapes-tiny (held-out synthetic scenes)", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    main()
