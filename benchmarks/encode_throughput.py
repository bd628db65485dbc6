"""Encode throughput of cliplab vs `transformers` CLIP on the same random ViT-B-32 weights, side by side.

Not a test: prints a Markdown table for the record. Speed work itself is a separate effort; this is the baseline.

    python benchmarks/encode_throughput.py [--arch ViT-B-32-quickgelu] [--texts 2048] [--image-batch 32]

Texts are real captions from ../shared/data/flickr8k-1k/all_captions.csv when present (else synthetic ones),
batched by 256 and padded to each batch's longest caption (transformers' best setting).
"""

from __future__ import annotations

import argparse
import csv
import random
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import cliplab
from cliplab.models.layouts.hf import config_to_hf

CAPTIONS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k-1k" / "all_captions.csv"


def load_captions(n: int) -> list[str]:
    if CAPTIONS.exists():
        with CAPTIONS.open() as f:
            caps = [row["caption"] for row in csv.DictReader(f)]
    else:
        words = "a the dog cat man woman runs sits on in red blue field street with two three small".split()
        rng = random.Random(0)
        caps = [" ".join(rng.choices(words, k=rng.randint(4, 25))) for _ in range(n)]
    random.Random(0).shuffle(caps)
    return caps[:n]


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ViT-B-32-quickgelu")
    ap.add_argument("--texts", type=int, default=2048)
    ap.add_argument("--image-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import transformers

    torch.manual_seed(0)
    cfg = cliplab.get_config(args.arch)
    ref = transformers.CLIPModel(transformers.CLIPConfig.from_dict(config_to_hf(cfg))).eval()
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours = cliplab.load(d)

    captions = load_captions(args.texts)
    batches = [ours.tokenize(captions[i : i + 256]) for i in range(0, len(captions), 256)]
    mean_len = sum(float(b.lengths.float().mean()) for b in batches) / len(batches)
    s = cfg.vision.image_size
    pixels = torch.randn(args.image_batch, 3, s, s)

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    rows = []
    for label, model_text, model_image, ctx in [
        ("transformers fp32", lambda b: ref.get_text_features(input_ids=b.ids[:, : int(b.lengths.max())]),
         lambda: ref.get_image_features(pixel_values=pixels), nullcontext),
        ("transformers bf16 autocast", lambda b: ref.get_text_features(input_ids=b.ids[:, : int(b.lengths.max())]),
         lambda: ref.get_image_features(pixel_values=pixels), bf16),
        ("cliplab fp32", lambda b: ours.encode_text(b), lambda: ours.encode_image(pixels), nullcontext),
        ("cliplab bf16 autocast", lambda b: ours.encode_text(b), lambda: ours.encode_image(pixels), bf16),
    ]:
        with torch.inference_mode(), ctx():
            t_text = timed(lambda: [model_text(b) for b in batches], 1)
            t_img = timed(model_image, args.repeats)
        rows.append((label, len(captions) / t_text, args.image_batch / t_img))
        print(f"  measured {label}", flush=True)

    base_t, base_i = rows[0][1], rows[0][2]
    print(f"\n{args.arch}, {torch.get_num_threads()} threads, {len(captions)} captions (mean {mean_len:.1f} tokens), "
          f"image batch {args.image_batch}\n")
    print("| path | texts/s | x transformers fp32 | images/s | x transformers fp32 |")
    print("|---|---:|---:|---:|---:|")
    for label, tps, ips in rows:
        print(f"| {label} | {tps:.0f} | {tps / base_t:.2f} | {ips:.1f} | {ips / base_i:.2f} |")


if __name__ == "__main__":
    main()
