"""Bar chart of the CgT-GAN study (R@1 and grammar-parse rate per arm) -> docs/img/cgtgan_study.png.

Reads experiments/results/cgtgan_study_300steps.json (written by experiments/cgtgan_study.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ARMS = [("ground_truth", "ground truth"), ("text_only_init", "text-only init"), ("mle_only", "MLE only"),
        ("cgtgan", "CgT-GAN"), ("reward_only", "reward only")]


def main() -> None:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "experiments" / "results" / "cgtgan_study_300steps.json"
    summary = json.loads(src.read_text())["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
    for ax, metric, title in zip(axes, ("r1", "parse_rate"), ("caption -> image R@1", "grammar-parse rate")):
        vals = [summary[a][metric] for a, _ in ARMS]
        ax.bar(range(len(ARMS)), vals, color=["grey", "lightgrey", "tab:blue", "tab:green", "tab:orange"])
        ax.set_xticks(range(len(ARMS)), [n for _, n in ARMS], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(title, fontsize=9)
        for i, v in enumerate(vals):
            ax.text(i, v + 0.02, f"{v:.2f}", ha="center", fontsize=7)
    fig.suptitle(f"CgT-GAN on shapes-tiny, same steps per arm ({src.name})", fontsize=9)
    fig.tight_layout()
    out = ROOT / "docs" / "img" / "cgtgan_study.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    print(out)


if __name__ == "__main__":
    main()
