"""UniME stage 1 on the shipped model: distil all-MiniLM-L6-v2's in-batch similarity distributions into the text tower
of ``shapes-tiny`` on Flickr8k caption pairs (two captions of one photo), against the same pipeline without the
teacher (one-hot targets: in-batch InfoNCE), same seeds, steps, batches and temperature. The metric is the Spearman
correlation between the student's and MiniLM's cosine similarities over all pairs of 200 held-out captions (first
caption of each of the 1000 photos of ``flickr8k-1k``, whose photos are left out of training).

    python experiments/unime_kd_effect.py   # writes experiments/results/unime_kd_effect.json
"""

from __future__ import annotations

import collections
import csv
import json
import statistics
from pathlib import Path

import torch

import cliplab
import cliplab.text as text
from cliplab.objectives.unime import distill_text, teacher_agreement

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "flickr8k-1k"
OUT = ROOT / "experiments" / "results" / "unime_kd_effect.json"
SETTINGS = dict(steps=30, batch_size=32, lr=1e-3)
SEEDS = (0, 1, 2)
TEMPERATURES = (0.1, 0.02)


def flickr_pairs(n_train: int = 600, n_held_out: int = 200):
    held_images = {r["image"] for r in csv.DictReader(open(DATA / "captions.csv"))}
    by_image = collections.defaultdict(list)
    for r in csv.DictReader(open(DATA / "all_captions.csv")):
        by_image[r["image"]].append(r["caption"])
    train = [(c[0], c[1]) for im, c in sorted(by_image.items()) if im not in held_images and len(c) >= 2]
    held_out = [by_image[im][0] for im in sorted(held_images)]
    return train[:n_train], held_out[:n_held_out]


def main() -> None:
    torch.set_num_threads(1)
    train, held_out = flickr_pairs()
    queries, positives = [a for a, _ in train], [b for _, b in train]
    teacher = text.load_embedder("all-MiniLM-L6-v2")
    start = teacher_agreement(cliplab.load("shapes-tiny").float(), teacher, held_out)
    runs = []
    for temperature in TEMPERATURES:
        for seed in SEEDS:
            row = {"temperature": temperature, "seed": seed}
            for arm, t in (("kd", teacher), ("control", None)):
                model = cliplab.load("shapes-tiny").float()
                distill_text(model, t, queries, positives, temperature=temperature, seed=seed, **SETTINGS)
                row[arm] = round(teacher_agreement(model, teacher, held_out), 4)
            runs.append(row)
            print(row, flush=True)
    summary = {str(t): {arm: round(statistics.mean(r[arm] for r in runs if r["temperature"] == t), 4)
                        for arm in ("kd", "control")} for t in TEMPERATURES}
    OUT.write_text(json.dumps({"start": round(start, 4), "settings": SETTINGS, "n_train_pairs": len(train),
                               "n_held_out": len(held_out), "runs": runs, "mean": summary}, indent=2) + "\n")
    print(start, summary)


if __name__ == "__main__":
    main()
