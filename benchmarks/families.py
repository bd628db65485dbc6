"""Speed of the other model families against their reference implementations, side by side in one process.

* SigLIP (``ViT-B-16-SigLIP``): ``transformers.SiglipModel`` vs cliplab, the same random weights (cliplab loads the
  directory ``save_pretrained`` wrote). Texts are fixed-length rows of 64 random ids (SigLIP pads every text to 64
  and attends over all of them; no SentencePiece model ships here, and the cost does not depend on the ids).
* ModifiedResNet (``RN50-quickgelu``): OpenAI's reference ``clip/model.py`` (the ``openai-clip`` distribution) vs
  cliplab, the same random weights (cliplab loads the reference's state dict). Images only: the text tower is
  CLIP's, measured by ``suite.py``.

Each architecture runs four paths: the reference in fp32 and in bf16 autocast (its best CPU setting), cliplab exact
(fp32) and cliplab fast (bf16 weights and compute). Paths are timed in turn, round after round, and the best round
counts, so a drift in machine speed hits all alike. Run on a quiet machine::

    python benchmarks/families.py --out benchmarks/results/families-DATE.md
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import save_file

import cliplab
from cliplab.models.flops import image_flops, text_flops

from common import interleaved  # the side-by-side timer shared with suite.py (same directory)

PATHS = ("reference fp32", "reference bf16 autocast", "cliplab exact", "cliplab fast")


def openai_reference_module():
    """OpenAI's ``clip/model.py``, imported by path (its package ``__init__`` imports torchvision, broken here)."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("OpenAI's reference code is absent: pip install --no-deps openai-clip==1.0.1")
    path = Path(spec.submodule_search_locations[0]) / "model.py"
    mod_spec = importlib.util.spec_from_file_location("openai_clip_reference_model", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def siglip_models(arch: str, seed: int = 0):
    """``(reference, cliplab exact, cliplab fast)`` for a SigLIP architecture."""
    import transformers

    from cliplab.models.layouts.siglip import config_to_siglip

    torch.manual_seed(seed)
    ref = transformers.SiglipModel(transformers.SiglipConfig.from_dict(config_to_siglip(cliplab.get_config(arch))))
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        return ref.eval(), cliplab.load(d), cliplab.load(d, precision="bf16")


def resnet_models(arch: str, seed: int = 0):
    """``(reference, cliplab exact, cliplab fast)`` for a ModifiedResNet architecture."""
    cfg = cliplab.get_config(arch)
    v, t = cfg.vision, cfg.text
    torch.manual_seed(seed)
    ref = openai_reference_module().CLIP(
        embed_dim=cfg.embed_dim, image_resolution=v.image_size, vision_layers=v.resnet_layers, vision_width=v.width,
        vision_patch_size=None, context_length=t.context_length, vocab_size=t.vocab_size, transformer_width=t.width,
        transformer_heads=t.heads, transformer_layers=t.layers).float().eval()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rn.safetensors"
        save_file({k: x.contiguous() for k, x in ref.state_dict().items()}, str(path))
        return ref, cliplab.load(path, arch=arch), cliplab.load(path, arch=arch, precision="bf16")


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def measure(arch: str, args) -> list[dict]:
    family = cliplab.get_config(arch).family
    ref, exact, fast = (siglip_models if family == "siglip" else resnet_models)(arch)
    cfg = exact.config
    s = cfg.vision.image_size
    pixels = torch.randn(args.image_batch, 3, s, s, generator=torch.Generator().manual_seed(0))
    if family == "siglip":
        ref_image = lambda: ref.get_image_features(pixel_values=pixels)  # noqa: E731
    else:
        ref_image = lambda: ref.encode_image(pixels)  # noqa: E731
    contexts = {"reference fp32": nullcontext, "reference bf16 autocast": _autocast,
                "cliplab exact": nullcontext, "cliplab fast": nullcontext}
    images = {"reference fp32": ref_image, "reference bf16 autocast": ref_image,
              "cliplab exact": lambda: exact.encode_image(pixels), "cliplab fast": lambda: fast.encode_image(pixels)}
    print(f"  {arch}: images", file=sys.stderr, flush=True)
    ips = interleaved(images, len(pixels), args.repeats, contexts)
    tps = {}
    if family == "siglip":
        ids = torch.randint(0, cfg.text.vocab_size, (args.texts, cfg.text.context_length),
                            generator=torch.Generator().manual_seed(0))
        batches = ids.split(args.text_batch)
        texts = {"reference fp32": lambda: [ref.get_text_features(input_ids=b) for b in batches],
                 "cliplab exact": lambda: [exact.encode_text(b) for b in batches],
                 "cliplab fast": lambda: [fast.encode_text(b) for b in batches]}
        texts["reference bf16 autocast"] = texts["reference fp32"]
        print(f"  {arch}: texts", file=sys.stderr, flush=True)
        tps = interleaved({k: texts[k] for k in PATHS}, len(ids), args.repeats, contexts)
    rows = []
    for label in PATHS:
        row = {"arch": arch, "family": family, "path": label, "images_per_s": ips[label],
               "image_gflops": image_flops(cfg) / 1e9}
        if tps:
            row["texts_per_s"] = tps[label]
            row["text_gflops"] = text_flops(cfg, cfg.text.context_length) / 1e9
        rows.append(row)
        print(f"  {arch} / {label}: {ips[label]:.2f} images/s" + (f", {tps[label]:.1f} texts/s" if tps else ""),
              file=sys.stderr, flush=True)
    return rows


def report(meta: dict, results: dict[str, list[dict]], args) -> str:
    lines = ["# Other families: speed against their reference implementations", "",
             f"{meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, transformers {meta['transformers']}, "
             f"{meta['date']}. Same random weights in both implementations; images in batches of "
             f"{args.image_batch}; SigLIP texts: {args.texts} rows of 64 ids in batches of {args.text_batch}. "
             "Ratios are against the reference's fp32 and bf16-autocast paths, measured side by side in one run.", ""]

    def ratio(a, b):
        return f"{a / b:.2f}x"

    for arch, rows in results.items():
        by = {r["path"]: r for r in rows}
        r32, r16 = by["reference fp32"], by["reference bf16 autocast"]
        peer = "transformers.SiglipModel" if rows[0]["family"] == "siglip" else "OpenAI clip/model.py"
        lines += [f"## {arch} (reference: {peer}; {rows[0]['image_gflops']:.1f} GFLOPs per image)", "",
                  "| path | images/s | vs ref fp32 | vs ref bf16 | texts/s | vs ref fp32 | vs ref bf16 |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            text = (f"{r['texts_per_s']:.1f} | {ratio(r['texts_per_s'], r32['texts_per_s'])} | "
                    f"{ratio(r['texts_per_s'], r16['texts_per_s'])}") if "texts_per_s" in r else "- | - | -"
            lines.append(f"| {r['path']} | {r['images_per_s']:.2f} | {ratio(r['images_per_s'], r32['images_per_s'])} "
                         f"| {ratio(r['images_per_s'], r16['images_per_s'])} | {text} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="ViT-B-16-SigLIP,RN50-quickgelu")
    ap.add_argument("--image-batch", type=int, default=16)
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--text-batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", help="also write the Markdown report (and a .json of the raw figures) here")
    args = ap.parse_args()
    import transformers

    meta = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    try:
        meta["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        pass
    results = {arch: measure(arch, args) for arch in args.archs.split(",")}
    text = report(meta, results, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
