"""The FAISS operations that building and searching share: import check, search breadth, exact and re-ranked top-k,
recall and latency measurement. No state: every function takes the faiss index it works on."""

from __future__ import annotations

import time

import numpy as np

#: the least ``efSearch`` of an HNSW coarse quantiser (2 x nprobe above it)
COARSE_EF_MIN = 64
#: ``efSearch`` of an HNSW coarse quantiser while vectors are added: with faiss's default of 16, vectors land in a
#: list other than their nearest centroid's, where no nearby nprobe finds them (600k clustered vectors in 12,649
#: lists: recall@10 0.92 at nprobe 64); 64 assigns them as a flat scan does (0.996) at 2.8x the graph's add time,
#: still 4x cheaper than the flat scan
COARSE_EF_ADD = 64

__all__ = ["COARSE_EF_MIN", "COARSE_EF_ADD", "faiss_available", "load_faiss", "set_breadth", "top_k", "exact_top_k", "recall_at_k", "median_query_ms"]


def faiss_available() -> tuple[bool, str]:
    try:
        import faiss
    except Exception as e:
        return False, f"faiss is not importable ({type(e).__name__}: {e}); pip install faiss-cpu"
    return True, getattr(faiss, "__version__", "?")


def load_faiss():
    """The faiss module, or an ImportError that says how to install it."""
    ok, why = faiss_available()
    if not ok:
        raise ImportError(why)
    import faiss

    return faiss


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    hits = sum(len(set(a[a >= 0].tolist()) & set(e[e >= 0].tolist())) for a, e in zip(approx, exact))
    return hits / float(exact.shape[0] * k) if exact.size else 1.0


def set_breadth(index, param: str, value: int) -> None:
    """``nprobe`` of an IVF index (also behind an OPQ rotation) or ``efSearch`` of an HNSW one."""
    if param == "nprobe":
        faiss = load_faiss()
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = int(value)
        quantizer = faiss.downcast_index(ivf.quantizer)
        if hasattr(quantizer, "hnsw"):  # an HNSW coarse quantiser must explore at least the lists probed
            quantizer.hnsw.efSearch = max(COARSE_EF_MIN, 2 * int(value))
    else:
        index.hnsw.efSearch = int(value)


def top_k(index, q: np.ndarray, k: int, vectors: np.ndarray | None, rerank: int) -> tuple[np.ndarray, np.ndarray]:
    """The index's top ``k``; with ``rerank`` and the exact ``vectors``, its top ``rerank * k`` candidates rescored
    exactly and the best ``k`` of those kept (rows ``-1`` where there are fewer)."""
    if not rerank or vectors is None:
        return index.search(q, k)
    cand_scores, cand = index.search(q, min(int(rerank) * k, index.ntotal))
    scores = np.full((len(q), k), -np.inf, np.float32)
    rows = np.full((len(q), k), -1, np.int64)
    for i in range(len(q)):
        c = cand[i][cand[i] >= 0]
        if not len(c):
            continue
        order = np.sort(c)  # sorted rows read a memory-mapped file front to back
        exact = np.asarray(vectors[order], np.float32) @ q[i]
        best = np.argsort(-exact, kind="stable")[:k]
        scores[i, :len(best)], rows[i, :len(best)] = exact[best], order[best]
    return scores, rows


def exact_top_k(source, q: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """Exact top-``k`` rows of every query, a chunk of the database at a time (faiss's result heap merges them)."""
    faiss = load_faiss()
    heap = faiss.ResultHeap(len(q), k, keep_max=True)
    start = 0
    for part in source.chunks(chunk):
        flat = faiss.IndexFlatIP(q.shape[1])
        flat.add(part)
        scores, rows = flat.search(q, min(k, len(part)))
        if rows.shape[1] < k:  # pad: the heap takes exactly k columns
            pad = k - rows.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
        heap.add_result(np.ascontiguousarray(scores, np.float32), np.where(rows >= 0, rows + start, -1))
        start += len(part)
    heap.finalize()
    return heap.I


def median_query_ms(index, q: np.ndarray, k: int, vectors, rerank: int, n: int = 50) -> float:
    """Median wall time of one query (one at a time, as a server sees them), over the first ``n`` queries."""
    times = []
    for row in q[:n]:
        t = time.perf_counter()
        top_k(index, row[None], k, vectors, rerank)
        times.append(1000 * (time.perf_counter() - t))
    return float(np.median(times))
