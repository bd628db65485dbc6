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


@textrep_group.command("lm")
@click.argument("method")
@click.option("--captions", "captions_path", default=None, type=click.Path(dir_okay=False),
              help="A caption table with several captions per image (Flickr8k's captions.csv layout), split by "
                   "image into training and held-out captions [default: ../shared/data's Flickr8k captions].")
@click.option("--held-out-images", type=click.IntRange(1), default=500, show_default=True,
              help="Images whose captions are held out for bits per byte.")
@click.option("--max-images", type=click.IntRange(2), default=None, help="Use a seeded subset of the images.")
@click.option("--steps", type=click.IntRange(1), default=300, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=None, help="[default: the method's]")
@click.option("--lr", type=float, default=None, help="[default: the method's]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for model.safetensors and lm.json (the run's numbers).")
@progress_option()
@json_option()
def lm_cmd(method, captions_path, held_out_images, max_images, steps, batch_size, lr, seed, out_dir, progress,
           as_json):
    """Train a small language model with a token-layer method (ltok, zett, lexinvariant_lm) on captions and
    measure held-out bits per byte against the method's controls.

    \b
    Example:
      cliplab textrep lm ltok --max-images 2000 --steps 300 -o runs/ltok
      cliplab textrep lm lexinvariant_lm --steps 200 -o runs/lexinv --json
    """
    from safetensors.torch import save_model

    from ..methods import import_capability
    from ..textrep import lm_training as lt

    import_capability("textrep")
    try:
        runner = lt.get_lm_method(method)
    except KeyError as e:
        raise click.BadParameter(str(e).strip("'\""), param_hint="METHOD") from None
    try:
        split = lt.load_caption_splits(captions_path, held_out_images=held_out_images, seed=seed,
                                       max_images=max_images)
    except (FileNotFoundError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"{method}: {len(split.train)} training and {len(split.held_out)} held-out captions", err=True)
    t0 = time.perf_counter()
    with warnings_to_stderr(), on_interrupt("nothing was saved; run the command again"):
        summary, module = runner(split.train, split.held_out, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                 progress=progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(module, str(out / "model.safetensors"))  # tied embeddings are stored once
    summary = {"method": method, "steps": steps, "seed": seed, "seconds": round(time.perf_counter() - t0, 1),
               "train_captions": len(split.train), "held_captions": len(split.held_out), **summary, "out": str(out)}
    (out / "lm.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    emit(summary, as_json, lambda d: click.echo(json.dumps(d, indent=2, default=str)))
