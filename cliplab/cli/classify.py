"""``cliplab classify``: zero-shot classification of image files against a label list."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from .app import emit, main
from .embed import MODEL_HELP, fail, warnings_to_stderr


def _read_labels(labels: str | None, labels_file: str | None) -> list[str]:
    if (labels is None) == (labels_file is None):
        raise click.UsageError("give the classes with exactly one of --labels a,b,c or --labels-file FILE")
    if labels is not None:
        out = [s.strip() for s in labels.split(",")]
    else:
        text = Path(labels_file).read_text(encoding="utf-8")
        if labels_file.endswith(".json"):
            data = json.loads(text)
            data = data.get("classes", data) if isinstance(data, dict) else data
            out = [c if isinstance(c, str) else str(c[0]) for c in data]
        else:
            out = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    out = [s for s in out if s]
    if len(out) < 2:
        raise click.BadParameter(f"need at least two labels, got {out}", param_hint="--labels/--labels-file")
    if len(set(out)) != len(out):
        raise click.BadParameter("labels must be distinct", param_hint="--labels/--labels-file")
    return out


def _expand(images: tuple[str, ...], all_files: bool) -> list[str]:
    from ..pipeline.sources import FolderSource

    out: list[str] = []
    for p in images:
        if os.path.isdir(p):
            out.extend(it.path for it in FolderSource(p, all_files=all_files).iter_items())
        else:
            out.append(p)
    return out


@main.command("classify")
@click.argument("images", nargs=-1, required=True)
@click.option("--labels", default=None, help="Comma-separated class names, e.g. --labels cat,dog,bird.")
@click.option("--labels-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Class names, one per line (or a JSON list / {\"classes\": [...]}).")
@click.option("--templates", "templates", default="generic", show_default=True,
              help="Prompt templates: a shipped set (generic, single, synthetic), a .txt/.json file, or "
                   "prompts.md#Dataset.")
@click.option("--template", "template_list", multiple=True,
              help="A template such as 'a photo of a {}.' (repeatable; replaces --templates).")
@click.option("--topk", "-k", type=click.IntRange(1), default=5, show_default=True, help="Classes shown per image.")
@click.option("--model", "-m", default=None, help=MODEL_HELP + " [default: shapes-tiny, the shipped model]")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--all-files", is_flag=True, help="In folders, try every file, not only image extensions.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def classify_cmd(images, labels, labels_file, templates, template_list, topk, model, batch_size, all_files, as_json):
    """Classify IMAGES (files or folders) zero-shot among the given labels.

    Each label is put into every prompt template, the prompts are encoded and averaged into one text embedding
    per class (CLIP's prompt ensembling), and each image gets its top-k classes with softmax probabilities.
    Images that cannot be read are reported (exit status 1) without stopping the others.

    \b
    Example:
      cliplab classify a.png b.jpg --labels "red circle,blue square,green star" --templates synthetic
    """
    import numpy as np
    import torch

    from ..models.preprocess import ImageLoadError
    from ..pipeline import resolve_model
    from ..zeroshot import ZeroShotClassifier

    classes = _read_labels(labels, labels_file)
    paths = _expand(images, all_files)
    if not paths:
        raise click.UsageError("no image files found in the given folders")
    with warnings_to_stderr():
        net, _ = resolve_model(model)
        tmpl = list(template_list) if template_list else templates
        clf = ZeroShotClassifier.from_classnames(net, classes, tmpl)
        pre = net.preprocessor
        results: list[dict] = []
        ok_pixels, ok_rows = [], []
        for p in paths:
            try:
                ok_pixels.append(pre(p).numpy())
                ok_rows.append(len(results))
                results.append({"image": p})
            except ImageLoadError as e:
                results.append({"image": p, "error": e.reason})
        for start in range(0, len(ok_pixels), batch_size):
            x = torch.from_numpy(np.stack(ok_pixels[start:start + batch_size]))
            for row, top in zip(ok_rows[start:start + batch_size], clf.classify(x, topk=topk)):
                results[row]["top"] = [{"label": lab, "prob": round(prob, 6)} for lab, prob in top]
    n_failed = sum(1 for r in results if "error" in r)
    data = {"model": net.config.name, "labels": classes, "templates": len(clf.prompts[0][0]) if clf.prompts else None,
            "results": results, "failed": n_failed}

    def render(d):
        rows = []
        for r in d["results"]:
            if "error" in r:
                rows.append([r["image"], "-", "error", r["error"]])
                continue
            for j, t in enumerate(r["top"]):
                rows.append([r["image"] if j == 0 else "", j + 1, t["label"], f"{t['prob']:.4f}"])
        from .index import render_table

        render_table(f"zero-shot: {len(classes)} labels x {d['templates']} templates ({d['model']})",
                     ["image", "#", "label", "prob"], rows)

    emit(data, as_json, render)
    if n_failed:
        fail(f"{n_failed} of {len(results)} image(s) could not be read", 1)
