"""Evaluation reports: ``results.json`` (everything), ``summary.md`` (the headline numbers) and, for zero-shot
classification, ``confusion.png`` (matplotlib with the Agg backend; a plain Pillow heat map when matplotlib is not
installed). :func:`render_text` is the same summary as plain text, for a terminal (what ``cliplab eval`` prints).

``results.json`` is indented JSON whose innermost lists (per-class recall, confusion rows or cells, class names) are
written one per line, so even a 1000-class run stays small and readable."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from .metrics import dense_confusion, most_confused

__all__ = ["write_report", "render_markdown", "render_text", "save_confusion_png", "results_json"]


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _pct(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def render_markdown(results: dict[str, Any]) -> str:
    task = results.get("task", "?")
    ds, model, m = results.get("dataset", {}), results.get("model", {}), results.get("metrics", {})
    lines = [f"# {task} evaluation: {ds.get('name', '?')}", "",
             f"- model: `{model.get('source', model.get('name', '?'))}` ({model.get('name', '?')}, id `{model.get('id')}`)"]
    if ds.get("options"):
        lines.append(f"- dataset options: `{json.dumps(ds['options'], default=str)}`")
    if task == "zeroshot":
        p = results.get("prompts", {})
        lines += [f"- {results['num_images']} images, {results['num_classes']} classes",
                  f"- prompts: {p.get('source')}" + (f"#{p['dataset']}" if p.get("dataset") else "")
                  + (f", {p['templates']} templates" if p.get("templates") else f", {p.get('count')} prompts")
                  + (f", {p['descriptions']} descriptions ({p['description_mode']})" if p.get("descriptions") else ""),
                  "", "| metric | value (%) | chance (%) |", "|---|---|---|",
                  f"| top-1 accuracy | {_pct(m['top1'])} | {_pct(m['chance_top1'])} |",
                  f"| top-5 accuracy | {_pct(m['top5'])} | {_pct(m['chance_top5'])} |",
                  f"| mean per-class recall | {_pct(m['mean_per_class_recall'])} | {_pct(m['chance_top1'])} |"]
        names, rec = results.get("classnames", []), m.get("per_class_recall", [])
        if names and len(names) <= 50:
            lines += ["", "| class | recall (%) |", "|---|---|"]
            lines += [f"| {n} | {_pct(r)} |" for n, r in zip(names, rec)]
        pairs = _confused_pairs(results)
        if pairs:
            lines += ["", "The most confused classes:", "", "| true class | predicted as | images |", "|---|---|---|"]
            lines += [f"| {t} | {p} | {n} |" for t, p, n in pairs]
        for note in results.get("notes", []):
            lines.append(f"\nNote: {note}")
    elif task == "retrieval":
        ch = m.get("chance", {})
        lines += [f"- {results['num_images']} images, {results['num_texts']} captions", "",
                  "| direction | R@1 | R@5 | R@10 | median rank |", "|---|---|---|---|---|"]
        for d, label in (("image_to_text", "image -> text"), ("text_to_image", "text -> image")):
            lines.append(f"| {label} | " + " | ".join(_pct(m[d][f'R@{k}']) for k in (1, 5, 10))
                         + f" | {_fmt(m[d]['median_rank'])} |")
            lines.append(f"| {label} (chance) | " + " | ".join(_pct(ch[d][f'R@{k}']) for k in (1, 5, 10)) + " | |")
    elif task == "clipscore":
        lines += [f"- {results['num_images']} images, {results['num_texts']} captions", "",
                  "| metric | value |", "|---|---|",
                  f"| CLIPScore (w={m['w']}) | {_fmt(m['clipscore'])} |",
                  f"| RefCLIPScore ({m['refclipscore_captions']} captions with references) | {_fmt(m['refclipscore'])} |"]
    elif task == "winoground":
        ch = m.get("chance", {})
        lines += [f"- {results['num_pairs']} pairs", "", "| subset | pairs | text | image | group |",
                  "|---|---|---|---|---|",
                  f"| all | {results['num_pairs']} | {_pct(m['text_score'])} | {_pct(m['image_score'])} "
                  f"| {_pct(m['group_score'])} |"]
        for kind, r in m.get("by_kind", {}).items():
            lines.append(f"| {kind} | {r['pairs']} | {_pct(r['text_score'])} | {_pct(r['image_score'])} "
                         f"| {_pct(r['group_score'])} |")
        lines.append(f"| chance | | {_pct(ch.get('text_score'))} | {_pct(ch.get('image_score'))} "
                     f"| {_pct(ch.get('group_score'))} |")
    else:  # a task registered by a method module (sce, fclipscore, ...): its scalar metrics
        lines += [_counts_line(results, "- "), "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in _scalar_metrics(m)]
    cache, timing = results.get("cache", {}), results.get("timing", {})
    if cache:
        lines += ["", f"Embeddings: images {cache['image']['cached']} cached / {cache['image']['encoded']} encoded, "
                      f"texts {cache['text']['cached']} cached / {cache['text']['encoded']} encoded "
                      f"(cache: `{cache.get('dir')}`)."]
    if timing:
        lines.append("Time: " + ", ".join(f"{k} {v:.1f}" for k, v in timing.items()) + " (seconds).")
    if results.get("files", {}).get("confusion_png"):
        lines += ["", "![confusion matrix](confusion.png)"]
    return "\n".join(lines) + "\n"


def _scalar_metrics(m: dict[str, Any]) -> list[list[str]]:
    """``[name, value]`` of every number, string or boolean metric (nested tables are left to results.json)."""
    return [[k, _fmt(v) if isinstance(v, float) else str(v)] for k, v in m.items()
            if isinstance(v, (int, float, str, bool)) or v is None]


def _counts_line(results: dict[str, Any], prefix: str) -> str:
    parts = [f"{results[k]} {label}" for k, label in (("num_images", "images"), ("num_texts", "captions"),
                                                       ("num_pairs", "pairs")) if k in results]
    return prefix + (", ".join(parts) or "results")


def _confused_pairs(results: dict[str, Any], k: int = 10) -> list[tuple[str, str, int]]:
    m, names = results.get("metrics", {}), results.get("classnames", [])
    if m.get("confusion_matrix") is None and m.get("confusion") is None:
        return []

    def name(i):
        return names[i] if i < len(names) else str(i)

    return [(name(t), name(p), n) for t, p, n in most_confused(m, k)]


def _model_line(results: dict[str, Any]) -> str:
    model = results.get("model", {})
    name, source = model.get("name", "?"), model.get("source")
    text = name if source in (None, name) else f"{source} ({name})"
    if model.get("random_init") or model.get("kind") == "random":
        text += f", random weights (seed {model.get('seed', 0)})"
    return text


def _text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> list[str]:
    """Aligned plain-text columns: the first left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for r in cells:
        parts = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        out.append((indent + "   ".join(parts)).rstrip())
    return out


def _pct_s(v) -> str:
    p = _pct(v)
    return p if p == "n/a" else p + "%"


def render_text(results: dict[str, Any]) -> str:
    """The summary as plain text for a terminal: no Markdown syntax, aligned columns, the files written last."""
    task = results.get("task", "?")
    ds, m = results.get("dataset", {}), results.get("metrics", {})
    lines = [f"{task} evaluation on {ds.get('name', '?')}", f"  model: {_model_line(results)}"]
    if ds.get("options"):
        lines.append("  dataset options: " + ", ".join(f"{k}={v}" for k, v in ds["options"].items()))
    if task == "zeroshot":
        p = results.get("prompts", {})
        lines.append(f"  {results['num_images']} images, {results['num_classes']} classes; prompts: {p.get('source')}"
                     + (f"#{p['dataset']}" if p.get("dataset") else "")
                     + (f", {p['templates']} templates" if p.get("templates") else f", {p.get('count')} prompts")
                     + (f", {p['descriptions']} descriptions ({p['description_mode']})"
                        if p.get("descriptions") else ""))
        lines += [""] + _text_table(["metric", "value", "chance"], [
            ["top-1 accuracy", _pct_s(m["top1"]), _pct_s(m["chance_top1"])],
            ["top-5 accuracy", _pct_s(m["top5"]), _pct_s(m["chance_top5"])],
            ["mean per-class recall", _pct_s(m["mean_per_class_recall"]), _pct_s(m["chance_top1"])]])
        names, rec = results.get("classnames", []), m.get("per_class_recall", [])
        if names and len(names) <= 20:
            lines += ["", "  per-class recall:"] + _text_table(["class", "recall"],
                                                                  [[n, _pct_s(r)] for n, r in zip(names, rec)],
                                                                  indent="    ")
        pairs = _confused_pairs(results, 5)
        if pairs:
            lines += ["", "  most confused:"] + _text_table(["true class", "predicted as", "images"], pairs,
                                                               indent="    ")
        for note in results.get("notes", []):
            lines.append(f"  note: {note}")
    elif task == "retrieval":
        ch = m.get("chance", {})
        lines.append(f"  {results['num_images']} images, {results['num_texts']} captions")
        rows = []
        for d, label in (("image_to_text", "image -> text"), ("text_to_image", "text -> image")):
            rows.append([label, *(_pct_s(m[d][f"R@{k}"]) for k in (1, 5, 10)), _fmt(m[d]["median_rank"])])
            rows.append(["  chance", *(_pct_s(ch[d][f"R@{k}"]) for k in (1, 5, 10)), ""])
        lines += [""] + _text_table(["direction", "R@1", "R@5", "R@10", "median rank"], rows)
    elif task == "clipscore":
        lines += [f"  {results['num_images']} images, {results['num_texts']} captions", ""] + _text_table(
            ["metric", "value"],
            [[f"CLIPScore (w={m['w']})", _fmt(m["clipscore"])],
             [f"RefCLIPScore ({m['refclipscore_captions']} captions with references)", _fmt(m["refclipscore"])]])
    elif task == "winoground":
        ch = m.get("chance", {})
        rows = [["all", results["num_pairs"], _pct_s(m["text_score"]), _pct_s(m["image_score"]),
                 _pct_s(m["group_score"])]]
        rows += [[k, r["pairs"], _pct_s(r["text_score"]), _pct_s(r["image_score"]), _pct_s(r["group_score"])]
                 for k, r in m.get("by_kind", {}).items()]
        rows.append(["chance", "", _pct_s(ch.get("text_score")), _pct_s(ch.get("image_score")),
                     _pct_s(ch.get("group_score"))])
        lines += [f"  {results['num_pairs']} pairs", ""] + _text_table(["subset", "pairs", "text", "image", "group"],
                                                                        rows)
    else:  # a task registered by a method module (sce, fclipscore, ...): its scalar metrics
        lines += [_counts_line(results, "  "), ""] + _text_table(["metric", "value"], _scalar_metrics(m))
    cache, timing = results.get("cache", {}), results.get("timing", {})
    lines.append("")
    if cache:
        lines.append(f"  embeddings: images {cache['image']['cached']} cached / {cache['image']['encoded']} encoded, "
                     f"texts {cache['text']['cached']} cached / {cache['text']['encoded']} encoded"
                     + (f" (cache: {cache['dir']})" if cache.get("dir") else " (no disk cache)"))
    if timing:
        lines.append("  time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in timing.items()))
    files = results.get("files") or {}
    if files:
        lines.append("  wrote: " + ", ".join(str(f) for f in files.values()))
    return "\n".join(lines) + "\n"


def save_confusion_png(matrix: Sequence[Sequence[int]], classnames: Sequence[str], path: str | Path,
                       title: str = "confusion matrix (row-normalised)") -> Path:
    """Row-normalised confusion matrix as a PNG (rows: true class, columns: predicted)."""
    import numpy as np

    path = Path(path)
    cm = np.asarray(matrix, dtype=np.float64)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    try:  # the object API on an explicit Agg canvas: no pyplot global state, no display needed
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return _confusion_png_pil(norm, path)

    n = len(classnames)
    size = min(4 + 0.35 * n, 20)
    fig = Figure(figsize=(size, size), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 40:
        ax.set_xticks(range(n), labels=list(classnames), rotation=90, fontsize=8)
        ax.set_yticks(range(n), labels=list(classnames), fontsize=8)
    if n <= 15:
        for r in range(n):
            for c in range(n):
                if cm[r, c]:
                    ax.text(c, r, str(int(cm[r, c])), ha="center", va="center", fontsize=7,
                            color="white" if norm[r, c] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path)
    return path


def _confusion_png_pil(norm, path: Path) -> Path:
    import numpy as np
    from PIL import Image

    n = norm.shape[0]
    cell = max(1, min(24, 720 // max(n, 1)))
    v = (255 * (1 - norm)).astype(np.uint8)  # white = 0, dark blue = 1
    rgb = np.stack([v, v, np.full_like(v, 255)], axis=-1) if n else np.zeros((1, 1, 3), np.uint8)
    img = Image.fromarray(rgb, "RGB").resize((max(n, 1) * cell,) * 2, Image.Resampling.NEAREST)
    img.save(path)
    return path


def write_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Write ``results.json``, ``summary.md`` (and ``confusion.png`` for zero-shot) into ``out_dir``; returns the
    paths, which are also recorded in the JSON under ``files``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / "results.json"), "markdown": str(out / "summary.md")}
    m = results.get("metrics", {})
    if results.get("task") == "zeroshot" and (m.get("confusion_matrix") is not None or m.get("confusion")):
        files["confusion_png"] = str(save_confusion_png(dense_confusion(m).numpy(), results["classnames"],
                                                        out / "confusion.png"))
    results["files"] = files
    _write_text(out / "results.json", results_json(results))
    _write_text(out / "summary.md", render_markdown(results))
    return files


def results_json(results: dict[str, Any]) -> str:
    """``results`` as the text of ``results.json``: indented objects, innermost lists on one line each."""
    plain = json.loads(json.dumps(results, default=_json_default, allow_nan=True))
    return _dumps(plain, 0) + "\n"


def _dumps(obj, level: int) -> str:
    pad = "  " * level
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        body = ",\n".join(f"{pad}  {json.dumps(k)}: {_dumps(v, level + 1)}" for k, v in obj.items())
        return "{\n" + body + f"\n{pad}}}"
    if isinstance(obj, list) and any(isinstance(x, (dict, list)) for x in obj):
        body = ",\n".join(f"{pad}  {_dumps(v, level + 1)}" for v in obj)
        return "[\n" + body + f"\n{pad}]"
    return json.dumps(obj, allow_nan=True)


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (Path, set, tuple)):
        return str(o) if isinstance(o, Path) else list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
