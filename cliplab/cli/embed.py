"""``cliplab embed``: a source -> sharded Parquet embeddings (resumable), plus helpers the other job commands share."""

from __future__ import annotations

import sys

import click

from .app import main
from .common import (  # noqa: F401  (MODEL_HELP re-exported for old imports)
    MODEL_HELP, backend_option, compile_option, emit, fail, json_option, model_option, on_interrupt, out_option, precision_option, progress_option,
    warnings_to_stderr,
)

@main.command("embed")
@click.argument("source", required=False)
@out_option("Output directory (shards/, manifest.json, rejects.jsonl). Rerunning the same command resumes, and "
            "embeds what was added to SOURCE since.", required=True)
@model_option()
@backend_option(auto=True)
@precision_option(int8=True, auto=True)
@compile_option()
@click.option("--synthetic", type=int, default=None, metavar="N",
              help="Embed N generated synthetic scenes (same as SOURCE synthetic:N).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: thread-pool decoding + in-process model; ray: the same job on Ray Data.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True, help="Images per model batch.")
@click.option("--text-batch-size", type=click.IntRange(1), default=256, show_default=True,
              help="Captions per model batch (each padded only to its own longest caption).")
@click.option("--shard-size", type=click.IntRange(1), default=1000, show_default=True,
              help="Items per Parquet shard (the unit of resumption).")
@click.option("--workers", type=click.IntRange(1), default=None,
              help="Decode threads (local) or Ray CPUs [default: min(8, CPU count)].")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Stored embedding precision.")
@click.option("--no-normalize", is_flag=True, help="Store raw (not L2-normalised) embeddings.")
@click.option("--no-truncate", is_flag=True,
              help="Reject captions longer than the model's context instead of truncating (and counting) them.")
@click.option("--what", type=click.Choice(["auto", "image", "text"]), default="auto", show_default=True,
              help="auto: every image and caption present; image/text: only that kind.")
@click.option("--device", default="cpu", show_default=True, help="Torch device for the model, e.g. cuda.")
@click.option("--path-column", default=None, help="Table sources: the image path column [default: detected].")
@click.option("--caption-column", default=None, help="Table sources: the caption column [default: detected].")
@click.option("--id-column", default=None, help="Table sources: the id column [default: 'id', else row number].")
@click.option("--image-root", type=click.Path(file_okay=False), default=None,
              help="Table sources: base for relative image paths [default: the table's folder, or the images/ folder "
                   "beside it when the paths are there].")
@click.option("--encoding", default="utf-8", show_default=True,
              help="Table sources: the file's text encoding (rows that do not decode are rejected with their line).")
@click.option("--all-files", is_flag=True,
              help="Folder sources: try every file, not only image extensions (content decides either way).")
@click.option("--overwrite", is_flag=True, help="Discard a previous job in --out instead of resuming it.")
@click.option("--strict", is_flag=True, help="Exit with status 1 if any input was rejected.")
@progress_option()
@json_option()
def embed_cmd(source, out_dir, model, backend, precision, compile_model, synthetic, engine, batch_size, text_batch_size, shard_size, workers,
              dtype, no_normalize, no_truncate, what, device, path_column, caption_column, id_column, image_root,
              encoding, all_files, overwrite, strict, progress, as_json):
    """Embed SOURCE into sharded Parquet files in --out.

    SOURCE is an image folder (searched recursively), a CSV/TSV/JSONL/Parquet table of image paths and/or
    captions, or synthetic:N (generated scenes; or use --synthetic N).

    Unreadable, truncated, empty, non-image and oversized (decompression bomb) files, rows that do not decode, and
    files that vanish during the run, are recorded in rejects.jsonl (id, path, reason) and the job goes on. A killed
    or interrupted job resumes where it stopped when the same command is run again: every input ends up exactly
    once, as a row or a reject. Run again after adding files (or table rows) and only the new ones are embedded;
    changed and removed ones are reported.

    \b
    Examples:
      cliplab embed photos/ -o emb/
      cliplab embed captions.csv --image-root images/ -o emb/ -m ViT-B-32.safetensors
      cliplab embed --synthetic 1000 -o emb/
    """
    from ..pipeline import embed
    from ..pipeline.embed import JobLockedError
    from ..export.deps import MissingDependencyError
    from ..pipeline.engines.ray_engine import EngineUnavailable

    if synthetic is not None:
        if source is not None:
            raise click.UsageError("give SOURCE or --synthetic N, not both")
        source = f"synthetic:{synthetic}"
    if source is None:
        raise click.UsageError("missing SOURCE (a folder, a table file, or synthetic:N / --synthetic N)")
    source_options = {"path_column": path_column, "caption_column": caption_column, "id_column": id_column,
                      "image_root": image_root, "all_files": all_files}
    if encoding != "utf-8":
        source_options["encoding"] = encoding
    if compile_model and backend in ("torch", "auto") and engine == "local":
        click.echo("compiling the model with torch.compile on its first batches (a few minutes)", err=True)
    try:
        with warnings_to_stderr(), on_interrupt(f"finished shards are kept in {out_dir}; run the same command again "
                                                "to resume"):
            result = embed(source, out_dir, model, source_options=source_options, overwrite=overwrite,
                           engine=engine, batch_size=batch_size, text_batch_size=text_batch_size,
                           shard_size=shard_size, workers=workers, dtype=dtype, normalize=not no_normalize,
                           truncate=not no_truncate, what=what, device=device, progress=progress,
                           precision=precision, backend=backend, compile=compile_model)
    except (JobLockedError, EngineUnavailable, MissingDependencyError) as e:
        fail(str(e), 1)
    m = result.manifest
    c = m["counts"]
    src = m.get("source", {})
    changes = result.changes
    data = {"out_dir": str(result.out_dir), "manifest": str(result.out_dir / "manifest.json"),
            "rejects_file": str(result.out_dir / m["rejects_file"]), "model": m["model"]["name"],
            "engine": engine, "backend": m.get("backend", "torch"), "precision": m.get("precision", "fp32"),
            "runtime_chosen_automatically": m.get("runtime_chosen_automatically", []), "items": c["items"], "rows": c["rows"],
            "rejects": c["rejects"], "images": c["images"], "texts": c["texts"],
            "captions_truncated": c["captions_truncated"],
            "captions_too_long_rejected": c["captions_too_long_rejected"],
            "shards_written": result.shards_written, "shards_skipped": result.shards_skipped,
            "added": changes.get("added", 0), "changed": changes.get("changed", 0),
            "removed": changes.get("removed", 0), "changed_ids": changes.get("changed_ids", []),
            "removed_ids": changes.get("removed_ids", []),
            "skipped_by_extension": src.get("skipped_by_extension", 0), "skipped_files": src.get("skipped_files", []),
            "seconds": round(result.seconds, 2)}

    def render(d):
        click.echo(f"embedded {d['rows']} of {d['items']} items ({d['images']} images, {d['texts']} captions) with "
                   f"{d['model']} ({d['backend']} {d['precision']}" +
                   (", chosen automatically" if d["runtime_chosen_automatically"] else "") + ")" +
                   f" into {d['out_dir']}")
        click.echo(f"  shards: {d['shards_written']} written, {d['shards_skipped']} already done; "
                   f"{d['seconds']} s")
        if d["added"] and d["shards_skipped"]:
            click.echo(f"  {d['added']} new item(s) found in the source since the last run: embedded")
        if d["captions_truncated"]:
            click.echo(f"  {d['captions_truncated']} caption(s) truncated to the context length")
        if d["rejects"]:
            click.echo(f"  {d['rejects']} input(s) rejected: see {d['rejects_file']}")
        if d["skipped_by_extension"]:
            shown = ", ".join(d["skipped_files"][:3]) + (", ..." if d["skipped_by_extension"] > 3 else "")
            click.echo(f"  {d['skipped_by_extension']} file(s) skipped: not an image extension ({shown}); "
                       "--all-files tries every file")

    if c["items"] == 0:
        what_ = "image files" if src.get("kind") == "folder" else "items"
        skipped = (f" ({src.get('skipped_by_extension')} file(s) skipped as non-images; --all-files tries them)"
                   if src.get("skipped_by_extension") else "")
        fail(f"nothing to embed: {source} has no {what_}{skipped}", 2)
    emit(data, as_json, render)
    if src.get("image_root_note"):
        click.echo(f"note: {src['image_root_note']}", err=True)
    if changes.get("changed") or changes.get("removed"):
        ids = (changes.get("changed_ids", []) + changes.get("removed_ids", []))[:3]
        click.echo(f"warning: since this job was planned, {changes.get('changed', 0)} item(s) changed and "
                   f"{changes.get('removed', 0)} were removed from the source (e.g. {', '.join(ids)}); their rows are "
                   "kept as they were (listed in manifest.json); --overwrite re-embeds everything", err=True)
    if c["rows"] == 0 and c["rejects"]:
        hint = _all_rejected_hint(result.out_dir / m["rejects_file"], src)
        fail(f"all {c['rejects']} input(s) were rejected, nothing was embedded{hint}", 1)
    if strict and c["rejects"]:
        sys.exit(1)


def _all_rejected_hint(rejects_file, src: dict) -> str:
    """A hint for the common cause of a job where nothing worked: relative image paths that resolve nowhere."""
    from ..pipeline import read_rejects

    reasons = [r.get("reason", "") for r in read_rejects(rejects_file.parent)[:50]]
    first = f" (first: {reasons[0]})" if reasons else ""
    if src.get("kind") == "table" and reasons and all("no such file" in r.lower() for r in reasons):
        return (f"{first}; the table's image paths were looked up under {src.get('resolved_image_root')}: pass "
                "the folder that holds them with --image-root DIR")
    return first
