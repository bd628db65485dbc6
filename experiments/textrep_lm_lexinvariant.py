"""Lexinvariant LM against a standard LM on Flickr8k caption bytes (issue 26): same blocks, data, steps and seed.

Both train on the training captions' bytes packed into windows of 256; the standard LM has a learned byte table,
the lexinvariant LM a fresh random Gaussian table per sequence. Measured on held-out captions (split by image): the
per-position loss (does the lexinvariant model close the gap as context grows?) on plain text and on text under a
random substitution of all 256 byte values per window (a cipher).

    python experiments/textrep_lm_lexinvariant.py [--steps 400]   # writes experiments/results/textrep_lm_lexinvariant.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from cliplab.textrep.lexinvariant_lm import LexinvariantLM, cipher, per_position, position_nll, train_lexinvariant
from cliplab.textrep.lm_training import ByteCodec, count_params, encode_rows, load_caption_splits, pack_stream, \
    tiny_lm, train_lm

OUT = Path(__file__).resolve().parent / "results" / "textrep_lm_lexinvariant.json"
BUCKETS = [(0, 16), (16, 64), (64, 128), (128, 255)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    codec = ByteCodec()
    split = load_caption_splits(seed=args.seed)
    train = pack_stream(encode_rows(codec, split.train), args.length)
    held = pack_stream(encode_rows(codec, split.held_out), args.length)[: args.eval_windows]
    held_cipher = cipher(held, 256, seed=args.seed + 1)

    t0 = time.time()
    standard = tiny_lm(codec.vocab_size, width=128, layers=4, seed=args.seed)
    fit_std = train_lm(standard, train.tolist(), pad_id=codec.pad_id, steps=args.steps, batch_size=16,
                       seed=args.seed)
    t_std = time.time() - t0
    t0 = time.time()
    lexinv = LexinvariantLM(codec.vocab_size, width=128, layers=4, seed=args.seed)
    fit_lex = train_lexinvariant(lexinv, train, steps=args.steps, batch_size=16, seed=args.seed)
    t_lex = time.time() - t0

    gen = torch.Generator().manual_seed(args.seed + 2)

    def lex_fn(ids):
        return per_position(lexinv, ids, embeddings=lexinv.sample_embeddings(ids.shape[0], gen))

    def std_fn(ids):
        return per_position(standard, ids)

    curves = {"standard_plain": position_nll(std_fn, held), "standard_cipher": position_nll(std_fn, held_cipher),
              "lexinvariant_plain": position_nll(lex_fn, held), "lexinvariant_cipher": position_nll(lex_fn, held_cipher)}
    bits = {k: (v / math.log(2)) for k, v in curves.items()}  # bits per predicted byte
    table = {k: {f"{a + 1}-{b}": round(float(v[a:b].mean()), 3) for a, b in BUCKETS} | {"all": round(float(v.mean()), 3)}
             for k, v in bits.items()}
    result = {"what": "bits per predicted byte by position in 256-byte windows of held-out Flickr8k captions",
              "steps": args.steps, "batch": 16, "length": args.length, "seed": args.seed,
              "params": {"standard": count_params(standard), "lexinvariant": count_params(lexinv)},
              "train_seconds_under_load": {"standard": round(t_std), "lexinvariant": round(t_lex)},
              "final_train_loss": {"standard": round(sum(fit_std.losses[-20:]) / 20, 3),
                                   "lexinvariant": round(sum(fit_lex.losses[-20:]) / 20, 3)},
              "eval_windows": len(held), "bits_by_position": table,
              "curve_every_8": {k: [round(float(x), 3) for x in v[::8]] for k, v in bits.items()}}
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
