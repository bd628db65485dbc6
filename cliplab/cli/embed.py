"""``cliplab embed``: a source -> sharded Parquet embeddings (resumable), plus helpers the other job commands share."""

from __future__ import annotations

import contextlib
import sys
import warnings

import click

from .app import emit, main

MODEL_HELP = ("Model: a pretrained name (cliplab models), a checkpoint file or directory, or an architecture name "
              "(seeded random weights, for smoke tests).")


@contextlib.contextmanager
def warnings_to_stderr():
    """Show cliplab's user-facing warnings (random weights, truncation, ...) as one ``warning: ...`` line each,
    once per message, without file/line noise; third-party deprecation chatter is dropped."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            seen = set()
            for w in caught:
                msg = str(w.message)
                if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
                    continue
                if msg not in seen:
                    seen.add(msg)
                    click.echo(f"warning: {msg}", err=True)


def fail(message: str, code: int = 1):
    """Stop with ``error: message`` on stderr and exit ``code``."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@main.command("embed")
@click.argument("source", required=False)
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output directory (shards/, manifest.json, rejects.jsonl). Rerunning the same command resumes.")
@click.option("--model", "-m", default=None, help=MODEL_HELP + " [default: shapes-tiny, the shipped model]")
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
              help="Table sources: base for relative image paths [default: the table's directory].")
@click.option("--all-files", is_flag=True,
              help="Folder sources: try every file, not only image extensions (content decides either way).")
@click.option("--overwrite", is_flag=True, help="Discard a previous job in --out instead of resuming it.")
@click.option("--strict", is_flag=True, help="Exit with status 1 if any input was rejected.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr [default: on a terminal].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def embed_cmd(source, out_dir, model, synthetic, engine, batch_size, text_batch_size, shard_size, workers, dtype,
              no_normalize, no_truncate, what, device, path_column, caption_column, id_column, image_root, all_files,
              overwrite, strict, progress, as_json):
    """Embed SOURCE into sharded Parquet files in --out.

    SOURCE is an image folder (searched recursively), a CSV/TSV/JSONL/Parquet table of image paths and/or
    captions, or synthetic:N (generated scenes; or use --synthetic N).

    Unreadable, truncated, empty, non-image and oversized (decompression bomb) files, and files that vanish during
    the run, are recorded in rejects.jsonl (id, path, reason) and the job goes on. A killed job resumes where it
    stopped when the same command is run again: every input ends up exactly once, as a row or a reject.

    \b
    Examples:
      cliplab embed photos/ --out emb/
      cliplab embed captions.csv --image-root images/ --out emb/ --model ViT-B-32.safetensors
      cliplab embed --synthetic 1000 --out emb/
    """
    from ..pipeline import embed
    from ..pipeline.embed import JobLockedError
    from ..pipeline.engines.ray_engine import EngineUnavailable

    if synthetic is not None:
        if source is not None:
            raise click.UsageError("give SOURCE or --synthetic N, not both")
        source = f"synthetic:{synthetic}"
    if source is None:
        raise click.UsageError("missing SOURCE (a folder, a table file, or synthetic:N / --synthetic N)")
    source_options = {"path_column": path_column, "caption_column": caption_column, "id_column": id_column,
                      "image_root": image_root, "all_files": all_files}
    try:
        with warnings_to_stderr():
            result = embed(source, out_dir, model, source_options=source_options, overwrite=overwrite,
                           engine=engine, batch_size=batch_size, text_batch_size=text_batch_size,
                           shard_size=shard_size, workers=workers, dtype=dtype, normalize=not no_normalize,
                           truncate=not no_truncate, what=what, device=device, progress=progress)
    except (JobLockedError, EngineUnavailable) as e:
        fail(str(e), 1)
    m = result.manifest
    c = m["counts"]
    data = {"out_dir": str(result.out_dir), "manifest": str(result.out_dir / "manifest.json"),
            "rejects_file": str(result.out_dir / m["rejects_file"]), "model": m["model"]["name"],
            "engine": engine, "items": c["items"], "rows": c["rows"], "rejects": c["rejects"],
            "images": c["images"], "texts": c["texts"], "captions_truncated": c["captions_truncated"],
            "captions_too_long_rejected": c["captions_too_long_rejected"],
            "shards_written": result.shards_written, "shards_skipped": result.shards_skipped,
            "seconds": round(result.seconds, 2)}

    def render(d):
        click.echo(f"embedded {d['rows']} of {d['items']} items ({d['images']} images, {d['texts']} captions) with "
                   f"{d['model']} into {d['out_dir']}")
        click.echo(f"  shards: {d['shards_written']} written, {d['shards_skipped']} already done; "
                   f"{d['seconds']} s")
        if d["captions_truncated"]:
            click.echo(f"  {d['captions_truncated']} caption(s) truncated to the context length")
        if d["rejects"]:
            click.echo(f"  {d['rejects']} input(s) rejected: see {d['rejects_file']}")

    emit(data, as_json, render)
    if strict and c["rejects"]:
        sys.exit(1)
