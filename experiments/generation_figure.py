"""docs/img/generation_samples.png: the shipped generator's samples for held-out prompts of 1, 2 and 3 objects (a row
of clean renders of each prompt above a row of samples), judged.

    python experiments/generation_figure.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cliplab  # noqa: E402
from cliplab.generation import TextConditioner, load_generator, load_judge, save_grid  # noqa: E402
from cliplab.generation.quality import held_out_specs  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    gen, judge = load_generator("scenes-32"), load_judge("scenes-32")
    cond = TextConditioner(cliplab.load("shapes-tiny").float().eval(), space=gen.info.get("space", "final"))
    rows, report = [], {}
    for count in (1, 2, 3):
        specs, clean = held_out_specs(count, 6)
        samples = gen.sample(cond([s.prompt for s in specs]), steps=25, seed=0)
        rows += [clean, samples]
        report[count] = {"prompts": [s.prompt for s in specs], **judge.score(samples, specs, per_image=True)}
    save_grid(torch.cat(rows), ROOT / "docs/img/generation_samples.png", columns=6, scale=3)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
