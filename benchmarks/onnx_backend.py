"""ONNX Runtime backend vs our PyTorch fp32 path, same random weights, same inputs, one process.

Not a test: prints a Markdown table for the record (texts/s through ``encode_texts`` on real captions, images/s at
batch 1 and 64, cosine of each backend's features against PyTorch fp32).

    python benchmarks/onnx_backend.py [--arch ViT-B-32-quickgelu] [--texts 2048] [--repeats 3] [--threads N]

Texts are real captions from ../shared/data/flickr8k-1k/all_captions.csv when present (else synthetic ones).
From another script: ``from onnx_backend import run, markdown`` (``run`` exports the model to a temporary directory
unless given one).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import cliplab
from cliplab.export import export_onnx, load_onnx
from common import DATA, best_rate, load_captions  # the caption sample and timer shared with suite.py

CAPTIONS = DATA / "all_captions.csv"


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call (the least disturbed run on a shared machine)."""
    return 1.0 / best_rate(fn, 1.0, repeats)


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).min())


@torch.no_grad()
def run(model, texts: list[str], pixels: torch.Tensor, repeats: int = 3, threads: int | None = None,
        export_dir: str | Path | None = None, single_images: int = 16) -> list[dict]:
    """One row per backend: ``pytorch fp32``, ``onnxruntime fp32``, ``onnxruntime int8``.

    Each row has ``texts_per_s`` (``encode_texts`` over ``texts``), ``images_per_s_b1`` (``single_images`` calls of
    one image), ``images_per_s_bN`` (one call on all of ``pixels``, ``N = len(pixels)``), and the minimum cosine of
    its text and image features against PyTorch fp32. ``model`` must be fp32; ONNX Runtime gets ``threads`` intra-op
    threads (default: torch's). The model is exported to ``export_dir`` (default: a temporary directory) unless
    that directory already holds an export with int8 graphs.
    """
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(export_dir) if export_dir is not None else Path(tmp)
        if not (directory / "image.int8.onnx").exists():
            export_onnx(model, directory, quantize="int8")
        backends = [("pytorch fp32", model),
                    ("onnxruntime fp32", load_onnx(directory, threads=threads)),
                    ("onnxruntime int8", load_onnx(directory, quantized=True, threads=threads))]
        reference: dict[str, torch.Tensor] = {}
        rows = []
        for name, backend in backends:
            rows.append(_measure(name, backend, texts, pixels, repeats, single_images, reference))
    return rows


def _measure(name, backend, texts, pixels, repeats, single_images, reference) -> dict:
    ones = [pixels[i : i + 1] for i in range(min(single_images, len(pixels)))]
    text_s = best_seconds(lambda: backend.encode_texts(texts), repeats)
    one_s = best_seconds(lambda: [backend.encode_image(p) for p in ones], repeats)
    batch_s = best_seconds(lambda: backend.encode_image(pixels), repeats)
    text_features, image_features = backend.encode_texts(texts), backend.encode_image(pixels)
    reference.setdefault("text", text_features)
    reference.setdefault("image", image_features)
    return {"backend": name, "texts_per_s": len(texts) / text_s, "images_per_s_b1": len(ones) / one_s,
            "images_per_s_bN": len(pixels) / batch_s, "batch": len(pixels),
            "text_min_cosine": min_cosine(reference["text"], text_features),
            "image_min_cosine": min_cosine(reference["image"], image_features)}


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table, with each speed as a ratio to the first row (PyTorch fp32)."""
    base = rows[0]
    n = base["batch"]
    lines = [f"| backend | texts/s | images/s (batch 1) | images/s (batch {n}) | text cosine min | image cosine min |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        speeds = " | ".join(f"{r[k]:.1f} ({r[k] / base[k]:.2f}x)"
                            for k in ("texts_per_s", "images_per_s_b1", "images_per_s_bN"))
        lines.append(f"| {r['backend']} | {speeds} | {r['text_min_cosine']:.5f} | {r['image_min_cosine']:.5f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ViT-B-32-quickgelu")
    ap.add_argument("--texts", type=int, default=2048)
    ap.add_argument("--image-batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads [default: torch's]")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import onnxruntime

    model = cliplab.create_model(args.arch, seed=0).eval()
    texts = load_captions(args.texts)
    s = model.config.vision.image_size
    pixels = torch.randn(args.image_batch, 3, s, s, generator=torch.Generator().manual_seed(0))
    mean_tokens = float(model.tokenize(texts).lengths.float().mean())
    rows = run(model, texts, pixels, repeats=args.repeats, threads=args.threads)
    source = "Flickr8k captions" if CAPTIONS.exists() else "synthetic captions"
    print(f"{args.arch} (random weights), {len(texts)} {source} (mean {mean_tokens:.1f} tokens), "
          f"torch {torch.__version__} / onnxruntime {onnxruntime.__version__}, {torch.get_num_threads()} threads\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
