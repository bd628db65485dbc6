"""``cliplab index`` (build a FAISS index over ``cliplab embed`` output) and ``cliplab search``."""

from __future__ import annotations

from pathlib import Path

import click

from .app import emit, main
from .embed import MODEL_HELP, fail, warnings_to_stderr


def render_table(title: str | None, columns: list[str], rows: list[list], caption: str | None = None) -> None:
    """A table on stdout: rich when installed, plain aligned text otherwise."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is optional
        if title:
            click.echo(title)
        widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) if rows else len(str(c))
                  for i, c in enumerate(columns)]
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(columns, widths)))
        for r in rows:
            click.echo("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
        if caption:
            click.echo(caption)
        return
    table = Table(title=title, caption=caption, show_lines=False)
    for c in columns:
        table.add_column(c, overflow="fold", justify="right" if c in ("#", "score", "prob") else "left")
    for r in rows:
        table.add_row(*[str(v) for v in r])
    Console(soft_wrap=False).print(table)


def _need_faiss():
    from ..index import faiss_available

    ok, why = faiss_available()
    if not ok:
        fail(why, 1)


@main.command("index")
@click.argument("embeddings", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Where to save the index [default: EMBEDDINGS/index].")
@click.option("--kind", type=click.Choice(["auto", "flat", "ivf", "hnsw"]), default="auto", show_default=True,
              help="auto: exact flat index up to --approx-threshold vectors, IVF-Flat above.")
@click.option("--field", type=click.Choice(["auto", "image", "text"]), default="auto", show_default=True,
              help="Which embeddings to index (auto: images when the job has any).")
@click.option("--approx-threshold", type=click.IntRange(1), default=100_000, show_default=True,
              help="Collections larger than this get an approximate index (kind auto).")
@click.option("--recall-target", type=click.FloatRange(0, 1), default=0.95, show_default=True,
              help="Approximate indexes: smallest nprobe/efSearch reaching this recall@10 vs exact search.")
@click.option("--json", "as_json", is_flag=True, help="Print the build report as JSON.")
def index_cmd(embeddings, out_dir, kind, field, approx_threshold, recall_target, as_json):
    """Build a vector index over the output of `cliplab embed` in EMBEDDINGS.

    Vectors are normalised and searched by inner product (cosine). For an approximate index, recall@10 against
    exact search is measured at build time and reported.
    """
    _need_faiss()
    from ..index import Index

    ix = Index.build(embeddings, field=field, kind=kind, approx_threshold=approx_threshold,
                     recall_target=recall_target)
    path = ix.save(out_dir or Path(embeddings) / "index")
    info = ix.info
    data = {"index": str(path), "kind": info["kind"], "field": info["field"], "n": info["n"], "dim": info["dim"],
            "duplicates_skipped": info["duplicates_skipped"],
            "exact": info["exact"], "recall_at_10": info["recall_at_10"], "params": info["params"],
            "build_seconds": info["build_seconds"]}
    if not info["exact"]:
        data.update(recall_queries=info["recall_queries"], recall_query_source=info["recall_query_source"],
                    tuning=info["tuning"])

    def render(d):
        extra = "" if d["exact"] else f", {', '.join(f'{k}={v}' for k, v in d['params'].items())}"
        click.echo(f"built {d['kind']} index of {d['n']} {d['field']} vectors (dim {d['dim']}{extra}) "
                   f"in {d['build_seconds']} s -> {d['index']}")
        if d["duplicates_skipped"]:
            click.echo(f"  {d['duplicates_skipped']} rows share an image with an earlier row: indexed once")
        if d["exact"]:
            click.echo("  exact search (recall@10 = 1.0)")
        else:
            click.echo(f"  recall@10 vs exact: {d['recall_at_10']:.3f} on {d['recall_queries']} queries "
                       f"({d['recall_query_source']})")

    emit(data, as_json, render)


@main.command("search")
@click.argument("index", type=click.Path(exists=True, file_okay=False))
@click.argument("query", required=False)
@click.option("--image", "image", type=click.Path(dir_okay=False), default=None,
              help="Search with this image instead of a text QUERY.")
@click.option("--k", "-k", "k", type=click.IntRange(1), default=10, show_default=True, help="Results to return.")
@click.option("--model", "-m", default=None,
              help="Query encoder [default: the model recorded in the index]. " + MODEL_HELP)
@click.option("--no-mmap", is_flag=True, help="Read the index into memory instead of memory-mapping it.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def search_cmd(index, query, image, k, model, no_mmap, as_json):
    """Search INDEX (a directory from `cliplab index`, or the embeddings directory holding it) with a text QUERY
    or --image PATH; prints rank, score, id, path and caption of the top --k rows.

    \b
    Examples:
      cliplab search emb/ "a red circle above a blue square"
      cliplab search emb/index --image query.png --k 5 --json
    """
    if (query is None) == (image is None):
        raise click.UsageError("give either a text QUERY or --image PATH (exactly one)")
    _need_faiss()
    from ..index import Index
    from ..models.preprocess import ImageLoadError

    with warnings_to_stderr():
        ix = Index.load(index, mmap=not no_mmap)
        enc = None
        if model is not None:
            from ..pipeline import resolve_model

            enc, info = resolve_model(model)
            recorded = ix.info.get("model", {}).get("fingerprint")
            if recorded and recorded != info["fingerprint"]:
                click.echo(f"warning: --model {model} is not the model that built this index "
                           f"({ix.info['model'].get('name')}); scores may be meaningless", err=True)
        try:
            hits = ix.search_text(query, k=k, model=enc) if image is None else ix.search_image(image, k=k, model=enc)
        except ImageLoadError as e:
            fail(str(e), 2)
    data = {"index": str(ix.path), "query": query if image is None else {"image": image}, "k": k,
            "hits": [h.to_dict() for h in hits]}

    def render(d):
        q = f'"{query}"' if image is None else f"image {image}"
        render_table(f"top {len(d['hits'])} for {q}", ["#", "score", "id", "path", "caption"],
                     [[h["rank"] + 1, f"{h['score']:.4f}", h["id"], h["path"] or "", h["caption"] or ""]
                      for h in d["hits"]])

    emit(data, as_json, render)
