"""End-to-end embedding throughput (image folder -> Parquet shards) vs the pure model encode rate.

Not a test. The pipeline decodes and preprocesses JPEGs in worker threads while the model runs; if that overlap
works, the end-to-end rate is close to the rate of ``model.encode_image`` on ready-made batches of the same size
(target: >= 90 %). Prints both rates and their ratio, and the share of the job's wall time the model was busy
(from the manifest), which is insensitive to other load on a shared machine.

    python benchmarks/pipeline_throughput.py [--arch ViT-B-32] [--batch-size 32] [--limit 1000] [--workers N]
        [--backend torch|onnxruntime|openvino|auto] [--precision fp32|bf16|int8|auto] [--compile]

The pure rate is measured on the same runtime the job runs (``EmbedJob`` resolves and loads it; its model is then
timed on ready-made pixel batches), before and after the job.

Images: the 1000 Flickr8k photos in ../shared/data/flickr8k-1k/images (about 500x375 JPEG). The model has random
weights of the named architecture (compute is what matters here), or pass --model for a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

import cliplab
from cliplab.pipeline import EmbedJob

IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k-1k" / "images"


def encode_rate(model, batch_size: int, batches: int) -> float:
    s = model.config.preprocess.image_size
    x = torch.randn(batch_size, 3, s, s, dtype=getattr(model, "dtype", torch.float32))  # as the job feeds it: a
    # compiled model given another dtype would compile again inside the timed job
    with torch.inference_mode():
        model.encode_image(x, normalize=True)  # warm-up
        t = time.perf_counter()
        for _ in range(batches):
            model.encode_image(x, normalize=True).numpy()
    return batch_size * batches / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ViT-B-32", help="architecture with random weights (default ViT-B-32)")
    ap.add_argument("--model", default=None, help="a checkpoint / pretrained name instead of --arch")
    ap.add_argument("--images", default=str(IMAGES))
    ap.add_argument("--limit", type=int, default=1000, help="number of photos (default: all 1000)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--encode-batches", type=int, default=6)
    ap.add_argument("--backend", default="torch", help="torch, onnxruntime, openvino or auto (default torch)")
    ap.add_argument("--precision", default="fp32", help="fp32, bf16, int8 or auto (default fp32)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the torch model (compiled before timing)")
    args = ap.parse_args()

    src = Path(args.images)
    if not src.is_dir():
        raise SystemExit(f"no image folder at {src} (the benchmark needs ../shared/data/flickr8k-1k)")
    files = sorted(p for p in src.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[: args.limit]
    tmp = Path(tempfile.mkdtemp(prefix="cliplab-bench-"))
    try:
        folder = tmp / "images"
        folder.mkdir()
        for p in files:
            os.symlink(p.resolve(), folder / p.name)
        model = cliplab.load(args.model) if args.model else cliplab.create_model(args.arch, seed=0).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            job = EmbedJob(folder, tmp / "out", model, batch_size=args.batch_size, shard_size=500, what="image",
                           workers=args.workers, progress=False, backend=args.backend, precision=args.precision,
                           compile=args.compile)
            model = job.model  # the runtime the job runs: the pure rate is timed on it too
            print(f"model {model.config.name} on {job.options.backend} {job.options.precision}"
                  f"{' compiled' if args.compile else ''}, {len(files)} photos, batch {args.batch_size}, torch "
                  f"threads {torch.get_num_threads()}, CPUs {os.cpu_count()}, decode workers {job.options.workers}")
            before = encode_rate(model, args.batch_size, args.encode_batches)  # compiles first, when asked to
            res = job.run()
        pipe = res.rows / res.seconds
        after = encode_rate(model, args.batch_size, args.encode_batches)
        pure = max(before, after)  # the conservative reference on a machine whose load changes under us
        assert res.rejects == 0, res.manifest["counts"]

        print(f"pure encode_image       : {pure:8.1f} images/s  (best of before {before:.1f}, after {after:.1f})")
        print(f"folder -> Parquet (e2e) : {pipe:8.1f} images/s  ({res.rows} rows in {res.seconds:.1f} s)")
        print(f"ratio                   : {pipe / pure:8.1%}  (target >= 90%)")
        lr = res.manifest["last_run"]
        print(f"model busy in the job   : {lr['model_busy']:8.1%}  ({lr['model_seconds']:.1f} s of {lr['seconds']:.1f} s; "
              "1.0 = decoding fully hidden behind compute)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
