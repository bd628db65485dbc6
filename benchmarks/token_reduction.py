"""Speed against accuracy of the vision-token reducers (``cliplab.vision_tokens``), side by side in one process.

Every reducer runs once inside the ViT, before block ``L`` (``--at``: fractions of the depth, ``L = max(1,
round(f * depth))``, so a reducer that reads attention has a block before it), at several keep ratios (the share of
patch tokens that go on). Two measurements:

* **speed**: images/s of ``encode_image_reduced`` on ``ViT-B-16`` (random weights, batch 64, fp32 and bf16) against
  the plain ``model.encode_image`` (the library's own best path, 1.0x), timed in turn, round after round, best round
  counts (``common.interleaved``), so a drift in machine speed hits all paths alike;
* **accuracy**: the shipped model ``shapes-tiny`` on its synthetic tasks: retrieval R@1 (image->text and text->image,
  ``synthetic-retrieval``) and zero-shot accuracy (``synthetic-zeroshot``, colour+shape classes), each reducer at the
  same keep ratios and the same relative layer.

Text-guided reducers (``recoverable_compression``) get, in the speed runs, random unit text features; in the accuracy
runs, the mean of the task's normalised text features (every caption / every class prompt): one query-agnostic
guidance per task, so the image embeddings stay one per image (see docs/methods/recoverable_compression.md).

Run on a quiet machine (figures go to the docs)::

    python benchmarks/token_reduction.py --out benchmarks/results/token-reduction-DATE.md --plots docs/img
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import cliplab
from cliplab.models.hardware import native_bf16
from cliplab.vision_tokens import encode_image_reduced, reduced_image_flops

from common import interleaved  # the side-by-side timer shared with suite.py (same directory)


@dataclass(frozen=True)
class Method:
    name: str
    family: str                            # one plot per family
    make: Callable[[float, object], object]  # (keep ratio, model) -> reducer
    text_guided: bool = False


FAMILIES = {"tome": "merging", "keep-random": "pruning", "keep-cls-attention": "pruning", "centerclip": "clustering",
            "tcc_compress": "pruning", "recoverable_compression": "merging"}


def methods() -> dict[str, Method]:
    """The reducers compared: every registered one (the baselines and each seed method of ``cliplab.vision_tokens``)."""
    from cliplab.vision_tokens import get_reducer, list_reducers

    table = {}
    for name in list_reducers():
        entry = get_reducer(name)
        table[name] = Method(name, FAMILIES.get(name, "other"), entry.build, entry.text_guided)
    return table


BASELINES = ("tome", "keep-random", "keep-cls-attention")


def layer_at(fraction: float, depth: int) -> int:
    return max(1, min(depth, round(fraction * depth)))


def _autocast_none():
    return nullcontext()


# --- speed ------------------------------------------------------------------------------------------------------------
def measure_speed(args, chosen: list[Method]) -> list[dict]:
    rows = []
    dtypes = ["fp32"] + (["bf16"] if args.bf16 != "off" and (native_bf16() or args.bf16 == "on") else [])
    for dtype in dtypes:
        model = cliplab.create_model(args.arch, seed=0).eval()
        if dtype == "bf16":
            model.set_precision("bf16")
        res = model.config.vision.image_size
        pixels = torch.randn(args.batch, 3, res, res, generator=torch.Generator().manual_seed(0)).to(model.dtype)
        text = F.normalize(torch.randn(args.batch, model.config.embed_dim), dim=-1).to(model.dtype)
        depth = len(model.visual.transformer.blocks)
        fns = {"plain encode_image": lambda: model.encode_image(pixels)}
        where = {"plain encode_image": (None, 1.0, None)}
        flops = {"plain encode_image": reduced_image_flops(model.config, [model.visual.n_prefix
                                                                          + model.config.vision.grid_size ** 2] * depth)}
        for frac in args.at:
            layer = layer_at(frac, depth)
            for m in chosen:
                for keep in args.keep:
                    label = f"{m.name} keep={keep} L={layer}"
                    where[label] = (m.name, keep, frac)
                    reducer = m.make(keep, model)
                    guide = text if m.text_guided else None
                    fns[label] = (lambda r=reducer, g=guide, L=layer:
                                  encode_image_reduced(model, pixels, r, layer=L, text=g))
                    with torch.inference_mode():
                        out = encode_image_reduced(model, pixels[:2], reducer, layer=layer, text=None if guide is None
                                                   else guide[:2])
                    flops[label] = reduced_image_flops(model.config, out.extras["tokens_per_layer"])
        ctxs = {label: _autocast_none for label in fns}
        t0 = time.perf_counter()
        rates = interleaved(fns, args.batch, args.repeats, ctxs)
        print(f"[speed {dtype}] {len(fns)} paths timed in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        base = rates["plain encode_image"]
        for label, rate in rates.items():
            method, keep, frac = where[label]
            rows.append({"dtype": dtype, "path": label, "method": method, "keep": keep, "at": frac,
                         "images_per_s": round(rate, 2),
                         "speedup": round(rate / base, 3), "gflops_per_image": round(flops[label] / 1e9, 3)})
    return rows


# --- accuracy ---------------------------------------------------------------------------------------------------------
def _pixels(model, items) -> torch.Tensor:
    return model.preprocessor.batch([it.load() for it in items])


def _encode(model, pixels, reducer, layer, guide, batch=128) -> torch.Tensor:
    feats = []
    with torch.inference_mode():
        for i in range(0, len(pixels), batch):
            p = pixels[i: i + batch]
            if reducer is None:
                feats.append(model.encode_image(p))
            else:
                g = None if guide is None else guide.expand(len(p), -1)
                feats.append(encode_image_reduced(model, p, reducer, layer=layer, text=g).pooled)
    return F.normalize(torch.cat(feats).float(), dim=-1)


def measure_accuracy(args, chosen: list[Method]) -> list[dict]:
    from cliplab.eval.datasets import load_dataset

    model = cliplab.load(args.accuracy_model).eval()
    depth = len(model.visual.transformer.blocks)
    ret = load_dataset("synthetic-retrieval", n=args.retrieval_n, seed=1)
    zs = load_dataset("synthetic-zeroshot", kind="colour_shape", n_per_class=args.zeroshot_per_class, seed=1)
    with torch.inference_mode():
        captions = F.normalize(model.encode_texts(ret.captions).float(), dim=-1)
        prompts = [p for group in zs.prompts for p in group]
        counts = torch.tensor([len(g) for g in zs.prompts])
        prompt_feats = F.normalize(model.encode_texts(prompts).float(), dim=-1)
        owner = torch.repeat_interleave(torch.arange(len(counts)), counts)
        classes = F.normalize(torch.zeros(len(counts), prompt_feats.shape[1]).index_add_(0, owner, prompt_feats), dim=-1)
    guides = {"retrieval": F.normalize(captions.mean(0, keepdim=True), dim=-1),
              "zeroshot": F.normalize(classes.mean(0, keepdim=True), dim=-1)}
    ret_pixels, zs_pixels = _pixels(model, ret.items), _pixels(model, zs.items)
    labels = torch.tensor(zs.labels)
    truth = torch.arange(len(ret.items))

    def score(reducer, layer, text_guided):
        g = guides if text_guided else {"retrieval": None, "zeroshot": None}
        img = _encode(model, ret_pixels, reducer, layer, g["retrieval"])
        sim = img @ captions.t()
        i2t = (sim.argmax(1) == truth).float().mean().item() * 100
        t2i = (sim.argmax(0) == truth).float().mean().item() * 100
        zimg = _encode(model, zs_pixels, reducer, layer, g["zeroshot"])
        acc = ((zimg @ classes.t()).argmax(1) == labels).float().mean().item() * 100
        return {"retrieval_i2t_r1": round(i2t, 2), "retrieval_t2i_r1": round(t2i, 2), "zeroshot_acc": round(acc, 2)}

    t0 = time.perf_counter()
    rows = [{"path": "plain encode_image", "keep": 1.0, "at": None, "layer": None, **score(None, None, False)}]
    print(f"[accuracy] plain: {rows[0]} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    for frac in args.at:
        layer = layer_at(frac, depth)
        for m in chosen:
            for keep in args.keep:
                t0 = time.perf_counter()
                rows.append({"path": m.name, "family": m.family, "keep": keep, "at": frac, "layer": layer,
                             **score(m.make(keep, model), layer, m.text_guided)})
                print(f"[accuracy] {m.name} keep={keep} L={layer}: {rows[-1]} ({time.perf_counter() - t0:.1f} s)",
                      file=sys.stderr)
    return rows


# --- report -----------------------------------------------------------------------------------------------------------
def report(meta: dict, speed: list[dict], accuracy: list[dict]) -> str:
    lines = ["# Vision-token reduction: speed and accuracy", "",
             f"{meta['date']}, {meta['cpu']}, torch {meta['torch']}, {meta['threads']} threads. Speed: "
             f"`{meta['arch']}` random weights, batch {meta['batch']}, best of {meta['repeats']} interleaved rounds "
             f"(speed-up against the plain `encode_image` of the same precision, in the same run). Accuracy: "
             f"`{meta['accuracy_model']}` on synthetic-retrieval (n={meta['retrieval_n']}) and synthetic-zeroshot "
             f"(colour+shape, {meta['zeroshot_per_class']} per class).", ""]
    if meta.get("bf16_note"):
        lines += [meta["bf16_note"], ""]
    if speed:
        lines += ["## Speed", "", "| precision | path | images/s | speed-up | GFLOPs/image |", "|---|---|---:|---:|---:|"]
        lines += [f"| {r['dtype']} | {r['path']} | {r['images_per_s']} | {r['speedup']:.2f}x | {r['gflops_per_image']} |"
                  for r in speed]
        lines.append("")
    if accuracy:
        lines += ["## Accuracy", "", "| path | keep | layer | retrieval i2t R@1 | t2i R@1 | zero-shot acc |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['path']} | {r['keep']} | {r['layer'] if r['layer'] is not None else '-'} | "
                  f"{r['retrieval_i2t_r1']} | {r['retrieval_t2i_r1']} | {r['zeroshot_acc']} |" for r in accuracy]
        lines.append("")
    return "\n".join(lines)


def plots(speed: list[dict], accuracy: list[dict], chosen: list[Method], folder: Path, dtype: str = "fp32") -> list[str]:
    """One figure per method family: mean retrieval R@1 against images/s (speed on ViT-B-16, accuracy on the shipped
    model at the same keep ratio and relative layer), the plain forward as a star."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rate_of = {(r["method"], r["keep"], r["at"]): r["images_per_s"] for r in speed if r["dtype"] == dtype}
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    plain_acc = next(r for r in accuracy if r["path"] == "plain encode_image")
    plain = (rate_of.get((None, 1.0, None)), (plain_acc["retrieval_i2t_r1"] + plain_acc["retrieval_t2i_r1"]) / 2)
    baselines = [m for m in chosen if m.name in BASELINES]
    for family in sorted({m.family for m in chosen if m.name not in BASELINES}):
        fig, ax = plt.subplots(figsize=(5.2, 3.6))
        for m in [m for m in chosen if m.family == family and m.name not in BASELINES] + baselines:
            for frac in sorted({r["at"] for r in accuracy if r["path"] == m.name}):
                pts = sorted((rate_of[(m.name, r["keep"], frac)], (r["retrieval_i2t_r1"] + r["retrieval_t2i_r1"]) / 2)
                             for r in accuracy if r["path"] == m.name and r["at"] == frac
                             and (m.name, r["keep"], frac) in rate_of)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o--" if m in baselines else "o-",
                            label=f"{m.name} @{frac:g} depth")
        if plain[0] is not None:
            ax.plot([plain[0]], [plain[1]], "k*", ms=12, label="plain")
        ax.set_xlabel(f"ViT-B-16 images/s ({dtype}, batch 64)")
        ax.set_ylabel("shapes-tiny retrieval R@1 (mean of i2t, t2i)")
        ax.set_title(f"token reduction: {family}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / f"token_reduction_{family}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ViT-B-16")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--keep", default="0.75,0.5,0.25", help="keep ratios (share of patch tokens that go on)")
    ap.add_argument("--at", default="0.1", help="reduction layers as fractions of the depth")
    ap.add_argument("--methods", default=None, help="comma-separated subset (default: all)")
    ap.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                    help="auto: time bf16 only where the CPU has native bf16")
    ap.add_argument("--accuracy-model", default="shapes-tiny")
    ap.add_argument("--retrieval-n", type=int, default=300)
    ap.add_argument("--zeroshot-per-class", type=int, default=3)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--speed-from", help="reuse the speed rows (and their machine facts) of an earlier run's .json")
    ap.add_argument("--accuracy-from", help="reuse the accuracy rows of an earlier run's .json (accuracy does not "
                                            "depend on a quiet machine; speed does)")
    ap.add_argument("--out", help="also write the Markdown report (and a .json of the raw figures) here")
    ap.add_argument("--plots", help="folder for the per-family figures (accuracy vs images/s)")
    args = ap.parse_args()
    args.keep = [float(x) for x in args.keep.split(",")]
    args.at = [float(x) for x in args.at.split(",")]
    table = methods()
    names = args.methods.split(",") if args.methods else list(table)
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {sorted(table)}")
    chosen = [table[n] for n in names]
    meta = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "arch": args.arch, "batch": args.batch,
            "repeats": args.repeats, "accuracy_model": args.accuracy_model, "retrieval_n": args.retrieval_n,
            "zeroshot_per_class": args.zeroshot_per_class}
    try:
        meta["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        pass
    if args.bf16 == "auto" and not native_bf16():
        meta["bf16_note"] = ("bf16 not timed: this CPU has no native bf16 (bf16 matmuls run far slower than fp32 "
                             "here; see docs/fast_path.md). Re-run with --bf16 on to time it anyway.")
    if args.speed_from:
        earlier = json.loads(Path(args.speed_from).read_text())
        speed = [r for r in earlier["speed"] if r["method"] in names or r["method"] is None]
        meta.update({k: earlier["meta"][k] for k in ("date", "cpu", "torch", "threads", "arch", "batch", "repeats")})
        if "bf16_note" in earlier["meta"]:
            meta["bf16_note"] = earlier["meta"]["bf16_note"]
    else:
        speed = [] if args.skip_speed else measure_speed(args, chosen)
    if args.accuracy_from:
        earlier = json.loads(Path(args.accuracy_from).read_text())
        accuracy = [r for r in earlier["accuracy"] if r["path"] in names or r["path"] == "plain encode_image"]
        meta.update({k: earlier["meta"][k] for k in ("accuracy_model", "retrieval_n", "zeroshot_per_class")})
    else:
        accuracy = [] if args.skip_accuracy else measure_accuracy(args, chosen)
    text = report(meta, speed, accuracy)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "speed": speed, "accuracy": accuracy},
                                                       indent=1) + "\n")
    if args.plots and speed and accuracy:
        print("\n".join(plots(speed, accuracy, chosen, Path(args.plots))), file=sys.stderr)


if __name__ == "__main__":
    main()
