"""LLM2CLIP stage 1 on real captions: CRA (caption retrieval accuracy) of held-out Flickr8k captions, raw LLM with mean
pooling vs the same LLM after caption-contrastive tuning of its last blocks (same captions, cached states).

    python experiments/llm2clip_stage1.py --model smollm2-135m --train-photos 150 --test-photos 100

Writes experiments/results/llm2clip_stage1_<model>.json. Needs ../shared/data/flickr8k-1k.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

import cliplab.text as text
from cliplab.longtext.llm2clip import cache_hidden_states, caption_retrieval_accuracy, tune_last_layers

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ROOT.parent / "shared" / "data" / "flickr8k-1k" / "captions.csv"


def flickr_captions(photos: int, offset: int = 0) -> tuple[list[str], list[str]]:
    """Captions and photo ids of ``photos`` photos (in file order, after ``offset`` photos)."""
    by_photo: dict[str, list[str]] = {}
    with open(CAPTIONS, newline="") as f:
        for row in csv.DictReader(f):
            by_photo.setdefault(row["image"], []).append(row["caption"].strip())
    names = list(by_photo)[offset: offset + photos]
    texts = [c for n in names for c in by_photo[n]]
    ids = [n for n in names for _ in by_photo[n]]
    return texts, ids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--train-photos", type=int, default=150)
    ap.add_argument("--test-photos", type=int, default=100)
    ap.add_argument("--tune-layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    emb = text.load_embedder(args.model)
    train_t, train_i = flickr_captions(args.train_photos)
    test_t, test_i = flickr_captions(args.test_photos, offset=args.train_photos)
    start = len(emb.model.blocks) - args.tune_layers
    # the frozen blocks run once per caption; both arms read these cached states
    states = cache_hidden_states(emb, train_t + test_t, start, progress=True)
    t_cache = time.time() - t0
    from cliplab.longtext.llm2clip import pad_states, top_block_states
    from cliplab.text.pooling import get_pooling

    def pooled(model, sts):
        out = []
        with torch.no_grad():
            for k in range(0, len(sts), 32):
                x, m = pad_states(sts[k:k + 32])
                out.append(get_pooling("mean")(top_block_states(model, x, m, start), m))
        return torch.cat(out)

    test_states = states[len(train_t):]
    raw = caption_retrieval_accuracy(pooled(emb.model, test_states), test_i)
    tuned, fit = tune_last_layers(emb, train_t, train_i, tune_layers=args.tune_layers, steps=args.steps,
                                  batch_size=args.batch_size, lr=args.lr, states=states[:len(train_t)],
                                  progress=True)
    after = caption_retrieval_accuracy(pooled(tuned.model, test_states), test_i)
    raw_train = caption_retrieval_accuracy(pooled(emb.model, states[:len(train_t)]), train_i)
    after_train = caption_retrieval_accuracy(pooled(tuned.model, states[:len(train_t)]), train_i)
    res = {"model": args.model, "train_photos": args.train_photos, "test_photos": args.test_photos,
           "test_captions": len(test_t), "tune_layers": args.tune_layers, "steps": args.steps,
           "batch_size": args.batch_size, "lr": args.lr, "chance_cra": 4 / (len(test_t) - 1),
           "cra_test_raw_mean_pooling": raw, "cra_test_tuned": after,
           "cra_train_raw": raw_train, "cra_train_tuned": after_train,
           "loss_first": fit.losses[0], "loss_last10": sum(fit.losses[-10:]) / 10,
           "seconds_cache": t_cache, "seconds_fit": fit.seconds, "note": "measured under load (shared 2-core machine)"}
    print(json.dumps(res, indent=2))
    out = ROOT / "experiments" / "results" / f"llm2clip_stage1_{args.model}.json"
    out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
