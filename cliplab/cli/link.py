"""``cliplab link``: multimodal record linkage (CLIPPINGS) over a CSV of image paths and OCR texts."""

from __future__ import annotations

import csv
from pathlib import Path

import click

from .app import main
from .common import emit, fail, json_option, model_option, render_table, warnings_to_stderr

#: the table on a terminal shows this many clusters; the rest go to --out / --json
MAX_SHOWN = 20


def _read_records(path: str, image_col: str, text_col: str) -> tuple[list[dict], list[str], list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        fail(f"{path} has no records (a header line and one row per record)", 2)
    for col in (image_col, text_col):
        if col not in rows[0]:
            fail(f"{path} has no column {col!r}; its columns: {', '.join(rows[0])} (see --image-col/--text-col)", 2)
    base = Path(path).parent
    images = [str(p if (p := Path(r[image_col])).is_absolute() else base / p) for r in rows]
    return rows, images, [r[text_col] or "" for r in rows]


@main.command("link")
@click.argument("records_csv", type=click.Path(exists=True, dir_okay=False))
@click.option("--image-col", default="image", show_default=True,
              help="CSV column with image paths (relative paths are read from the CSV's folder).")
@click.option("--text-col", default="text", show_default=True, help="CSV column with each record's OCR text.")
@click.option("--threshold", type=click.FloatRange(0.0, 2.0), default=0.15, show_default=True,
              help="Cosine distance under which two records are linked (DBSCAN eps; tune it on labelled records).")
@click.option("--image-weight", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="w in normalize(w*image + (1-w)*text); 1 = image only, 0 = text only.")
@click.option("--method", type=click.Choice(["dbscan", "single"]), default="dbscan", show_default=True,
              help="DBSCAN(min_samples=1) or single linkage: the same partition.")
@model_option()
@click.option("--out", "-o", "out_file", type=click.Path(dir_okay=False), default=None,
              help="Write the input CSV with a cluster column added.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@json_option()
def link_cmd(records_csv, image_col, text_col, threshold, image_weight, method, model, out_file, batch_size,
             as_json):
    """Link the records of RECORDS_CSV (an image and its OCR text per row) into entities (CLIPPINGS).

    Each record is embedded as normalize(w * image + (1 - w) * text) with the model's two towers and the records
    are clustered by DBSCAN(min_samples=1) on cosine distance: records closer than --threshold, directly or
    through a chain, share a cluster id. Fine-tune a model for your records with cliplab.apps.clippings.train_linker
    and pass it with -m FILE.

    \b
    Example:
      cliplab link records.csv --threshold 0.2 -o linked.csv
      cliplab link scans.csv --image-col path --text-col ocr --image-weight 0.3 --json
    """
    from PIL import Image

    from ..apps.clippings import link_records
    from ..pipeline.modelref import resolve_model

    rows, paths, texts = _read_records(records_csv, image_col, text_col)
    try:
        images = [Image.open(p).convert("RGB") for p in paths]
    except OSError as e:
        fail(f"cannot read an image: {e}", 1)
    with warnings_to_stderr():
        net, _ = resolve_model(model)
        ids = link_records(net, images, texts, threshold=threshold, image_weight=image_weight, method=method,
                           batch_size=batch_size)
    if out_file:
        Path(out_file).parent.mkdir(parents=True, exist_ok=True)
        with open(out_file, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=[*rows[0], "cluster"])
            w.writeheader()
            for r, c in zip(rows, ids):
                w.writerow({**r, "cluster": int(c)})
    records = [{"image": r[image_col], "text": t, "cluster": int(c)} for r, t, c in zip(rows, texts, ids)]
    data = {"model": net.config.name, "threshold": threshold, "image_weight": image_weight, "method": method,
            "n_records": len(records), "n_clusters": int(ids.max()) + 1, "records": records, "out": out_file}

    def render(d):
        groups: dict[int, list[str]] = {}
        for r in d["records"]:
            groups.setdefault(r["cluster"], []).append(r["text"])
        shown = sorted(groups.items())[:MAX_SHOWN]
        render_table(f"{d['n_records']} records -> {d['n_clusters']} clusters", ["cluster", "size", "texts"],
                     [[c, len(t), "; ".join(t)[:80]] for c, t in shown])

    emit(data, as_json, render)
