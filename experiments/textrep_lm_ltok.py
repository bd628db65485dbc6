"""Learn Your Tokens against a byte LM and a CLIP-BPE LM on Flickr8k captions (issue 26): bits per byte on held-out
captions (split by image) at about equal parameters, equal steps, batch (32 captions a step), learning rate and seed.

The byte and BPE baselines are cliplab's Llama-style decoder with 4 blocks, their width chosen so their parameter
count is closest to LTok's (:func:`cliplab.textrep.lm_training.config_for_params`).

    python experiments/textrep_lm_ltok.py [--steps 300]   # writes experiments/results/textrep_lm_ltok.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cliplab.textrep.lm_training import ByteCodec, CompactCLIPCodec, config_for_params, count_params, encode_rows, \
    evaluate_bpb, load_caption_splits, tiny_lm, train_lm
from cliplab.textrep.ltok import LTokConfig, LTokLM, evaluate_ltok_bpb, train_ltok

OUT = Path(__file__).resolve().parent / "results" / "textrep_lm_ltok.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    split = load_caption_splits(seed=args.seed)
    results = {}

    ltok = LTokLM(LTokConfig(width=128, layers=4), seed=args.seed)
    target = count_params(ltok)
    t0 = time.time()
    fit = train_ltok(ltok, split.train, steps=args.steps, batch_size=args.batch, lr=args.lr, seed=args.seed)
    results["ltok"] = {"params": target, **evaluate_ltok_bpb(ltok, split.held_out),
                       "train_seconds_under_load": round(time.time() - t0), "final_train_loss":
                       round(sum(fit.losses[-20:]) / 20, 4)}
    print("ltok", results["ltok"], flush=True)

    for codec in (ByteCodec(), CompactCLIPCodec(split.train)):
        width = config_for_params(codec.vocab_size, target, layers=4)
        model = tiny_lm(codec.vocab_size, width=width, layers=4, seed=args.seed)
        t0 = time.time()
        fit = train_lm(model, encode_rows(codec, split.train), pad_id=codec.pad_id, steps=args.steps,
                       batch_size=args.batch, lr=args.lr, seed=args.seed)
        res = evaluate_bpb(model, codec, split.held_out)
        results[codec.name] = {"params": count_params(model), "width": width, "vocab": codec.vocab_size, **res,
                               "train_seconds_under_load": round(time.time() - t0),
                               "final_train_loss": round(sum(fit.losses[-20:]) / 20, 4)}
        if isinstance(codec, CompactCLIPCodec):
            results[codec.name]["held_out_tokens_spelled_in_bytes"] = codec.spelled
        print(codec.name, results[codec.name], flush=True)

    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"what": "bits per byte on held-out Flickr8k captions (lower is better)",
                               "steps": args.steps, "batch_captions": args.batch, "lr": args.lr, "seed": args.seed,
                               "n_train": len(split.train), "n_held_out": len(split.held_out),
                               "arms": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
