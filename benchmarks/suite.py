"""The inference benchmark suite: cliplab exact and fast vs `transformers` CLIP, side by side, same weights and inputs.

    python benchmarks/suite.py                      # ViT-B-32 and ViT-B-16, writes a Markdown report to stdout
    python benchmarks/suite.py --quick --out report.md

What it measures, in one process (peak memory in a fresh subprocess per path). Each figure is the best of a few
rounds in which the paths take turns, so a drift in machine speed affects them alike:

* the machine: best measured fp32 and bf16 matmul rates (GFLOP/s), the peaks the utilisation figures divide by;
* per architecture (random weights made by `transformers`, loaded into cliplab through the HF layout):
  texts/s on real captions (``../shared/data/flickr8k-1k/all_captions.csv``, seeded sample; transformers gets
  batches of 256 padded to their longest caption, its best setting, and for reference padded to 77 like open_clip;
  cliplab gets the same list through ``encode_texts``, tokenization included), images/s at batch 64 and batch 1,
  latency of one text query (tokenization included for cliplab) and one image, peak memory, and model FLOP utilisation (matmul FLOPs, see
  ``cliplab.models.flops``) against the measured peak of the path's precision;
* fast-mode fidelity on real data (first architecture): cosine of fast vs exact features for captions and photos,
  and the overlap of text->image top-10 lists over the Flickr8k photos;
* image decode: photos/s through the exact and the fast (JPEG draft) preprocessor, and what draft decoding does to
  the features (camera-size photos made by upscaling Flickr8k photos 4x; and the 64 px default model on the originals);
* the ONNX Runtime backend (fp32 and int8) when `onnxruntime` is installed (``benchmarks/onnx_backend.py``).

Run it on a quiet machine: every figure is a rate on shared cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

import cliplab
from cliplab.models.flops import image_flops, text_flops
from cliplab.models.layouts.hf import config_to_hf

from common import DATA, best_rate, flickr_pairs, flickr_photos, interleaved, load_captions  # shared inputs and timer (same directory)

TEXT_BATCH = 256
#: every path the suite knows; ``--paths`` picks (default: those installed, bf16 ones only on a native-bf16 CPU)
PATHS = ("transformers fp32", "transformers bf16 autocast", "cliplab exact", "cliplab fast", "cliplab compiled",
         "cliplab fast compiled", "cliplab fast compiled max-autotune", "onnxruntime fp32", "onnxruntime int8", "openvino fp32", "openvino bf16", "openvino int8")
#: OpenVINO int8 calibrates on these Flickr8k photos (the last ones: the fidelity study uses the first)
CALIBRATION_PHOTOS = 300
#: the paths run by another runtime on cliplab's ONNX export (``cliplab.export.load_backend``)
BACKEND_PATHS = {label: tuple(label.split()) for label in PATHS if label.startswith(("onnxruntime", "openvino"))}
LOW_PRECISION = {"transformers bf16 autocast", "cliplab fast", "cliplab fast compiled", "cliplab fast compiled max-autotune",
                 "openvino bf16"}


def default_paths() -> list[str]:
    """Every path whose package is installed; bf16 paths only where the CPU has native bf16 (elsewhere they run
    about 8x slower than fp32, or, for OpenVINO, silently in f32)."""
    from cliplab.export.backends import available_backends
    from cliplab.models.hardware import native_bf16

    offered = available_backends()
    if len(flickr_photos(1000)) < 1000:  # OpenVINO int8 needs real calibration photos
        offered["openvino"] = tuple(x for x in offered.get("openvino", ()) if x != "int8")
    try:
        import nncf  # noqa: F401
    except ImportError:
        offered["openvino"] = tuple(x for x in offered.get("openvino", ()) if x != "int8")
    return [p for p in PATHS if (p not in BACKEND_PATHS or BACKEND_PATHS[p][1] in offered.get(BACKEND_PATHS[p][0], ()))
            and (p not in LOW_PRECISION or native_bf16() is not False)]


def matmul_peaks(repeats: int = 5) -> dict[str, float]:
    """Best GFLOP/s over a few transformer-like and square shapes, per dtype."""
    shapes = [(3200, 768, 3072), (3200, 3072, 768), (2048, 2048, 2048), (4096, 4096, 4096)]
    out = {}
    with torch.inference_mode():
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            rates = []
            for m, k, n in shapes:
                a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
                rates.append(best_rate(lambda: a @ b, 2 * m * k * n / 1e9, repeats))
            out[name] = max(rates)
    return out


# --------------------------------------------------------------------------------------------------------------------
# models


def make_models(arch: str, paths: list[str], export_root: Path, seed: int = 0):
    """transformers CLIPModel with its own random init, and every cliplab path loaded from its saved weights (the
    backends through one ONNX export of them in ``export_root``)."""
    import transformers

    from cliplab.export.backends import ensure_export, load_backend

    torch.manual_seed(seed)
    cfg = cliplab.get_config(arch)
    ref = transformers.CLIPModel(transformers.CLIPConfig.from_dict(config_to_hf(cfg))).eval()
    models = {}
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        models["cliplab exact"] = exact = cliplab.load(d)
        if "cliplab fast" in paths:
            models["cliplab fast"] = cliplab.load(d, precision="bf16")
        if "cliplab compiled" in paths:
            models["cliplab compiled"] = cliplab.load(d, compile=True)
        if "cliplab fast compiled" in paths:
            models["cliplab fast compiled"] = cliplab.load(d, precision="bf16", compile=True)
        if "cliplab fast compiled max-autotune" in paths:
            models["cliplab fast compiled max-autotune"] = cliplab.load(d, precision="bf16", compile="max-autotune")
    backends = [p for p in paths if p in BACKEND_PATHS]
    if backends:
        export_dir = ensure_export(exact, export_root / arch, int8="onnxruntime int8" in backends)
        if "openvino int8" in backends:  # calibrated on real photos with the library's accuracy control; measured
            from cliplab.export.openvino_int8 import ensure_openvino_int8  # even when it misses the held-out bar

            try:
                ensure_openvino_int8(export_dir, flickr_photos(1000)[-CALIBRATION_PHOTOS:])
            except ValueError as e:
                print(f"  openvino int8: {e}", file=sys.stderr)
        for label in backends:
            models[label] = load_backend(export_dir, *BACKEND_PATHS[label], threads=torch.get_num_threads())
    return ref, models


def hf_text_batches(model: cliplab.CLIP, captions: list[str], pad_to: int | None):
    """Our tokenizer's ids (identical to CLIP's BPE), batched in the given order, padded to the batch's longest
    (``padding="longest"``) or to ``pad_to``; with the attention mask a tokenizer call would return."""
    out = []
    for i in range(0, len(captions), TEXT_BATCH):
        tok = model.tokenize(captions[i : i + TEXT_BATCH])
        n = pad_to or int(tok.lengths.max())
        ids = tok.ids[:, :n]
        out.append((ids, (torch.arange(n) < tok.lengths[:, None]).long()))
    return out


def path_functions(label: str, ref, models: dict, captions: list[str], text_batches):
    """``(encode all texts, encode a pixel batch, context manager)`` of one path."""
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    if label.startswith("transformers"):
        ctx = autocast if "bf16" in label else nullcontext
        return (lambda: [ref.get_text_features(input_ids=i, attention_mask=m) for i, m in text_batches],
                lambda px: ref.get_image_features(pixel_values=px), ctx)
    model = models[label]
    return (lambda: model.encode_texts(captions, batch_size=TEXT_BATCH), lambda px: model.encode_image(px),
            nullcontext)


def features(out) -> torch.Tensor:
    """A ``get_*_features`` result as a tensor (transformers 5 wraps it: ``pooler_output`` holds the projection)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def min_cos(a, b) -> float:
    return float(F.cosine_similarity(features(a).float(), features(b).float(), dim=-1).min())


def measure_arch(arch: str, args, peaks: dict[str, float]) -> list[dict]:
    ref, models = make_models(arch, args.paths, args.export_root)
    exact = models["cliplab exact"]
    cfg = exact.config
    captions = load_captions(args.texts)
    lengths = exact.tokenize(captions).lengths
    useful_text_flops = sum(text_flops(cfg, int(n)) for n in lengths)
    longest = hf_text_batches(exact, captions, None)
    s = cfg.vision.image_size
    pixels = torch.randn(args.image_batch, 3, s, s, generator=torch.Generator().manual_seed(0))
    one = pixels[:1]
    query = hf_text_batches(exact, captions[:1], None)[0]
    texts, images, ctxs, text_query = {}, {}, {}, {}
    for label in args.paths:
        texts[label], images[label], ctxs[label] = path_functions(label, ref, models, captions, longest)
        if label.startswith("transformers"):
            text_query[label] = lambda: ref.get_text_features(input_ids=query[0], attention_mask=query[1])
        else:
            model = models[label]
            text_query[label] = lambda model=model: model.encode_text(model.tokenize(captions[:1]))
    print(f"  {arch}: texts", file=sys.stderr, flush=True)
    tps = interleaved(texts, len(captions), args.repeats, ctxs)
    print(f"  {arch}: images", file=sys.stderr, flush=True)
    ips = interleaved({k: (lambda f=f: f(pixels)) for k, f in images.items()}, len(pixels), args.repeats, ctxs)
    ips1 = interleaved({k: (lambda f=f: f(one)) for k, f in images.items()}, 1, 3 * args.repeats, ctxs)
    lat_t = {k: 1000 / v for k, v in interleaved(text_query, 1, 10, ctxs).items()}
    lat_i = {k: 1000 / v for k, v in ips1.items()}
    with torch.inference_mode():  # each path's features against cliplab exact on the timed inputs
        exact_img, exact_txt = exact.encode_image(pixels), exact.encode_texts(captions)
        fid = {}
        for label in args.paths:
            with ctxs[label]():
                fid[label] = (min_cos(images[label](pixels), exact_img), min_cos(text_features(
                    label, ref, models, captions, longest), exact_txt))
    rows = []
    for label in args.paths:
        peak = peaks["bf16" if label in LOW_PRECISION else "fp32"]
        row = {"arch": arch, "path": label, "texts_per_s": tps[label], "images_per_s_64": ips[label],
               "images_per_s_1": ips1[label], "text_latency_ms": lat_t[label], "image_latency_ms": lat_i[label],
               "image_mfu": ips[label] * image_flops(cfg) / 1e9 / peak,
               "text_mfu": tps[label] * useful_text_flops / len(captions) / 1e9 / peak,
               "image_min_cos": fid[label][0], "text_min_cos": fid[label][1]}
        if "int8" in label:  # int8 runs neither peak: no utilisation figure
            row["image_mfu"] = row["text_mfu"] = None
        if "compiled" in label:
            row["compile_s"] = models[label].compile_report()
        if label.startswith("transformers"):
            pad77 = hf_text_batches(exact, captions[: args.texts_77], 77)
            with torch.inference_mode(), ctxs[label]():
                row["texts_per_s_pad77"] = best_rate(
                    lambda: [ref.get_text_features(input_ids=i, attention_mask=m) for i, m in pad77],
                    args.texts_77, 1)
        if args.memory:
            row["peak_memory_mb"] = peak_memory(arch, label, args.image_batch, args.export_root / arch)
        rows.append(row)
        print(f"  {arch} / {label}: {tps[label]:.0f} texts/s, {ips[label]:.1f} images/s", file=sys.stderr,
              flush=True)
    rows[0]["mean_tokens"] = float(lengths.float().mean())
    return rows


def text_features(label: str, ref, models: dict, captions: list[str], text_batches) -> torch.Tensor:
    """Every caption's features by one path, in caption order."""
    if not label.startswith("transformers"):
        return models[label].encode_texts(captions, batch_size=TEXT_BATCH)
    return torch.cat([features(ref.get_text_features(input_ids=i, attention_mask=m)) for i, m in text_batches])


# --------------------------------------------------------------------------------------------------------------------
# peak memory (a fresh process per path, so one path's allocations cannot hide another's)


def peak_memory(arch: str, label: str, batch: int, export_dir: Path) -> float:
    out = subprocess.run([sys.executable, __file__, "--probe-memory", arch, label, str(batch), str(export_dir)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def high_water_mb() -> float:
    """This process's peak resident memory. ``VmHWM`` rather than ``getrusage``: Linux carries ``ru_maxrss`` over
    from the parent across fork and exec, which hid every probe's growth behind the suite's own peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def probe_memory(arch: str, label: str, batch: int, export_dir: str) -> None:
    """Peak RSS growth (MB) from building the model through one image batch and one text batch of 256 (a backend:
    from opening the export ``export_dir`` the suite wrote)."""
    import transformers

    base = high_water_mb()
    cfg = cliplab.get_config(arch)
    captions = load_captions(TEXT_BATCH)
    s = cfg.vision.image_size
    with torch.inference_mode():
        if label.startswith("transformers"):
            ref = transformers.CLIPModel(transformers.CLIPConfig.from_dict(config_to_hf(cfg))).eval()
            ids = cliplab.create_model("test-tiny").tokenize(captions)
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if "bf16" in label else nullcontext()
            with ctx:
                ref.get_image_features(pixel_values=torch.randn(batch, 3, s, s))
                ref.get_text_features(input_ids=ids.ids[:, : int(ids.lengths.max())])
        else:
            if label in BACKEND_PATHS:
                from cliplab.export.backends import load_backend

                model = load_backend(export_dir, *BACKEND_PATHS[label])
            else:
                model = cliplab.create_model(arch).eval().set_precision("bf16" if "fast" in label else "fp32")
                model.set_compiled("compiled" in label, mode="max-autotune" if "autotune" in label else None)
            model.encode_image(torch.randn(batch, 3, s, s))
            model.encode_texts(captions)
    print(high_water_mb() - base)


# --------------------------------------------------------------------------------------------------------------------
# fast-mode fidelity and decode


def fidelity(arch: str, args) -> dict:
    with tempfile.TemporaryDirectory() as root:
        _, models = make_models(arch, ["cliplab exact", "cliplab fast"], Path(root))
    exact, fast = models["cliplab exact"], models["cliplab fast"]
    captions = load_captions(args.texts)
    out = {}
    with torch.inference_mode():
        cos_t = F.cosine_similarity(exact.encode_texts(captions), fast.encode_texts(captions), dim=-1)
        out["text_cos_min"], out["text_cos_mean"] = float(cos_t.min()), float(cos_t.mean())
        photos, firsts = flickr_pairs(args.photos)
        if photos:
            px = exact.preprocessor.batch(photos)  # same pixels for both: this isolates the bf16 compute
            img_e = torch.cat([exact.encode_image(px[i : i + 64]) for i in range(0, len(px), 64)])
            img_f = torch.cat([fast.encode_image(px[i : i + 64]).float() for i in range(0, len(px), 64)])
            cos_i = F.cosine_similarity(img_e, img_f, dim=-1)
            out["image_cos_min"], out["image_cos_mean"] = float(cos_i.min()), float(cos_i.mean())
            out["top10_overlap"] = top10_overlap(exact.encode_texts(firsts), img_e, fast.encode_texts(firsts), img_f)
            out["photos"] = len(photos)
    out["captions"] = len(captions)
    out.update(trained_fidelity(args.scenes))
    return out


def top10_overlap(q_a, g_a, q_b, g_b) -> float:
    top_a = (F.normalize(q_a, dim=-1) @ F.normalize(g_a, dim=-1).T).topk(10).indices
    top_b = (F.normalize(q_b, dim=-1) @ F.normalize(g_b, dim=-1).T).topk(10).indices
    return sum(len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(top_a, top_b)) / len(top_a)


def trained_fidelity(n: int) -> dict:
    """The same comparison on the shipped trained model (shapes-tiny) over held-out synthetic scenes: a random
    model's similarities are nearly flat, so its top-10 lists reshuffle on tiny perturbations; a trained one's are not."""
    from cliplab.data import SceneWorld

    exact, fast = cliplab.load("shapes-tiny"), cliplab.load("shapes-tiny", precision="bf16")
    scenes = [SceneWorld(seed=1).sample(i) for i in range(n)]
    px = exact.preprocessor.batch([s.image for s in scenes])
    captions = [s.short_caption for s in scenes]
    with torch.inference_mode():
        img_e, img_f = exact.encode_image(px), fast.encode_image(px)
        txt_e, txt_f = exact.encode_texts(captions), fast.encode_texts(captions)
    return {"trained_scenes": n, "trained_top10_overlap": top10_overlap(txt_e, img_e, txt_f, img_f),
            "trained_image_cos_min": float(F.cosine_similarity(img_e, img_f, dim=-1).min()),
            "trained_text_cos_min": float(F.cosine_similarity(txt_e, txt_f, dim=-1).min())}


def decode_study(args) -> list[dict]:
    """Photos/s of the exact and the fast (draft) preprocessor, and the feature cosine between the two."""
    from PIL import Image

    photos = flickr_photos(args.decode_photos)
    if not photos:
        return []
    rows = []
    with tempfile.TemporaryDirectory() as d:
        large = []
        for p in photos:  # 4x upscaled copies stand in for camera-size photos (the dataset's are ~500x375)
            with Image.open(p) as im:
                path = Path(d) / p.name
                im.convert("RGB").resize((im.width * 4, im.height * 4), Image.Resampling.BICUBIC).save(path, quality=90)
                large.append(path)
        cases = [("ViT-B-32 (224 px), Flickr8k photos upscaled 4x (2000x1500)", "ViT-B-32-quickgelu", large),
                 ("ViT-B-32 (224 px), Flickr8k photos as they are", "ViT-B-32-quickgelu", photos),
                 ("shapes-tiny (64 px), Flickr8k photos as they are", "shapes-tiny", photos)]
        for label, arch, files in cases:
            model = cliplab.load(arch) if arch in cliplab.list_pretrained() else \
                cliplab.create_model(arch, seed=0).eval()
            exact_pre = model.preprocessor
            fast_pre = type(exact_pre)(exact_pre.config, alpha=exact_pre.alpha, fast=True)
            r_exact = best_rate(lambda: exact_pre.batch(files), len(files), 2)
            r_fast = best_rate(lambda: fast_pre.batch(files), len(files), 2)
            with torch.inference_mode():
                a = model.encode_image(exact_pre.batch(files))
                b = model.encode_image(fast_pre.batch(files))
            cos = F.cosine_similarity(a, b, dim=-1)
            rows.append({"case": label, "exact_per_s": r_exact, "fast_per_s": r_fast, "cos_min": float(cos.min()),
                         "cos_mean": float(cos.mean()), "photos": len(files)})
    return rows


def onnx_rows(arch: str, args) -> list[dict]:
    try:
        import onnxruntime  # noqa: F401

        sys.path.insert(0, str(Path(__file__).parent))
        from onnx_backend import run as run_onnx
    except ImportError as exc:
        print(f"  (skipping ONNX Runtime: {exc})", file=sys.stderr)
        return []
    model = cliplab.create_model(arch, seed=0).eval()
    s = model.config.vision.image_size
    return run_onnx(model, load_captions(args.texts), torch.randn(args.image_batch, 3, s, s), args.repeats)


# --------------------------------------------------------------------------------------------------------------------
# report


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def report(meta: dict, peaks: dict, results: dict[str, list[dict]], fid: dict, decode: list[dict],
           onnx: list[dict]) -> str:
    lines = ["# cliplab inference benchmark", "",
             f"{meta['cpu']}, {meta['threads']} torch threads, torch {meta['torch']}, transformers "
             f"{meta['transformers']}; {meta['date']}. Captions: {meta['captions_source']}.", "",
             f"Measured matmul peaks: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s "
             f"({peaks['bf16'] / peaks['fp32']:.1f}x).", ""]
    for arch, rows in results.items():
        by = {r["path"]: r for r in rows}
        hf32 = rows[0]
        ov = by.get("openvino bf16") or by.get("openvino fp32")
        pad77 = ", ".join(f"{r['texts_per_s_pad77']:.0f} {r['path'].split(' ', 1)[1]}" for r in rows
                          if "texts_per_s_pad77" in r)
        vs = f"vs {ov['path']}" if ov else "vs OpenVINO"
        lines += [f"## {arch}", "",
                  f"{meta['texts']} captions (mean {rows[0]['mean_tokens']:.1f} tokens with SOT/EOT); transformers "
                  f"padded to 77 tokens: {pad77} texts/s ({meta['texts_77']} captions).", "",
                  f"| path | texts/s | vs tf fp32 | {vs} | images/s (64) | vs tf fp32 | {vs} | images/s (1) | {vs} "
                  "| text query ms | image ms | min cos img | min cos text | image MFU | peak MB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            mem = f"{r['peak_memory_mb']:.0f}" if "peak_memory_mb" in r else "-"
            mfu = f"{100 * r['image_mfu']:.0f}%" if r["image_mfu"] is not None else "-"
            vs_ov = (lambda key: ratio(r[key], ov[key]) if ov else "-")
            lines.append(
                f"| {r['path']} | {r['texts_per_s']:.0f} | {ratio(r['texts_per_s'], hf32['texts_per_s'])} | "
                f"{vs_ov('texts_per_s')} | {r['images_per_s_64']:.1f} | "
                f"{ratio(r['images_per_s_64'], hf32['images_per_s_64'])} | {vs_ov('images_per_s_64')} | "
                f"{r['images_per_s_1']:.1f} | {vs_ov('images_per_s_1')} | "
                f"{r['text_latency_ms']:.1f} | {r['image_latency_ms']:.0f} | {r['image_min_cos']:.6f} | "
                f"{r['text_min_cos']:.6f} | {mfu} | {mem} |")
        for label in ("cliplab compiled", "cliplab fast compiled", "cliplab fast compiled max-autotune"):
            if label in by:
                lines += ["", f"{label}: first call of each tower (compilation included) took " + ", ".join(
                    f"{tower} {sec:.0f} s" for tower, sec in by[label]["compile_s"].items() if sec is not None)
                    + " in this process (inductor's on-disk cache may have shortened it)."]
        lines.append("")
    lines += ["MFU: matmul FLOPs of the work done (padding not counted) per second over the measured peak of the "
              "path's precision (fp32 paths: fp32 peak; bf16 paths: bf16 peak; none for int8). Min cos: each path's "
              f"features against cliplab exact on the timed inputs (random pixels, the captions). Paths: "
              f"{', '.join(meta['paths'])}.", ""]
    if fid:
        lines += [f"## Fast mode fidelity ({meta['fidelity_arch']}, random weights, real inputs)", "",
                  f"- captions ({fid['captions']}): cosine to exact min {fid['text_cos_min']:.5f}, "
                  f"mean {fid['text_cos_mean']:.5f}"]
        if "image_cos_min" in fid:
            lines += [f"- photos ({fid['photos']}, same pixels): cosine min {fid['image_cos_min']:.5f}, mean "
                      f"{fid['image_cos_mean']:.5f}",
                      f"- text->image top-10 overlap, fast vs exact, one caption per photo: "
                      f"{100 * fid['top10_overlap']:.1f}% (random weights: nearly flat similarities)"]
        lines += [f"- trained model (shapes-tiny), {fid['trained_scenes']} held-out synthetic scenes, short captions: "
                  f"text->image top-10 overlap {100 * fid['trained_top10_overlap']:.1f}%, cosine min "
                  f"{fid['trained_text_cos_min']:.5f} (captions) / {fid['trained_image_cos_min']:.5f} (images)", ""]
    if decode:
        lines += ["## Image decode and preprocessing (one process, PIL)", "",
                  "| case | photos | exact photos/s | fast (draft) photos/s | speed-up | feature cos min | mean |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in decode:
            lines.append(f"| {r['case']} | {r['photos']} | {r['exact_per_s']:.0f} | {r['fast_per_s']:.0f} | "
                         f"{ratio(r['fast_per_s'], r['exact_per_s'])} | {r['cos_min']:.4f} | {r['cos_mean']:.4f} |")
        lines.append("")
    if onnx:
        keys = list(onnx[0])
        lines += ["## ONNX Runtime backend", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in onnx:
            lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="ViT-B-32-quickgelu,ViT-B-16-quickgelu")
    ap.add_argument("--texts", type=int, default=2048, help="captions for texts/s")
    ap.add_argument("--texts-77", type=int, default=512, help="captions for transformers' 77-token padding figure")
    ap.add_argument("--image-batch", type=int, default=64)
    ap.add_argument("--photos", type=int, default=1000, help="Flickr8k photos for the fidelity study")
    ap.add_argument("--decode-photos", type=int, default=200)
    ap.add_argument("--scenes", type=int, default=1000, help="synthetic scenes for the trained-model fidelity")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-memory", dest="memory", action="store_false")
    ap.add_argument("--no-onnx", dest="onnx", action="store_false")
    ap.add_argument("--families", default="",
                    help="also time these SigLIP / ResNet archs against their references (benchmarks/families.py), "
                         "e.g. ViT-B-16-SigLIP,RN50-quickgelu")
    ap.add_argument("--quick", action="store_true", help="ViT-B-32 only, fewer inputs (a few minutes)")
    ap.add_argument("--out", help="also write the Markdown report (and a .json of the raw figures) here")
    ap.add_argument("--paths", help="comma-separated paths to run (default: every installed one; bf16 paths only "
                                    "on a CPU with native bf16): " + ", ".join(PATHS))
    ap.add_argument("--probe-memory", nargs=4, metavar=("ARCH", "PATH", "BATCH", "EXPORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe_memory:
        arch, label, batch, export_dir = args.probe_memory
        probe_memory(arch, label, int(batch), export_dir)
        return
    if args.quick:
        args.archs, args.texts, args.texts_77, args.photos, args.decode_photos, args.repeats = \
            "ViT-B-32-quickgelu", 1024, 256, 300, 100, 2
        args.scenes = 300
    import transformers

    meta = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"), "texts": args.texts, "texts_77": args.texts_77,
            "captions_source": "Flickr8k all_captions.csv" if (DATA / "all_captions.csv").exists()
            else "synthetic sentences (shared data absent)"}
    try:
        meta["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        pass
    args.paths = args.paths.split(",") if args.paths else default_paths()
    unknown = set(args.paths) - set(PATHS)
    if unknown or args.paths[:1] != ["transformers fp32"] or "cliplab exact" not in args.paths:
        ap.error(f"--paths: start with 'transformers fp32', include 'cliplab exact', choose from {list(PATHS)}"
                 + (f" (unknown: {sorted(unknown)})" if unknown else ""))
    meta["paths"] = args.paths
    print("measuring matmul peaks", file=sys.stderr, flush=True)
    peaks = matmul_peaks()
    archs = args.archs.split(",")
    with tempfile.TemporaryDirectory() as export_root:
        args.export_root = Path(export_root)
        results = {arch: measure_arch(arch, args, peaks) for arch in archs}
    meta["fidelity_arch"] = archs[0]
    print("fast-mode fidelity", file=sys.stderr, flush=True)
    fid = fidelity(archs[0], args)
    print("decode study", file=sys.stderr, flush=True)
    decode = decode_study(args)
    onnx = onnx_rows(archs[0], args) if args.onnx else []
    text = report(meta, peaks, results, fid, decode, onnx)
    if args.families:
        import families

        fam_args = argparse.Namespace(image_batch=16, texts=256, text_batch=64, repeats=args.repeats)
        fam = {arch: families.measure(arch, fam_args) for arch in args.families.split(",")}
        text += "\n" + families.report(meta, fam, fam_args).replace("# Other families", "## Other families", 1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(
            {"meta": meta, "peaks": peaks, "results": results, "fidelity": fid, "decode": decode, "onnx": onnx},
            indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
