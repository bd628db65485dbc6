"""``cliplab textrep``: train a text embedder with one of the text-representation methods (``cliplab.textrep``).

    cliplab textrep list
    cliplab textrep train text2token -m all-MiniLM-L6-v2 --texts sts-train.csv --steps 200 -o runs/t2t
    cliplab eval sts -m runs/t2t --data sts-test.csv

The trained embedder is saved to ``-o/--out`` (loaded back by path anywhere a text embedder is taken), with
``textrep.json`` beside it: the method, model, data, settings and losses of the run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from .app import main
from .common import emit, json_option, on_interrupt, progress_option, warnings_to_stderr


def _trainers():
    from ..methods import import_capability
    from ..text.training import list_trainers

    import_capability("textrep")
    return list_trainers()


@main.group("textrep")
def textrep_group():
    """Text embeddings learned from language models (GEM, Text2Token, DupMAE): train, then evaluate with
    `cliplab eval sts -m DIR` or `cliplab eval paraphrase -m DIR`."""


@textrep_group.command("list")
@json_option()
def list_cmd(as_json):
    """List the text-representation methods that train an embedder, with their default models.

    \b
    Example:
      cliplab textrep list
    """
    data = [{"slug": t.slug, "default_model": t.default_model, "summary": t.summary} for t in _trainers()]
    emit(data, as_json, lambda d: [click.echo(f"{t['slug']:<12} {t['default_model']:<18} {t['summary']}") for t in d])


@textrep_group.command("train")
@click.argument("method")
@click.option("--model", "-m", "model", default=None,
              help="The starting text model: a name (all-MiniLM-L6-v2, smollm2-135m) or a saved embedder directory "
                   "[default: the method's own, see cliplab textrep list].")
@click.option("--texts", "texts_path", required=True, type=click.Path(dir_okay=False),
              help="Training text: a .txt file (one text per line), an STS-B file (both sentences) or a "
                   "CSV/TSV/JSONL/Parquet table (--column).")
@click.option("--column", default=None, help="The table's text column [default: caption, text or sentence].")
@click.option("--format", "fmt", type=click.Choice(["auto", "lines", "sts", "table"]), default="auto",
              show_default=True, help="How to read --texts.")
@click.option("--encoding", default="utf-8", show_default=True, help="Text encoding of --texts.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Train on the first N distinct texts only.")
@click.option("--steps", type=click.IntRange(min=1), required=True, help="Optimizer steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="[default: the method's own]")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="[default: the method's own]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for the trained embedder (must not exist or be empty, unless --overwrite).")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty --out.")
@progress_option()
@json_option(help="Print the run's summary as JSON.")
def train_cmd(method, model, texts_path, column, fmt, encoding, limit, steps, batch_size, lr, seed, out_dir,
              overwrite, progress, as_json):
    """Train a text embedder with METHOD (see cliplab textrep list) and save it to --out.

    \b
    Examples:
      cliplab textrep train text2token --texts sts-train.csv --steps 200 -o runs/t2t
      cliplab textrep train dupmae --texts all_captions.csv --steps 300 -o runs/dupmae
      cliplab textrep train gem -m smollm2-135m --texts captions.txt --steps 300 -o runs/gem
      cliplab eval sts -m runs/t2t --data sts-test.csv
    """
    from ..text.corpus import read_texts
    from ..text.training import get_trainer

    _trainers()
    trainer = get_trainer(method)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise click.UsageError(f"--out {out} is not empty (choose another folder, or --overwrite)")
    corpus = read_texts(texts_path, fmt=fmt, column=column, encoding=encoding, limit=limit)
    click.echo(f"{method}: {corpus.summary()}", err=True)
    for line, why in corpus.skipped[:5]:
        click.echo(f"warning: {Path(texts_path).name}:{line}: {why}", err=True)
    if len(corpus.skipped) > 5:
        click.echo(f"warning: ... and {len(corpus.skipped) - 5} more unreadable line(s)", err=True)
    t0 = time.perf_counter()
    with warnings_to_stderr(), on_interrupt(f"nothing was saved to {out}; run the command again"):
        embedder = trainer.train(model or trainer.default_model, corpus.texts, steps=steps, batch_size=batch_size,
                                 lr=lr, seed=seed, progress=progress)
    seconds = time.perf_counter() - t0
    embedder.save(out)
    summary = {"method": method, "model": model or trainer.default_model, "texts": corpus.source,
               "format": corpus.format, "n_texts": len(corpus), "duplicates_dropped": corpus.duplicates,
               "skipped_lines": len(corpus.skipped), "steps": steps, "batch_size": batch_size, "lr": lr,
               "seed": seed, "seconds": round(seconds, 1), "out": str(out), "embedder": getattr(embedder, "name", "")}
    (out / "textrep.json").write_text(json.dumps(summary, indent=2) + "\n")
    emit(summary, as_json, lambda d: click.echo(
        f"trained {d['method']} from {d['model']} on {d['n_texts']} texts, {d['steps']} steps in {d['seconds']} s; "
        f"saved to {d['out']}\nevaluate: cliplab eval sts -m {d['out']} --data sts-test.csv"))
