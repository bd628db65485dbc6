"""The three steps of :meth:`cliplab.index.Index.build`, each on its own:

1. :func:`gather`: any input (a job directory, in memory or shard by shard; an ``Embeddings``; an array; a source)
   becomes one vector source plus one metadata row per vector (:class:`Gathered`);
2. :func:`train_and_add`: the planned faiss index is created, trained on a sample and filled chunk by chunk (locally
   or on Ray);
3. :func:`tune_breadth`: the search breadth of an approximate index is raised until the measured recall@10 reaches
   the target, then lowered again while a latency cap is exceeded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field as dc_field
from typing import Any, Callable, Sequence

import numpy as np

from .faiss_ops import COARSE_EF_ADD, exact_top_k, load_faiss, median_query_ms, recall_at_k, set_breadth, top_k
from .kmeans import train_ivf
from .sources import ArraySource, ShardSource, first_of_each_file, normalize_rows
from .sizing import IVF_KINDS, train_points

__all__ = ["Gathered", "IncompleteJobError", "gather", "train_and_add", "tune_breadth", "recall_queries",
           "STREAM_BYTES", "RECALL_QUERIES", "BREADTH_GRID"]

#: jobs whose vectors take more than this are read shard by shard (``stream=None``)
STREAM_BYTES = 2 * 2**30
#: how many queries measure recall and latency at build time
RECALL_QUERIES = 500
#: recall@10 gained over two doublings of the search breadth below which tuning stops (the codes cap recall)
PLATEAU_GAIN = 0.002
#: the search breadths tried, smallest first (IVF: ``nprobe``, capped at ``nlist``; HNSW: ``efSearch``)
BREADTH_GRID = {"nprobe": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
                "ef_search": (16, 32, 64, 128, 256, 512, 1024)}


class IncompleteJobError(ValueError):
    """The embedding job is unfinished (its manifest says ``complete: false``): ``done`` of ``total`` items."""

    def __init__(self, source: str, done: int, total: int):
        self.source, self.done, self.total = source, done, total
        super().__init__(f"{source} is an unfinished embedding job: {done} of {total} items embedded; rerun the same "
                         f"cliplab embed command (or embed()) to finish it, or pass allow_partial=True to index the "
                         f"{done} done")


@dataclass
class Gathered:
    """The vectors to index (normalised) and one metadata row per vector."""

    source: Any  # ArraySource or ShardSource
    field: str
    ids: list
    paths: list
    captions: list
    item_index: np.ndarray
    manifest: dict[str, Any] = dc_field(default_factory=dict)
    partial: dict[str, Any] = dc_field(default_factory=lambda: {"partial": False})
    duplicates: int = 0
    source_dir: str | None = None


def _partial_info(manifest: dict[str, Any], where: str, allow_partial: bool, done_default: int) -> dict[str, Any]:
    if manifest.get("complete") is not False:
        return {"partial": False}
    counts = manifest.get("counts", {})
    done, total = int(counts.get("items_done", done_default)), int(counts.get("items", 0))
    if not allow_partial:
        raise IncompleteJobError(where, done, total)
    return {"partial": True, "items_done": done, "items_total": total}


def _job_vector_bytes(job_dir) -> int:
    """The bytes the job's vectors would take in memory as float32 (from its manifest)."""
    from ..pipeline.embed import read_manifest

    try:
        manifest = read_manifest(job_dir)
    except FileNotFoundError:
        return 0
    rows = int(manifest.get("counts", {}).get("items_done", 0) or 0)
    emb = manifest.get("embedding", {})
    kinds = sum(1 for c in ("image_column", "text_column") if emb.get(c))
    return rows * int(emb.get("dim", 0) or 0) * 4 * max(kinds, 1)


def _gather_streamed(job_dir, field: str, dedupe: bool, allow_partial: bool) -> Gathered:
    """A job read shard by shard (:class:`ShardSource`): only its metadata is in memory."""
    from ..pipeline.embed import read_manifest

    source_dir = os.path.abspath(os.fspath(job_dir))
    manifest = read_manifest(job_dir)
    partial = _partial_info(manifest, source_dir, allow_partial, 0)
    emb = manifest.get("embedding", {})
    source = None
    if field == "auto":
        field = "image" if emb.get("image_column") else "text"
        if field == "image":
            source = ShardSource(job_dir, "image", dedupe)
            if not source.n and emb.get("text_column"):  # a job of captions only: index the text
                field, source = "text", None
    source = source or ShardSource(job_dir, field, dedupe)
    return Gathered(source, field, source.ids, source.paths, source.captions, np.asarray(source.item_index, np.int64),
                    manifest, partial, source.duplicates, source_dir)


def _gather_embeddings(emb, field: str, dedupe: bool, allow_partial: bool, source_dir: str | None) -> Gathered:
    manifest = getattr(emb, "manifest", {}) or {}
    where = source_dir or "the embeddings"
    partial = _partial_info(manifest, where, allow_partial, len(emb))
    if len(emb) == 0:
        raise ValueError(f"nothing to index: {where} holds no embedded rows")
    if field == "auto":
        field = "image" if emb.image is not None and emb.image_valid.any() else "text"
    vec_all, valid = (emb.image, emb.image_valid) if field == "image" else (emb.text, emb.text_valid)
    if vec_all is None:
        raise ValueError(f"the embeddings have no {field} vectors (the job did not embed {field}s)")
    keep = np.flatnonzero(valid)
    duplicates = 0
    if field == "image" and dedupe:  # several rows (captions) of one image file: index the image once
        first = first_of_each_file(keep, emb.paths, set())
        duplicates, keep = len(keep) - len(first), first
    o_all, o_valid = (emb.text, emb.text_valid) if field == "image" else (emb.image, emb.image_valid)
    other = o_all[o_valid] if o_all is not None else None  # the other modality: realistic recall queries
    source = ArraySource(normalize_rows(vec_all[keep]), other)
    return Gathered(source, field, [emb.ids[i] for i in keep], [emb.paths[i] for i in keep],
                    [emb.captions[i] for i in keep], np.asarray(emb.index)[keep].astype(np.int64), manifest,
                    partial, duplicates, source_dir)


def _with_metadata(source, field: str, metadata: dict[str, Sequence] | None) -> Gathered:
    md, n = metadata or {}, source.n
    return Gathered(source, "vectors" if field == "auto" else field, [str(i) for i in md.get("ids", range(n))],
                    list(md.get("paths", [None] * n)), list(md.get("captions", [None] * n)),
                    np.arange(n, dtype=np.int64))


def gather(data, *, field: str = "auto", metadata: dict[str, Sequence] | None = None, dedupe: bool = True,
           allow_partial: bool = False, stream: bool | None = None) -> Gathered:
    """The vectors and metadata of ``data`` (see :meth:`~cliplab.index.Index.build` for what it may be)."""
    if isinstance(data, (ArraySource, ShardSource)):  # normalised already
        out = _with_metadata(data, field, metadata)
    elif isinstance(data, (str, os.PathLike)):
        from ..pipeline import read_embeddings

        if stream is None:
            stream = _job_vector_bytes(data) > STREAM_BYTES
        if stream:
            out = _gather_streamed(data, field, dedupe, allow_partial)
        else:
            out = _gather_embeddings(read_embeddings(data), field, dedupe, allow_partial,
                                     os.path.abspath(os.fspath(data)))
    elif isinstance(data, np.ndarray) or (isinstance(data, (list, tuple)) and len(data) and
                                          not hasattr(data, "ids")):
        vecs = np.asarray(data, dtype=np.float32)
        if vecs.ndim != 2:
            raise ValueError(f"expected vectors [n, dim], got shape {vecs.shape}")
        out = _with_metadata(ArraySource(normalize_rows(vecs)), field, metadata)
    else:
        out = _gather_embeddings(data, field, dedupe, allow_partial, None)
    n = out.source.n
    if n == 0:
        raise ValueError("nothing to index: no vectors")
    if len(out.ids) != n or len(out.paths) != n or len(out.captions) != n:
        raise ValueError("metadata lists must have one entry per vector")
    return out


def _training_sample(source, n_train: int, seed: int) -> np.ndarray:
    n = source.n
    if n <= n_train:
        return source.take(np.arange(n))
    return source.take(np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False)))


def train_and_add(plan, source, *, hnsw_m: int, seed: int,
                  add_all: Callable[[Any], Any]) -> tuple[Any, dict[str, Any]]:
    """The faiss index ``plan`` describes, trained (IVF kinds) and filled by ``add_all``; and its build params."""
    faiss = load_faiss()
    n, dim, kind = source.n, source.dim, plan.kind
    if kind == "flat":
        return add_all(faiss.IndexFlatIP(dim)), {}
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = max(40, 2 * hnsw_m)
        return add_all(index), {"m": hnsw_m}
    if kind not in IVF_KINDS:
        raise ValueError(f"unknown index kind {kind!r}")
    # IVF-Flat, IVF-SQ8 or IVF-PQ (OPQ in front, an HNSW coarse quantiser): whatever the plan's factory string says
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.seed = seed
    n_train = plan.train_points or train_points(n, plan.nlist)
    params = {"nlist": plan.nlist, "coarse": plan.coarse or "flat", "train_points": n_train,
              "kmeans": plan.kmeans or "one-level"}
    if kind == "ivfpq":
        ivf.do_polysemous_training = False  # Hamming pre-filtering we never use; it dominates training time
        n_train = max(n_train, min(n, 256 * 64))  # and 256 centroids per code for the codebooks
        params.update(train_points=n_train, pq_m=plan.pq_m, opq=plan.opq)
    train_ivf(index, _training_sample(source, n_train, seed), two_level=plan.kmeans == "two-level", seed=seed)
    quantizer = faiss.downcast_index(ivf.quantizer)
    if hasattr(quantizer, "hnsw"):  # assign added vectors to their nearest list, not a nearby one
        quantizer.hnsw.efSearch = COARSE_EF_ADD
    return add_all(index), params  # codes computed chunk by chunk


def recall_queries(source, queries, seed: int) -> tuple[np.ndarray, str]:
    """The queries that measure recall: ``queries`` if given, else a sample of the other modality's vectors (the
    realistic queries), else a sample of the database; and where they came from."""
    rng = np.random.default_rng(seed + 1)
    if queries is not None:
        return normalize_rows(np.asarray(queries, np.float32)), "given"
    if source.other_count:
        pick = rng.choice(source.other_count, min(RECALL_QUERIES, source.other_count), replace=False)
        return source.take_other(np.sort(pick)), "other modality (text queries for an image index, or vice versa)"
    pick = rng.choice(source.n, min(RECALL_QUERIES, source.n), replace=False)
    return source.take(np.sort(pick)), "database sample"


def tune_breadth(index, param: str, grid: Sequence[int], q: np.ndarray, truth: np.ndarray, *, vectors, rerank: int,
                 recall_target: float, max_query_ms: float | None) -> tuple[int, dict[str, Any]]:
    """The smallest breadth in ``grid`` whose recall@k of ``q`` against ``truth`` reaches ``recall_target``; if none
    does, the smallest at the best recall measured (the walk stops early once two doublings gain under
    :data:`PLATEAU_GAIN`: compressed codes cap recall whatever the breadth). With ``max_query_ms``, lowered again
    until the median query time fits (the latency budget wins). Leaves ``index`` set to it; returns it and the info
    to record (recall, whether the target was reached, the tuning curve, the latency)."""
    k = truth.shape[1]
    curve: list[list] = []
    chosen = grid[-1]
    plateau = False
    for value in grid:
        set_breadth(index, param, value)
        _, got = top_k(index, q, k, vectors, rerank)
        r = recall_at_k(got, truth)
        curve.append([value, round(r, 4)])
        if r >= recall_target:
            chosen = value
            break
        if len(curve) >= 3 and r - curve[-3][1] < PLATEAU_GAIN:
            # two doublings of the breadth gained nothing: the codes cap recall, not the breadth. Walking on to a
            # full scan would cost up to nlist / breadth times the query time for no recall.
            plateau = True
            break
    info: dict[str, Any] = {}
    if plateau or curve[-1][1] < recall_target:  # not reached: the smallest breadth at the best recall measured
        best = max(r for _, r in curve)
        chosen = next(v for v, r in curve if r >= best - PLATEAU_GAIN)
        info.update(recall_target_reached=False, recall_plateau=plateau)
    at = [v for v, _ in curve].index(chosen)
    info["recall_at_10"] = curve[at][1]
    if max_query_ms is not None:
        for i in range(at, -1, -1):
            value = curve[i][0]
            set_breadth(index, param, value)
            ms = median_query_ms(index, q, k, vectors, rerank)
            if ms <= max_query_ms or i == 0:
                chosen = value
                info.update(recall_at_10=curve[i][1], query_ms_p50=round(ms, 3), max_query_ms=max_query_ms,
                            latency_bound=i < at or ms > max_query_ms)
                break
    set_breadth(index, param, chosen)
    info["tuning"] = {param: curve}
    return chosen, info


def breadth_grid(kind: str, params: dict[str, Any]) -> tuple[str, list[int]]:
    """The breadth parameter of an approximate ``kind`` and the values to try."""
    if kind == "hnsw":
        return "ef_search", list(BREADTH_GRID["ef_search"])
    nl = params["nlist"]
    return "nprobe", [p for p in BREADTH_GRID["nprobe"] if p < nl] + [nl]


def exact_truth(source, q: np.ndarray, chunk: int) -> np.ndarray:
    """The exact top-10 (or top-n) rows of the recall queries."""
    return exact_top_k(source, q, min(10, source.n), chunk)
