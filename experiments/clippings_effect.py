"""CLIPPINGS effect on synthetic records: pooled image+text ARI against image-only, text-only and string matching.

Same records and the same threshold rule for every arm: ``test_ari`` uses the threshold with the best ARI on a
validation split of other entities; ``best_threshold_test_ari`` is the best ARI over thresholds on the test split
itself (how separable the entities are, free of threshold transfer); the trained arms get the same SupCon steps (image tower frozen, text tower trained). Writes
experiments/results/clippings_effect.json.  Run: python experiments/clippings_effect.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

import cliplab
from cliplab.apps import clippings as C
from cliplab.apps.records import make_records

NOISE, EPOCHS, LR = 0.08, 20, 3e-4


def test_ari(model, val, test, image_weight):
    ev = C.pooled_embeddings(model, val.images, val.texts, image_weight).numpy()
    threshold, val_ari = C.tune_threshold(val.labels, ev)
    et = C.pooled_embeddings(model, test.images, test.texts, image_weight).numpy()
    return {"threshold": threshold, "val_ari": val_ari,
            "test_ari": C.adjusted_rand_index(test.labels, C.cluster(et, threshold)),
            "best_threshold_test_ari": C.tune_threshold(test.labels, et)[1]}


def main():
    torch.set_num_threads(1)
    base = cliplab.load("shapes-tiny")
    runs = []
    for seed in (0, 1):
        train = make_records(48, 4, seed=10 + seed, noise=NOISE)
        val = make_records(16, 4, seed=20 + seed, noise=NOISE)
        test = make_records(24, 4, seed=30 + seed, noise=NOISE)
        row = {"seed": seed}
        t0 = time.time()
        for arm, w, hard in (("pooled", 0.5, True), ("pooled_no_hard_negatives", 0.5, False), ("text_only", 0.0, True)):
            model, hist = C.train_linker(base, train.images, train.texts, train.labels, image_weight=w, epochs=EPOCHS,
                                         lr=LR, seed=seed, hard_negatives=hard, freeze_image=True)
            row[arm] = {**test_ari(model, val, test, w), "final_loss": hist[-1]}
        row["image_only"] = test_ari(base, val, test, 1.0)  # frozen tower: nothing for SupCon to train
        row["pooled_untrained"] = test_ari(base, val, test, 0.5)
        th, val_ari = C.tune_threshold(val.labels, distances=C.string_match_distances(val.texts))
        row["string_match"] = {"threshold": th, "val_ari": val_ari, "test_ari": C.adjusted_rand_index(
            test.labels, C.string_match_clusters(test.texts, th)),
            "best_threshold_test_ari": C.tune_threshold(test.labels, distances=C.string_match_distances(test.texts))[1]}
        row["seconds_under_load"] = round(time.time() - t0, 1)
        runs.append(row)
        print(json.dumps(row), flush=True)
        Path("experiments/results/clippings_effect.json").write_text(json.dumps({"partial": runs}, indent=2))
    arms = [k for k in runs[0] if isinstance(runs[0][k], dict)]
    summary = {a: {k: float(np.mean([r[a][k] for r in runs])) for k in ("test_ari", "best_threshold_test_ari")}
               for a in arms}
    out = {"setup": {"model": "shapes-tiny", "noise": NOISE, "epochs": EPOCHS, "lr": LR, "train_entities": 48,
                     "val_entities": 16, "test_entities": 24, "records_per_entity": 4, "batch_size": 24, "m": 3,
                     "k_hard": 3, "temperature": 0.1, "clustering": "DBSCAN(min_samples=1), cosine"},
           "mean_test_ari": summary, "runs": runs}
    Path("experiments/results/clippings_effect.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
