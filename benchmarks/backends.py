"""Every inference backend side by side through ``cliplab.export.backends.load_backend``: same weights, same inputs,
one process, paths timed in turn each round (``common.interleaved``) so a drift in machine speed hits all alike.

Not a test: prints a Markdown table (images/s at batch 1 and batch N, texts/s through ``encode_texts`` on real
captions, minimum cosine of image and text features to torch fp32) and each rate as a ratio to torch fp32 and to
OpenVINO bf16. Rows: torch fp32/bf16, onnxruntime fp32/int8, openvino fp32/bf16/int8 (those whose package is
installed).

    python benchmarks/backends.py [--model shapes-tiny] [--texts 512] [--batch 64] [--single 16] [--repeats 3]
                                  [--threads N] [--export-dir DIR] [--out benchmarks/results/backends-DATE.md]

``--model`` is anything ``load_backend`` takes; an architecture name (``ViT-B-32``) gives seeded random weights,
fine for speed, not for int8 fidelity. Images are Flickr8k photos (preprocessed once) when ../shared/data has them,
else seeded noise. On a machine shared with other jobs, say so next to any number it prints.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from cliplab.export.backends import available_backends, ensure_export, load_backend, torch_model
from common import flickr_photos, interleaved, load_captions, write_report

ROWS = [("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"),
        ("openvino", "fp32"), ("openvino", "bf16")]


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).min())


def pixels_for(model, n: int) -> tuple[torch.Tensor, str]:
    photos = flickr_photos(n)
    if len(photos) == n:
        return torch.stack([model.preprocess(p) for p in photos]).float(), "Flickr8k photos"
    s = model.config.vision.image_size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(0)), "seeded noise"


@torch.no_grad()
def run(args) -> tuple[list[dict], str]:
    torch.set_num_threads(args.threads)
    offered = available_backends()
    rows = [(b, p) for b, p in ROWS if p in offered.get(b, ())]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights, slow-bf16 and truncation warnings: the table says it all
        reference = torch_model(args.model, "fp32")
        export_dir = ensure_export(reference, args.export_dir, int8=True)
        texts = load_captions(args.texts)
        pixels, source = pixels_for(reference, args.batch)
        models = {f"{b} {p}": load_backend(reference, b, p) if b == "torch" else
                  load_backend(export_dir, b, p, threads=args.threads) for b, p in rows}
        ref_img, ref_txt = reference.encode_image(pixels), reference.encode_texts(texts)
        fidelity = {label: (min_cosine(ref_img, m.encode_image(pixels)), min_cosine(ref_txt, m.encode_texts(texts)))
                    for label, m in models.items()}
        same = {label: contextlib.nullcontext for label in models}
        single = pixels[: args.single]
        b1 = interleaved({k: (lambda m=m: [m.encode_image(single[i : i + 1]) for i in range(len(single))])
                          for k, m in models.items()}, len(single), args.repeats, same)
        bn = interleaved({k: (lambda m=m: m.encode_image(pixels)) for k, m in models.items()}, len(pixels),
                         args.repeats, same)
        tx = interleaved({k: (lambda m=m: m.encode_texts(texts)) for k, m in models.items()}, len(texts),
                         args.repeats, same)
    runs = {k: m.inference_precision("image") for k, m in models.items() if hasattr(m, "inference_precision")}
    out = [{"backend": k + (" (runs f32)" if runs.get(k) == "f32" and "bf16" in k else ""), "images_per_s_b1": b1[k], f"images_per_s_b{len(pixels)}": bn[k], "texts_per_s": tx[k],
            "image_min_cos": fidelity[k][0], "text_min_cos": fidelity[k][1]} for k in models]
    return out, source


def markdown(rows: list[dict], args, source: str) -> str:
    bn = f"images_per_s_b{args.batch}"
    base = {m: rows[0][m] for m in ("images_per_s_b1", bn, "texts_per_s")}
    ov = next((r for r in rows if r["backend"].startswith("openvino bf16")), None)
    lines = [f"# Backends side by side: {args.model}, {args.threads} threads, {args.texts} captions, images: "
             f"{source}", "",
             f"| backend | img/s b1 | img/s b{args.batch} | texts/s | x torch fp32 (b1 / b{args.batch} / text) | "
             "x openvino bf16 | min cos img | min cos text |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = " / ".join(f"{r[m] / base[m]:.2f}" for m in base)
        vs_ov = " / ".join(f"{r[m] / ov[m]:.2f}" for m in base) if ov else "-"
        lines.append(f"| {r['backend']} | {r['images_per_s_b1']:.1f} | {r[bn]:.1f} | {r['texts_per_s']:.0f} | "
                     f"{ratio} | {vs_ov} | {r['image_min_cos']:.6f} | {r['text_min_cos']:.6f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes-tiny")
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--single", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--export-dir", type=Path, default=None,
                        help="where the export lives or goes (default: a temporary directory)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (and JSON next to it)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.export_dir is None:
            args.export_dir = Path(tmp) / "export"
        rows, source = run(args)
    write_report(markdown(rows, args, source), args.out, args, rows)


if __name__ == "__main__":
    main()
