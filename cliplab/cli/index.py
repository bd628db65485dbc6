"""``cliplab index`` (build a FAISS index over ``cliplab embed`` output) and ``cliplab search``."""

from __future__ import annotations

from pathlib import Path

import click

from .app import main
from .common import (MODEL_HELP, backend_option, emit, fail, json_option, model_option, precision_option,
                     render_table, shorten, top_k_option, warnings_to_stderr, with_backend)


def _need_faiss():
    from ..index import faiss_available

    ok, why = faiss_available()
    if not ok:
        fail(why, 1)


@main.command("index")
@click.argument("embeddings", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Where to save the index [default: EMBEDDINGS/index].")
@click.option("--kind", type=click.Choice(["auto", "flat", "ivf", "ivfsq", "ivfpq", "hnsw"]), default="auto", show_default=True,
              help="auto: exact flat index up to --approx-threshold vectors, IVF-Flat above, IVF-SQ8 (one byte per "
                   "dimension) when full vectors exceed --max-index-memory, IVF-PQ (compressed codes) when that "
                   "does too.")
@click.option("--field", type=click.Choice(["auto", "image", "text"]), default="auto", show_default=True,
              help="Which embeddings to index (auto: images when the job has any; text: the captions, for "
                   "image-to-text search).")
@click.option("--approx-threshold", type=click.IntRange(1), default=100_000, show_default=True,
              help="Collections larger than this get an approximate index (kind auto).")
@click.option("--recall-target", type=click.FloatRange(0, 1), default=0.95, show_default=True,
              help="Approximate indexes: smallest nprobe/efSearch reaching this recall@10 vs exact search.")
@click.option("--max-index-memory", "max_memory", default=None, metavar="SIZE",
              help="Budget for the index's size, e.g. 4GB or 512MB: auto picks the largest compressed code that "
                   "fits (the choice and its reasons are recorded in index.json).")
@click.option("--max-query-ms", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Approximate indexes: cap the tuned search breadth by the measured median query time.")
@click.option("--rerank", type=click.IntRange(0), default=0, show_default=True,
              help="Approximate indexes: keep the exact vectors (vectors.npy, memory-mapped) and rescore the top "
                   "RERANK x k candidates of each query with them (0: off).")
@click.option("--coarse", type=click.Choice(["auto", "flat", "hnsw"]), default="auto", show_default=True,
              help="IVF kinds: how vectors and queries find their lists: a flat scan of the centroids or an HNSW "
                   "graph over them (auto: the graph from 4096 lists, about 1M vectors).")
@click.option("--kmeans", type=click.Choice(["auto", "one-level", "two-level"]), default="auto", show_default=True,
              help="IVF kinds: how the list centroids are trained: faiss's k-means or k-means in two levels (sqrt "
                   "groups, then split; far cheaper for many lists; auto: two levels from 2048 lists).")
@click.option("--stream/--no-stream", default=None,
              help="Read the job's vectors shard by shard instead of all at once (the same index) [default: when "
                   "they exceed 2 GB].")
@click.option("--on-disk/--in-memory", "on_disk", default=None,
              help="IVF kinds: keep the inverted lists in index.ivfdata next to index.faiss (memory-mapped: a query "
                   "pages in only the lists it probes; the build holds one block at a time) [default: on disk when "
                   "the index's estimate exceeds --max-index-memory, or 4 GB without one].")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: encode an IVF index's vectors in parallel Ray tasks and merge their lists (the same index "
                   "as a local build).")
@click.option("--workers", type=click.IntRange(1), default=2, show_default=True, help="CPUs of the local Ray cluster.")
@click.option("--allow-partial", is_flag=True,
              help="Index an unfinished job (an interrupted embed) as it is; the index records that it is partial.")
@json_option("Print the build report as JSON.")
def index_cmd(embeddings, out_dir, kind, field, approx_threshold, recall_target, max_memory, max_query_ms, rerank,
              coarse, kmeans, stream, on_disk, engine, workers, allow_partial, as_json):
    """Build a vector index over the output of `cliplab embed` in EMBEDDINGS.

    Vectors are normalised and searched by inner product (cosine). For an approximate index, recall@10 against
    exact search is measured at build time and reported. An unfinished job is refused unless --allow-partial.
    The index holds the vectors the embed job made; it encodes nothing itself.

    \b
    Examples:
      cliplab index emb/
      cliplab index emb/ --field text -o emb/captions   # captions: image-to-text search
      cliplab index emb/ --allow-partial --json         # an interrupted embed, so far
      cliplab index emb/ --max-index-memory 4GB --rerank 4   # compressed codes, exact re-ranking
      cliplab index emb/ --kind ivf --on-disk           # inverted lists in index.ivfdata, memory-mapped
    """
    _need_faiss()
    from ..index import Index, IncompleteJobError

    try:
        ix = Index.build(embeddings, field=field, kind=kind, approx_threshold=approx_threshold,
                         recall_target=recall_target, allow_partial=allow_partial, max_memory=max_memory,
                         max_query_ms=max_query_ms, rerank=rerank, engine=engine, workers=workers,
                         stream=stream, coarse=coarse, kmeans=kmeans, on_disk=on_disk)
    except IncompleteJobError as e:
        fail(f"{embeddings} is an unfinished embedding job: {e.done} of {e.total} items embedded; rerun the same "
             f"cliplab embed command (-o {embeddings}) to finish it (it resumes), or pass --allow-partial to index "
             f"the {e.done} done", 2)
    except ValueError as e:  # a memory budget no index fits, a bad size, on-disk lists for a non-IVF kind
        fail(str(e), 2)
    path = ix.save(out_dir or Path(embeddings) / "index")
    info = ix.info
    data = {"index": str(path), "kind": info["kind"], "field": info["field"], "n": info["n"], "dim": info["dim"],
            "duplicates_skipped": info["duplicates_skipped"], "partial": info["partial"],
            "exact": info["exact"], "recall_at_10": info["recall_at_10"], "params": info["params"],
            "build_seconds": info["build_seconds"], "plan": info["plan"], "engine": info["engine"]}
    if info["partial"]:
        data.update(items_done=info["items_done"], items_total=info["items_total"])
    if not info["exact"]:
        data.update(recall_queries=info["recall_queries"], recall_query_source=info["recall_query_source"],
                    tuning=info["tuning"])
        if "query_ms_p50" in info:
            data.update(query_ms_p50=info["query_ms_p50"], latency_bound=info["latency_bound"])

    def render(d):
        extra = "" if d["exact"] else f", {', '.join(f'{k}={v}' for k, v in d['params'].items())}"
        click.echo(f"built {d['kind']} index of {d['n']} {d['field']} vectors (dim {d['dim']}{extra}) "
                   f"in {d['build_seconds']} s -> {d['index']}")
        if d["partial"]:
            click.echo(f"  partial: the job is unfinished, {d['items_done']} of {d['items_total']} items embedded; "
                       f"finish the embed and index again for the rest")
        if d["duplicates_skipped"]:
            click.echo(f"  {d['duplicates_skipped']} rows share an image with an earlier row: indexed once")
        for reason in d["plan"]["reasons"]:
            click.echo(f"  why: {reason}")
        click.echo(f"  estimated size: {d['plan']['est_bytes'] / 2**20:.1f} MB")
        if d["exact"]:
            click.echo("  exact search (recall@10 = 1.0)")
        else:
            click.echo(f"  recall@10 vs exact: {d['recall_at_10']:.3f} on {d['recall_queries']} queries "
                       f"({d['recall_query_source']})")
            if "query_ms_p50" in d:
                bound = " (the latency budget capped the search breadth)" if d["latency_bound"] else ""
                click.echo(f"  median query: {d['query_ms_p50']} ms{bound}")

    emit(data, as_json, render)


@main.command("search")
@click.argument("index", type=click.Path(exists=True, file_okay=False))
@click.argument("query", required=False)
@click.option("--image", "image", type=click.Path(dir_okay=False), default=None,
              help="Search with this image instead of a text QUERY.")
@top_k_option(default=10, help="Results to return.")
@model_option(default=None, help="Query encoder [default: the model recorded in the index]. " + MODEL_HELP)
@backend_option()
@precision_option(help="Compute precision of the query encoder: fp32 (exact) or bf16 (fast where the CPU has "
                       "native bf16).", int8=True)
@click.option("--exclude-self", is_flag=True,
              help="Leave out the query itself: the query image's own file, and any row with an identical "
                   "embedding [default: off, so the top hit confirms an indexed image].")
@click.option("--no-mmap", is_flag=True, help="Read the index into memory instead of memory-mapping it.")
@json_option("Print JSON.")
def search_cmd(index, query, image, top_k, model, backend, precision, exclude_self, no_mmap, as_json):
    """Search INDEX (a directory from `cliplab index`, or the embeddings directory holding it) with a text QUERY
    or --image PATH; prints rank (1 = best), score, id, path and caption of the top -k rows.

    \b
    Examples:
      cliplab search emb/ "a red circle above a blue square"
      cliplab search emb/index --image query.png -k 5 --json
      cliplab search emb/ --image photos/dog.jpg --exclude-self   # not the photo itself
    """
    if (query is None) == (image is None):
        raise click.UsageError("give either a text QUERY or --image PATH (exactly one)")
    if query is not None and not query.strip():
        raise click.UsageError("QUERY is empty: give some text to search for, or --image PATH")
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
        if precision != "fp32" or backend != "torch":
            enc = with_backend(enc or ix.model(), backend, precision)
        try:
            if image is None:
                hits = ix.search_text(query, k=top_k, model=enc, exclude_self=exclude_self)
            else:
                hits = ix.search_image(image, k=top_k, model=enc, exclude_self=exclude_self)
        except ImageLoadError as e:
            fail(str(e), 2)
    if ix.info.get("partial"):
        click.echo(f"note: this index is partial ({ix.info.get('items_done')} of {ix.info.get('items_total')} items "
                   f"of its job; built with --allow-partial)", err=True)
    if image is not None and not exclude_self and hits and ix.is_self(hits[0], image):
        click.echo("note: hit 1 is the query image itself; --exclude-self leaves it out", err=True)
    from ..index import resident_memory_mb

    data = {"index": str(ix.path), "query": query if image is None else {"image": image}, "k": top_k,
            "exclude_self": exclude_self, "hits": [h.to_dict() for h in hits],
            "index_loaded_with": ix.info.get("loaded_with"), "rss_mb": resident_memory_mb()}

    def render(d):
        # a long query is cut at its end (the JSON keeps it whole); a long image path keeps its file name
        if image is None:
            q = f'"{shorten(query, 60)}"'
        else:
            q = "image " + (image if len(image) <= 60 else "…" + image[-59:])
        render_table(f"top {len(d['hits'])} for {q}", ["#", "score", "id", "path", "caption"],
                     [[h["rank"], f"{h['score']:.4f}", h["id"], h["path"] or "", h["caption"] or ""]
                      for h in d["hits"]])

    emit(data, as_json, render)
