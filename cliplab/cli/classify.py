"""``cliplab classify``: zero-shot classification of image files against a label list."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import click

from .app import main
from .common import (
    emit,
    fail,
    json_option,
    model_option,
    backend_option,
    precision_option,
    with_backend,
    progress_option,
    render_table,
    shorten,
    top_k_option,
    warnings_to_stderr,
)

#: the table on a terminal shows this many images; the rest go to --out / --json
MAX_SHOWN = 20
CSV_COLUMNS = ["image", "rank", "label", "prob", "error"]


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
    where: dict[str, list[int]] = {}
    for i, s in enumerate(out):
        where.setdefault(s, []).append(i)
    dups = {s: ix for s, ix in where.items() if len(ix) > 1}
    if dups:
        listed = ", ".join(f"{s!r} ({', '.join(map(str, ix))})" for s, ix in dups.items())
        raise click.BadParameter(f"labels must be distinct; repeated (label indices): {listed}",
                                 param_hint="--labels/--labels-file")
    return out


def _expand(images: tuple[str, ...], all_files: bool) -> tuple[list[str], list[str], int]:
    """``(paths, folders, skipped)``: files as given, folders expanded (image extensions only unless
    ``all_files``); ``skipped`` counts the folders' files left out as non-images."""
    from ..pipeline.sources import FolderSource

    out: list[str] = []
    folders: list[str] = []
    skipped = 0
    for p in images:
        if os.path.isdir(p):
            src = FolderSource(p, all_files=all_files)
            out.extend(it.path for it in src.iter_items())
            folders.append(p)
            skipped += src.skipped
        else:
            out.append(p)
    return out, folders, skipped


def _write_csv(path: str, results: list[dict]) -> int:
    """One row per (image, rank): ``image,rank,label,prob,error``; an unreadable image is one row with only
    ``image`` and ``error``. Returns the number of rows."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in results:
            if "error" in r:
                w.writerow([r["image"], "", "", "", r["error"]])
                n += 1
                continue
            for t in r["top"]:
                w.writerow([r["image"], t["rank"], t["label"], f"{t['prob']:.6f}", ""])
                n += 1
    return n


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
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Learned prompts (a file from `cliplab train --preset coop` or mocoop) or a NoLA classifier (from "
                   "`cliplab train --preset nola`: visual prompts and a tuned head, on the model it was tuned from): "
                   "their classes replace --templates; --labels, if given, must name the same classes (and sets the "
                   "order).")
@top_k_option(default=5, help="Classes shown per image.")
@model_option()
@backend_option()
@precision_option(int8=True)
@click.option("--out", "-o", "out_file", type=click.Path(dir_okay=False), default=None,
              help="Write every result to this CSV file: one row per image and rank (image, rank, label, prob, "
                   "error).")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--all-files", is_flag=True, help="In folders, try every file, not only image extensions.")
@progress_option()
@json_option()
def classify_cmd(images, labels, labels_file, templates, template_list, prompts_file, top_k, model, backend, precision,
                 out_file, batch_size, all_files, progress, as_json):
    """Classify IMAGES (files or folders) zero-shot among the given labels.

    Each label is put into every prompt template, the prompts are encoded and averaged into one text embedding
    per class (CLIP's prompt ensembling), and each image gets its top-k classes with softmax probabilities.
    Images that cannot be read are reported (exit status 1) without stopping the others. The table shows the
    first 20 images; -o FILE.csv or --json has them all.

    \b
    Example:
      cliplab classify a.png b.jpg --labels "red circle,blue square,green star" --templates synthetic
      cliplab classify photos/ --labels-file classes.txt -k 3 -o predictions.csv
      cliplab classify photos/ --prompts runs/coop/prompts.safetensors
      cliplab classify shapes/ --prompts runs/nola/nola.safetensors     # a NoLA classifier
    """
    import numpy as np
    import torch

    from ..models.preprocess import ImageLoadError
    from ..pipeline import resolve_model
    from ..progress import Progress
    from ..zeroshot import ZeroShotClassifier

    if prompts_file is not None and (template_list or templates != "generic"):
        raise click.UsageError("--prompts replaces --templates/--template: give one or the other")
    learned = nola_meta = None
    if prompts_file is not None:
        from ..zeroshot import load_prompts
        from ..zeroshot.nola import is_nola_classifier_file, nola_classifier_metadata

        if is_nola_classifier_file(prompts_file):
            nola_meta = nola_classifier_metadata(prompts_file)
        else:
            try:
                learned = load_prompts(prompts_file)
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint="--prompts") from None
    if learned is not None and labels is None and labels_file is None:
        classes = list(learned.classnames)
    elif nola_meta is not None and labels is None and labels_file is None:
        classes = list(nola_meta["classnames"])
    else:
        classes = _read_labels(labels, labels_file)
    paths, folders, skipped = _expand(images, all_files)
    if not paths:
        where = ", ".join(folders)
        why = f"; {skipped} non-image file(s) skipped (--all-files tries every file)" if skipped else ""
        fail(f"no image files found in {where}{why}", 2)
    if skipped:
        click.echo(f"skipped {skipped} non-image file(s) in {', '.join(folders)} (--all-files tries every file)",
                   err=True)
    with warnings_to_stderr():
        net, _ = resolve_model(model)
        if (learned is not None or nola_meta is not None) and backend != "torch":
            raise click.UsageError("--prompts (learned prompt vectors) needs --backend torch")
        if nola_meta is not None and precision != "fp32":
            raise click.UsageError("a NoLA classifier (--prompts) runs in fp32: leave out --precision")
        net = with_backend(net, backend, precision)
        nola = None
        if nola_meta is not None:
            from ..zeroshot.nola import NoLAClassifier

            tuned_from = nola_meta["model"]
            if tuned_from and tuned_from != net.config.name:
                raise click.BadParameter(f"{prompts_file} was tuned from the model {tuned_from!r}, not "
                                         f"{net.config.name!r}: pass -m with the model it was tuned from",
                                         param_hint="--prompts")
            if sorted(classes) != sorted(nola_meta["classnames"]):
                raise click.BadParameter(f"{prompts_file} was tuned on the classes {nola_meta['classnames']}; "
                                         f"--labels names {classes}", param_hint="--prompts")
            try:
                nola = NoLAClassifier.load(prompts_file, net)
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint="--prompts") from None
            clf = None
        elif learned is not None:
            try:
                clf = ZeroShotClassifier.from_learned_prompts(net, learned, classnames=classes)
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint="--prompts") from None
        else:
            tmpl = list(template_list) if template_list else templates
            clf = ZeroShotClassifier.from_classnames(net, classes, tmpl, progress=progress)
        pre = net.preprocessor
        results: list[dict] = []
        with Progress(total=len(paths), desc="classify", unit="image", enabled=progress) as bar:
            for start in range(0, len(paths), batch_size):
                pixels, rows = [], []
                for p in paths[start:start + batch_size]:
                    try:
                        pixels.append(pre(p).numpy())
                        rows.append(len(results))
                        results.append({"image": p})
                    except ImageLoadError as e:
                        results.append({"image": p, "error": e.reason})
                if pixels:
                    x = torch.from_numpy(np.stack(pixels))
                    tops = (nola.classify(x, topk=top_k, classnames=classes) if nola is not None
                            else clf.classify(x, topk=top_k))
                    for row, top in zip(rows, tops):
                        results[row]["top"] = [{"rank": j + 1, "label": lab, "prob": round(prob, 6)}
                                               for j, (lab, prob) in enumerate(top)]
                bar.update(len(paths[start:start + batch_size]))
    n_failed = sum(1 for r in results if "error" in r)
    from ..export.backends import backend_info

    data = {"model": net.config.name, **backend_info(net), "labels": classes,
            "templates": len(clf.prompts[0][0]) if clf is not None and clf.prompts else None,
            "prompts": (None if prompts_file is None else
                        {"file": str(prompts_file), "method": "nola" if nola is not None else learned.method}),
            "results": results, "failed": n_failed,
            "skipped": skipped, "csv": None}
    if out_file:
        n_rows = _write_csv(out_file, results)
        data["csv"] = str(out_file)
        click.echo(f"wrote {out_file} ({n_rows} rows, {len(results)} images)", err=True)

    def render(d):
        shown = d["results"][:MAX_SHOWN]
        rows = []
        for r in shown:
            if "error" in r:
                rows.append([r["image"], "-", "error", r["error"]])
                continue
            for t in r["top"]:
                rows.append([r["image"] if t["rank"] == 1 else "", t["rank"], t["label"], f"{t['prob']:.4f}"])
        how = ("a NoLA classifier" if d["prompts"] and d["prompts"]["method"] == "nola" else
               f"{d['prompts']['method']} learned prompts" if d["prompts"] else f"{d['templates']} templates")
        render_table(shorten(f"zero-shot: {len(classes)} labels x {how} ({d['model']})", 100),
                     ["image", "#", "label", "prob"], rows)
        more = len(d["results"]) - len(shown)
        if more:
            failed_more = sum(1 for r in d["results"][MAX_SHOWN:] if "error" in r)
            extra = f", {failed_more} of them unreadable" if failed_more else ""
            where = f"all results are in {d['csv']}" if d["csv"] else "use -o FILE.csv or --json for all results"
            click.echo(f"... {more} more image(s) not shown{extra}; {where}")

    emit(data, as_json, render)
    if n_failed:
        fail(f"{n_failed} of {len(results)} image(s) could not be read", 1)
