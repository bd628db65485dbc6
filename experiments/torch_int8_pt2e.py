"""int8 in PyTorch itself: PT2E static quantisation (torchao's X86InductorQuantizer) of the ViT-B/32 image tower,
compiled by inductor under bf16 autocast, against OpenVINO bf16 side by side (issue 27's int8 goal: >= 1.5x
OpenVINO bf16 at min cosine >= 0.999 and top-10 overlap >= 95% on Flickr8k photos).

Not a library path yet (a study): needs `pip install torchao` (0.18.0 here). Random weights (no pretrained CLIP
exists here); calibrated on ``--calibration`` Flickr8k photos, fidelity on ``--photos`` others.

    python experiments/torch_int8_pt2e.py [--modes default,max-autotune-no-cudagraphs] [--photos 300]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import flickr_photos  # noqa: E402

import cliplab  # noqa: E402
from cliplab.export.backends import ensure_export, load_backend  # noqa: E402

ARCH = "ViT-B-32-quickgelu"
SLICE = 32  # the rows each compiled call runs (the tower's own slice of a 64-image batch)


def quantized_tower(model: cliplab.CLIP, calibration: torch.Tensor, mode: str | None):
    """``encode_image``-like callable: the image tower exported, int8-quantised (static, per-tensor activations,
    per-channel weights), calibrated and compiled with freezing; non-quantised operations in bf16."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    with torch.no_grad():
        graph = torch.export.export(model.visual, (calibration[:SLICE],)).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for chunk in calibration.split(SLICE):
            if len(chunk) == SLICE:
                prepared(chunk)
    torch._inductor.config.freezing = True  # as a global: passed as an option, the qconv prepack failed to lower
    fn = torch.compile(convert_pt2e(prepared), mode=mode)

    def encode(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = []
            for c in x.split(SLICE):  # the graph was exported for SLICE rows: pad a short chunk, drop the padding
                rows = len(c)
                out.append(fn(torch.cat([c, c.new_zeros((SLICE - rows, *c.shape[1:]))]) if rows < SLICE else c)[:rows])
            return torch.cat(out).float()
    return encode


def top10_overlap(a: torch.Tensor, b: torch.Tensor, queries: torch.Tensor) -> float:
    ta = (F.normalize(queries, dim=-1) @ F.normalize(a, dim=-1).T).topk(10).indices
    tb = (F.normalize(queries, dim=-1) @ F.normalize(b, dim=-1).T).topk(10).indices
    return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(ta, tb)) / ta.numel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="default,max-autotune-no-cudagraphs")
    ap.add_argument("--photos", type=int, default=300)
    ap.add_argument("--calibration", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    photos = flickr_photos(args.photos + args.calibration)
    if len(photos) < args.photos + args.calibration:
        sys.exit("needs the Flickr8k photos in ../shared/data")
    exact = cliplab.create_model(ARCH, seed=0).eval()
    pixels = exact.preprocessor.batch(photos)
    held_out, calibration = pixels[: args.photos], pixels[args.photos:]
    with torch.inference_mode():
        ref = exact.encode_image(held_out)
    queries = torch.randn(200, ref.shape[1], generator=torch.Generator().manual_seed(0))  # text-like probes

    runs = {}
    for mode in args.modes.split(","):
        t = time.perf_counter()
        enc = quantized_tower(cliplab.create_model(ARCH, seed=0).eval(), calibration, None if mode == "default" else mode)
        enc(held_out[:64])
        runs[f"torch int8 (PT2E, {mode})"] = enc
        print(f"torch int8 {mode}: quantised and compiled in {time.perf_counter() - t:.0f} s", flush=True)
    export = ensure_export(exact, cache_root=Path(tempfile.mkdtemp(prefix="cliplab-int8-")))
    runs["openvino bf16"] = load_backend(export, "openvino", "bf16").encode_image
    fast = cliplab.create_model(ARCH, seed=0).eval().set_precision("bf16").set_compiled(True)
    runs["cliplab fast compiled"] = fast.encode_image

    x = held_out[:64]
    rates, fid = {}, {}
    with torch.inference_mode():
        for label, enc in runs.items():
            feats = torch.cat([enc(c) for c in held_out.split(64)])
            cos = F.cosine_similarity(feats.float(), ref)
            fid[label] = (cos.min().item(), cos.mean().item(), top10_overlap(feats.float(), ref, queries))
        for _ in range(args.repeats):
            for label, enc in runs.items():
                t = time.perf_counter()
                for _ in range(3):
                    enc(x)
                rates[label] = max(rates.get(label, 0.0), 3 * len(x) / (time.perf_counter() - t))
    base = rates["openvino bf16"]
    print(f"{ARCH}, random weights, batch 64, {torch.get_num_threads()} threads; fidelity on {args.photos} Flickr8k "
          f"photos (calibrated on {len(calibration)} others); overlap: top-10 of 200 random probe vectors")
    print("| path | images/s | vs OpenVINO bf16 | min cos | mean cos | top-10 overlap |\n|---|---:|---:|---:|---:|---:|")
    for label, rate in rates.items():
        mn, mean, ov = fid[label]
        print(f"| {label} | {rate:.1f} | {rate / base:.2f}x | {mn:.5f} | {mean:.5f} | {100 * ov:.1f}% |")


if __name__ == "__main__":
    main()
