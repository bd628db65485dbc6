"""OpenVINO's async-queue chunk size (``queue_batch``) against cliplab's fast compiled path, side by side.

Not a test. One process, one ONNX export of the same random weights; paths timed in turn, best of ``--repeats``
rounds of 3 batches. OpenVINO runs image batches as chunks of ``queue_batch`` rows spread over its throughput
streams; the best chunk depends on the precision and the CPU, so a comparison that fixes it can flatter either side.

    python benchmarks/openvino_chunks.py [--arch ViT-B-32-quickgelu] [--precision bf16] [--chunks 8,16,32,64]
        [--modes default,max-autotune-no-cudagraphs]

``--modes``: the torch.compile modes of cliplab's compiled rows (max-autotune lets inductor time its own AMX GEMM
template against oneDNN per matmul shape; its compile takes minutes).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_captions  # noqa: E402

import cliplab  # noqa: E402
from cliplab.export.backends import ensure_export, load_backend  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ViT-B-32-quickgelu")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--chunks", default="8,16,32,64")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--modes", default="default", help="comma-separated torch.compile modes for cliplab's rows")
    args = ap.parse_args()
    model = cliplab.create_model(args.arch, seed=0).eval()
    export = ensure_export(model, cache_root=Path(tempfile.mkdtemp(prefix="cliplab-chunks-")))
    s = model.config.vision.image_size
    x = torch.randn(args.batch, 3, s, s)
    captions = load_captions(1024)
    runs = {}
    for mode in args.modes.split(","):
        label = f"cliplab {args.precision} compiled" + ("" if mode == "default" else f" ({mode})")
        runs[label] = cliplab.create_model(args.arch, seed=0).eval().set_precision(args.precision).set_compiled(
            True, mode=None if mode == "default" else mode)
    ours = len(runs)
    for chunk in (int(c) for c in args.chunks.split(",")):
        runs[f"openvino {args.precision} chunk {chunk}"] = load_backend(export, "openvino", args.precision,
                                                                       queue_batch=chunk)
    images, texts = {}, {}
    with torch.inference_mode():
        for m in runs.values():  # compile / warm up
            m.encode_image(x)
            m.encode_texts(captions[:256])
        for _ in range(args.repeats):
            for i, (label, m) in enumerate(runs.items()):
                t = time.perf_counter()
                for _ in range(3):
                    m.encode_image(x)
                images[label] = max(images.get(label, 0.0), 3 * len(x) / (time.perf_counter() - t))
                if i <= ours:  # texts have no queue: ours and one OpenVINO row
                    t = time.perf_counter()
                    m.encode_texts(captions)
                    texts[label] = max(texts.get(label, 0.0), len(captions) / (time.perf_counter() - t))
    best = max((v for k, v in images.items() if k.startswith("openvino")), default=None)
    print(f"{args.arch}, batch {args.batch}, {torch.get_num_threads()} threads")
    for label, m in list(runs.items())[:ours]:
        report = m.compile_report()
        print(f"{label}: first call (compiling) {report['image']:.0f} s images, {report['text']:.0f} s texts")
    print("| path | images/s | vs best OpenVINO | texts/s |\n|---|---:|---:|---:|")
    for label, rate in images.items():
        t = f"{texts[label]:.0f}" if label in texts else "-"
        print(f"| {label} | {rate:.1f} | {rate / best:.2f}x | {t} |")


if __name__ == "__main__":
    main()
