"""A FAISS vector index over a job's embeddings, with the metadata that maps hits back to ids, paths, captions.

* Vectors are L2-normalised and searched by inner product, so scores are cosine similarities.
* ``kind="auto"``: exact ``IndexFlatIP`` up to ``approx_threshold`` vectors, else IVF-Flat. For an approximate index
  the search breadth (``nprobe`` for IVF, ``efSearch`` for HNSW) is tuned at build time to the smallest value whose
  measured recall@10 against exact search reaches ``recall_target``; the measurement is stored and reported.
* On disk: ``index.faiss``, ``metadata.arrow`` (Arrow IPC, uncompressed) and ``index.json``. :meth:`Index.load`
  memory-maps both files (``faiss.IO_FLAG_MMAP_IFC`` / ``IO_FLAG_MMAP`` where the index type supports it), so
  opening a large index is cheap and pages are shared between processes. An IVF index may keep its inverted lists in
  ``index.ivfdata`` (:mod:`cliplab.index.ondisk`), mapped read-only from the index's own folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = ["Index", "Hit", "IncompleteJobError", "APPROX_THRESHOLD", "KINDS", "SELF_TOLERANCE", "faiss_available"]

from .building import (STREAM_BYTES, IncompleteJobError, breadth_grid, exact_truth, gather,  # noqa: F401 (re-export)
                       recall_queries, train_and_add, tune_breadth)
from .faiss_ops import faiss_available, load_faiss as _faiss, set_breadth as _set_breadth, top_k as _top_k
from .ondisk import ONDISK_FILE, add_on_disk, quiet_c_stdout, read_flags, write_index as _write_index
from .sizing import APPROX_THRESHOLD, IVF_KINDS, PLAN_KINDS, TRAIN_PER_LIST, parse_bytes, plan_index
from .sources import ArraySource, ShardSource, normalize_rows

KINDS = PLAN_KINDS
INDEX_FILE = "index.faiss"
META_FILE = "metadata.arrow"
VECTORS_FILE = "vectors.npy"  # exact (normalised float32) vectors of an approximate index, for re-ranking
INFO_FILE = "index.json"
FORMAT = "cliplab-index"
FORMAT_VERSION = 1
_ADD_CHUNK = 65_536  # vectors added (and encoded, on Ray) per chunk
#: ``exclude_self``: a hit whose cosine to the query is at least ``1 - SELF_TOLERANCE`` has the query's own embedding
#: (float32 re-encoding and float16 storage stay within ~1e-7; the closest distinct scenes under the random test-tiny
#: weights, whose image embeddings are nearly collapsed, are 6e-5 apart).
SELF_TOLERANCE = 1e-6


_normalize = normalize_rows  # queries and vectors: unit rows, float32, a [dim] vector as [1, dim]


@dataclass
class Hit:
    """One search result: ``rank`` (1 = best, as in the CLI's table and JSON), ``score`` (cosine similarity), and the
    row's metadata (``row``: its position in the index; ``index``: the item index in the embedding job)."""

    rank: int
    score: float
    id: str
    path: str | None
    caption: str | None
    row: int
    index: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Index:
    """A searchable collection of normalised vectors plus metadata. Build with :meth:`build`, persist with
    :meth:`save`, reopen with :meth:`load`; query with :meth:`search` (vectors), :meth:`search_text` or
    :meth:`search_image`."""

    def __init__(self, faiss_index, metadata, info: dict[str, Any], model=None):
        self.faiss_index = faiss_index
        self.metadata = metadata  # pyarrow.Table: id, index, path, caption (row order = vector order)
        self.info = info
        self._model = model
        self._cols: dict[str, list] | None = None
        self._exact: np.ndarray | None = None  # exact vectors for re-ranking (memory-mapped when loaded)
        self._apply_search_params()

    # --- properties ------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    def __repr__(self) -> str:
        return f"Index(kind={self.kind!r}, n={len(self)}, dim={self.dim}, field={self.info.get('field')!r})"

    @property
    def dim(self) -> int:
        return int(self.faiss_index.d)

    @property
    def kind(self) -> str:
        return self.info["kind"]

    @property
    def recall_at_10(self) -> float | None:
        return self.info.get("recall_at_10")

    def _apply_search_params(self) -> None:
        params = self.info.get("params", {})
        if "nprobe" in params:
            _set_breadth(self.faiss_index, "nprobe", params["nprobe"])
        if "ef_search" in params and hasattr(self.faiss_index, "hnsw"):
            self.faiss_index.hnsw.efSearch = int(params["ef_search"])

    # --- building --------------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, data, *, field: str = "auto", kind: str = "auto", approx_threshold: int = APPROX_THRESHOLD,
              recall_target: float = 0.95, nlist: int | None = None, hnsw_m: int = 32,
              queries: np.ndarray | None = None, metadata: dict[str, Sequence] | None = None, seed: int = 0,
              dedupe: bool = True, allow_partial: bool = False, model=None, max_memory: int | str | None = None,
              max_query_ms: float | None = None, rerank: int = 0, pq_m: int | None = None,
              opq: bool | None = None, engine: str = "local", workers: int = 2,
              add_chunk: int = _ADD_CHUNK, stream: bool | None = None, coarse: str = "auto",
              on_disk: bool | None = None, train_per_list: int = TRAIN_PER_LIST, kmeans: str = "auto") -> "Index":
        """Index ``data``: an embedding job directory, an :class:`~cliplab.pipeline.Embeddings`, an array
        ``[n, dim]`` or an :class:`~cliplab.index.sources.ArraySource` of normalised (e.g. memory-mapped) vectors
        (then ``metadata`` may give ``ids``/``paths``/``captions`` lists). ``field``: ``image``,
        ``text`` or ``auto`` (image vectors when the job has any). ``queries`` (optional ``[q, dim]``) are used to
        measure recall; by default the other modality's vectors (the realistic queries) or a database sample.
        ``dedupe``: in an image index, rows that share an image file (one row per caption) are indexed once, with
        the first row's metadata. An unfinished job (manifest ``complete: false``, e.g. an interrupted embed) raises
        :class:`IncompleteJobError` unless ``allow_partial``; then what is done is indexed and ``info["partial"]``
        says so (with ``items_done`` and ``items_total``).

        Large collections (see :mod:`cliplab.index.sizing`): ``max_memory`` (bytes or ``"4GB"``) bounds the index's
        size, so ``kind="auto"`` moves from IVF-Flat to IVF-SQ8 to IVF-PQ (``kind="ivfsq"`` or ``"ivfpq"`` force them; ``pq_m`` and ``opq``
        override the code size and the rotation; ``coarse`` picks the IVF kinds' coarse quantiser, ``flat`` or an
        ``hnsw`` graph, by default a graph from 4,096 lists on); the choice and its reasons go to ``info["plan"]``.
        ``max_query_ms`` caps the tuned search breadth by the measured median query time. ``rerank=R`` keeps the
        exact vectors next to an approximate index (``vectors.npy``, memory-mapped when loaded) and rescores the
        top ``R * k`` candidates of every query with them. ``engine="ray"`` encodes the vectors of an IVF index
        (``ivf``, ``ivfsq``, ``ivfpq``) in parallel Ray tasks (``workers`` CPUs), ``add_chunk`` rows each, and merges their lists:
        the same index as the local build, which adds the same chunks in turn (:mod:`cliplab.index.distributed`).
        ``stream``: read a job directory's vectors shard by shard instead of all at once (:mod:`cliplab.index.sources`;
        the same index); ``None`` streams jobs whose vectors exceed :data:`STREAM_BYTES`.

        ``on_disk``: keep an IVF index's inverted lists in ``index.ivfdata`` (faiss ``OnDiskInvertedLists``,
        memory-mapped; :mod:`cliplab.index.ondisk`), built a block at a time so the build never holds them all;
        ``None`` does so when the index's estimate exceeds ``max_memory`` (or 4 GB with no budget).
        ``train_per_list``: k-means training points per list (see :func:`cliplab.index.sizing.train_points`);
        ``kmeans``: ``one-level`` (faiss's k-means), ``two-level`` (:mod:`cliplab.index.kmeans`) or ``auto`` (two
        levels from 2,048 lists on)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if field not in ("auto", "image", "text"):
            raise ValueError(f"field must be auto, image or text, got {field!r}")
        if rerank < 0:
            raise ValueError(f"rerank must be >= 0, got {rerank}")
        if engine not in ("local", "ray"):
            raise ValueError(f"engine must be local or ray, got {engine!r}")
        t0 = time.perf_counter()
        # 1. gather: the vectors (in memory or shard by shard) and one metadata row each
        got = gather(data, field=field, metadata=metadata, dedupe=dedupe, allow_partial=allow_partial, stream=stream)
        source = got.source
        # 2. plan: which index, its sizes, where its lists live, and why
        plan = plan_index(source.n, source.dim, kind=kind, max_memory=max_memory, approx_threshold=approx_threshold,
                          nlist=nlist, pq_m=pq_m, opq=opq, hnsw_m=hnsw_m, coarse=coarse,
                          train_per_list=train_per_list, on_disk=on_disk, kmeans=kmeans)
        scratch = _Scratch()  # on-disk lists and a streamed build's re-ranking copy, until save() copies them
        steps = {"gather": time.perf_counter() - t0}  # seconds per step, recorded
        try:
            # 3. construct: train on a sample, add the chunks (locally, on Ray, or into on-disk lists)
            t = time.perf_counter()
            adder = _adder(plan, source, engine, workers, add_chunk, scratch)
            index, params = train_and_add(plan, source, hnsw_m=hnsw_m, seed=seed,
                                          add_all=lambda ix: _timed(steps, "add", adder, ix))
            steps["train"] = time.perf_counter() - t - steps["add"]
            if plan.on_disk:
                params["on_disk"] = True
            info = cls._describe(got, plan, params, engine, approx_threshold, max_memory)
            # 4. tune: the search breadth of an approximate index, against exact search
            t = time.perf_counter()
            vectors = _exact_copy(source, scratch) if rerank and plan.kind != "flat" else None
            if plan.kind == "flat":
                info.update(exact=True, recall_at_10=1.0, recall_note="exact search")
            else:
                info.update(_tune(index, plan.kind, params, source, queries, seed, add_chunk, vectors, rerank,
                                  recall_target, max_query_ms))
            steps["tune"] = time.perf_counter() - t
        except BaseException:
            scratch.remove()
            raise
        info["build_seconds"] = round(time.perf_counter() - t0, 3)
        info["build_steps_seconds"] = {k: round(v, 3) for k, v in steps.items()}
        out = cls(index, _metadata_table(got), info, model=model)
        out._exact = vectors
        scratch.remove_with(out)  # the memory maps keep the files readable till then
        return out

    @staticmethod
    def _describe(got, plan, params: dict[str, Any], engine: str, approx_threshold: int,
                  max_memory) -> dict[str, Any]:
        """``index.json``'s description of a build (before tuning)."""
        from .distributed import DISTRIBUTED_KINDS

        info: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": plan.kind,
                                "metric": "cosine", "field": got.field, "n": got.source.n, "dim": got.source.dim,
                                "approx_threshold": approx_threshold, "source": got.source_dir,
                                "duplicates_skipped": got.duplicates, **got.partial, "params": params,
                                "plan": {**plan.to_dict(), "max_memory": parse_bytes(max_memory)},
                                "engine": engine if plan.kind in DISTRIBUTED_KINDS else "local"}
        if got.manifest:
            info["model"] = {k: v for k, v in got.manifest.get("model", {}).items() if k != "config"}
            info["preprocess"] = got.manifest.get("preprocess")
            info["embedding_dtype"] = got.manifest.get("embedding", {}).get("dtype")
        return info

    # --- persistence ------------------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``index.faiss``, ``metadata.arrow`` and ``index.json`` (each atomically) into ``directory``, with
        ``index.ivfdata`` (on-disk lists) and ``vectors.npy`` (re-ranking) where the index has them. The folder is
        self-contained: it may be moved or copied as a whole."""
        import pyarrow as pa

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        _write_index(self.faiss_index, d, INDEX_FILE, f".{INDEX_FILE}.tmp-{pid}")  # with index.ivfdata if on disk
        tmp = d / f".{META_FILE}.tmp-{pid}"
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, self.metadata.schema) as w:
            w.write_table(self.metadata)
        os.replace(tmp, d / META_FILE)
        if self._exact is not None:
            tmp = d / f".{VECTORS_FILE}.tmp-{pid}.npy"
            if isinstance(self._exact, np.memmap) and self._exact.filename:  # a file already: copy it, not via RAM
                if Path(self._exact.filename).resolve() != (d / VECTORS_FILE).resolve():
                    self._exact.flush()
                    shutil.copyfile(self._exact.filename, tmp)
                    os.replace(tmp, d / VECTORS_FILE)
            else:
                np.save(tmp, np.ascontiguousarray(self._exact, dtype=np.float32))
                os.replace(tmp, d / VECTORS_FILE)
        elif (d / VECTORS_FILE).exists():  # an older index's exact vectors do not belong to this one
            (d / VECTORS_FILE).unlink()
        from ..pipeline.shards import atomic_write_json
        from ..version import __version__

        atomic_write_json(d / INFO_FILE, {**self.info, "faiss_version": getattr(_faiss(), "__version__", "?"),
                                          "cliplab_version": __version__})
        return d

    @classmethod
    def resolve_dir(cls, path: str | os.PathLike) -> Path:
        """``path`` itself if it holds an index, else ``path/index`` (the default place next to an embed job)."""
        p = Path(path)
        if (p / INFO_FILE).exists():
            return p
        if (p / "index" / INFO_FILE).exists():
            return p / "index"
        if not p.exists():
            raise FileNotFoundError(f"no such index directory: {p}")
        raise FileNotFoundError(f"{p} holds no index ({INFO_FILE}); build one with: cliplab index {p}")

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = True, model=None) -> "Index":
        """Open a saved index; with ``mmap`` the vectors and metadata are memory-mapped, not read. On-disk inverted
        lists (``index.ivfdata``) are always mapped (read-only), from the index's own folder."""
        import pyarrow as pa

        faiss = _faiss()
        d = cls.resolve_dir(path)
        info = json.loads((d / INFO_FILE).read_text())
        if info.get("format") != FORMAT:
            raise ValueError(f"{d / INFO_FILE} is not a cliplab index description")
        index, mode = None, "read"
        on_disk = bool(info.get("params", {}).get("on_disk"))
        extra = read_flags(on_disk)  # on-disk lists: found next to index.faiss, mapped read-only
        with quiet_c_stdout() if on_disk else contextlib.nullcontext():  # faiss prints where it found the lists
            if mmap and not on_disk:  # (faiss 1.15 crashes searching on-disk lists read with IO_FLAG_MMAP)
                for name in ("IO_FLAG_MMAP_IFC", "IO_FLAG_MMAP"):
                    flag = getattr(faiss, name, None)
                    if flag is None:
                        continue
                    try:
                        index, mode = faiss.read_index(str(d / INDEX_FILE), flag), name
                        break
                    except Exception:  # this index type cannot be mapped: try the next way
                        continue
            if index is None:
                index = faiss.read_index(str(d / INDEX_FILE), extra)
        if on_disk:
            mode = f"{ONDISK_FILE} mapped"
        if mmap:
            table = pa.ipc.open_file(pa.memory_map(str(d / META_FILE), "r")).read_all()
        else:
            table = pa.ipc.open_file(pa.OSFile(str(d / META_FILE), "rb")).read_all()
        if table.num_rows != index.ntotal:
            raise ValueError(f"{d}: metadata has {table.num_rows} rows but the index {index.ntotal} vectors")
        out = cls(index, table, info, model=model)
        if info.get("params", {}).get("rerank") and (d / VECTORS_FILE).exists():
            out._exact = np.load(d / VECTORS_FILE, mmap_mode="r" if mmap else None)
            if out._exact.shape != (index.ntotal, index.d):
                raise ValueError(f"{d / VECTORS_FILE} holds {out._exact.shape} vectors for an index of "
                                 f"{index.ntotal} x {index.d}")
        out.info["loaded_with"] = mode
        out.path = d
        return out

    # --- searching --------------------------------------------------------------------------------------------------
    def _column(self, name: str) -> list:
        if self._cols is None:
            self._cols = {}
        if name not in self._cols:
            self._cols[name] = self.metadata.column(name).to_pylist()
        return self._cols[name]

    def row(self, r: int) -> dict[str, Any]:
        return {"id": self._column("id")[r], "index": self._column("index")[r], "path": self._column("path")[r],
                "caption": self._column("caption")[r]}

    def search(self, queries: np.ndarray, k: int = 10, *, exclude_self: bool = False,
               query_paths: Sequence[str | os.PathLike | None] | None = None) -> list[Hit] | list[list[Hit]]:
        """Nearest rows to one query vector (``[dim]`` -> ``list[Hit]``) or several (``[q, dim]`` -> one list per
        query), best first, ranked from 1. Queries are normalised here; scores are cosine similarities.

        ``exclude_self`` leaves out the query itself: rows with an identical embedding (cosine >= 1 -
        :data:`SELF_TOLERANCE`) and, in an index of images, rows whose file is the query's file (``query_paths``,
        one per query, compared as resolved absolute paths). More candidates are fetched so that ``k`` hits still
        come back when the index has them."""
        q = np.asarray(queries, dtype=np.float32)
        single = q.ndim == 1
        q = _normalize(q)
        if q.shape[1] != self.dim:
            raise ValueError(f"query dimension {q.shape[1]} != index dimension {self.dim}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if query_paths is not None and len(query_paths) != len(q):
            raise ValueError(f"query_paths has {len(query_paths)} entries for {len(q)} queries")
        n, k = len(self), int(k)
        rerank = int(self.info.get("params", {}).get("rerank", 0))
        if not exclude_self:
            scores, rows = _top_k(self.faiss_index, q, min(k, n), self._exact, rerank)
            out = [self._hits(zip(srow, rrow)) for srow, rrow in zip(scores, rows)]
            return out[0] if single else out
        paths = self._column("path")
        # a caption's path names the image it describes, not the row itself: files are compared in image indexes only
        by_file = self.info.get("field") != "text" and query_paths is not None
        own = [_resolved(p) if by_file and p is not None else None for p in (query_paths or [None] * len(q))]
        out: list[list[Hit] | None] = [None] * len(q)
        todo, fetch = list(range(len(q))), min(k + 1, n)
        while todo:
            scores, rows = _top_k(self.faiss_index, q[todo], fetch, self._exact, rerank)
            again = []
            for j, srow, rrow in zip(todo, scores, rows):
                keep = [(s, r) for s, r in zip(srow, rrow) if r >= 0 and s < 1.0 - SELF_TOLERANCE and
                        not (own[j] is not None and paths[r] is not None and _resolved(paths[r]) == own[j])]
                if len(keep) < k and fetch < n and rrow[-1] >= 0:  # -1 padding: the index has no more to give
                    again.append(j)
                else:
                    out[j] = self._hits(keep[:k])
            todo, fetch = again, min(2 * fetch, n)
        return out[0] if single else out

    def vector(self, row: int) -> tuple[np.ndarray, bool]:
        """The stored (normalised) vector of ``row`` and whether it is exact: the re-ranking copy when the index
        keeps one, else what the index holds (exact for flat, IVF-Flat and HNSW; decoded, so approximate, for
        IVF-SQ8 and IVF-PQ). Raises ``LookupError`` if the index cannot give it back (an IVF index without a direct map)."""
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} is outside the index (0..{len(self) - 1})")
        if self._exact is not None:
            return np.asarray(self._exact[row], np.float32), True
        try:
            if self.kind in IVF_KINDS and not getattr(self, "_direct_map", False):
                # id -> (list, offset) table, built once on first use (8 bytes per vector)
                _faiss().extract_index_ivf(self.faiss_index).make_direct_map()
                self._direct_map = True
            vec = self.faiss_index.reconstruct(int(row))
        except RuntimeError as e:
            raise LookupError(f"this {self.kind} index cannot give back its vectors ({e})".splitlines()[0]) from None
        return np.asarray(vec, np.float32), self.kind not in ("ivfsq", "ivfpq")

    def _hits(self, pairs: Iterable[tuple[float, int]]) -> list[Hit]:
        """``(score, row)`` pairs, best first, as hits ranked from 1 (faiss's ``-1`` padding rows dropped)."""
        ids, idx, paths, caps = (self._column(c) for c in ("id", "index", "path", "caption"))
        return [Hit(rank, float(s), ids[r], paths[r], caps[r], int(r), idx[r])
                for rank, (s, r) in enumerate(((s, int(r)) for s, r in pairs if r >= 0), start=1)]

    # --- queries through the model ----------------------------------------------------------------------------------
    def model(self):
        """The model that made the vectors (loaded from what the index recorded), or the one given."""
        if self._model is None:
            from ..pipeline.modelref import load_model_from_info

            if "model" not in self.info:
                raise ValueError("this index records no model; pass model=")
            self._model = load_model_from_info(self.info["model"])
        return self._model

    def _check_model(self, model) -> None:
        if model.config.embed_dim != self.dim:
            raise ValueError(f"model {model.config.name!r} makes {model.config.embed_dim}-d vectors, the index "
                             f"holds {self.dim}-d ones")

    def search_text(self, texts: str | Sequence[str], k: int = 10, model=None, *, exclude_self: bool = False):
        """Encode text(s) with the model and search; a single string gives ``list[Hit]``. An empty (or
        whitespace-only) text is refused with ``ValueError``. ``exclude_self``: see :meth:`search` (here: rows with
        the query's own embedding, i.e. the same caption in a caption index)."""
        import torch

        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        empty = [i for i, t in enumerate(batch) if not isinstance(t, str) or not t.strip()]
        if empty:
            raise ValueError("the query is empty" if single else f"query {empty[0]} of {len(batch)} is empty "
                             f"(or not a string)")
        model = model or self.model()
        self._check_model(model)
        with torch.inference_mode():
            q = model.encode_texts(batch, normalize=True).float().cpu().numpy()
        res = self.search(q, k, exclude_self=exclude_self)
        return res[0] if single else res

    def search_image(self, images, k: int = 10, model=None, *, exclude_self: bool = False):
        """Encode image(s) (paths, bytes or PIL images) and search; a single image gives ``list[Hit]``.
        ``exclude_self`` leaves out the query image itself: in an image index, the row of the same file (resolved
        absolute paths) and any row with an identical embedding (an exact copy, or a PIL image of an indexed one);
        see :meth:`search`. Off by default (see docs/search.md)."""
        import torch

        model = model or self.model()
        self._check_model(model)
        single = not isinstance(images, (list, tuple))
        batch = [images] if single else list(images)
        with torch.inference_mode():
            pixels = model.preprocessor.batch(batch).to(model.device, model.dtype)
            q = model.encode_image(pixels, normalize=True).float().cpu().numpy()
        query_paths = [im if isinstance(im, (str, os.PathLike)) else None for im in batch]
        res = self.search(q, k, exclude_self=exclude_self, query_paths=query_paths)
        return res[0] if single else res

    def is_self(self, hit: Hit, query_path: str | os.PathLike | None = None) -> bool:
        """Whether ``hit`` is the query itself by the rules of ``exclude_self`` (identical embedding, or in an image
        index the query's own file)."""
        if hit.score >= 1.0 - SELF_TOLERANCE:
            return True
        return (self.info.get("field") != "text" and query_path is not None and hit.path is not None
                and _resolved(hit.path) == _resolved(query_path))


class _Scratch:
    """A temporary folder made on first use (for files a build writes before :meth:`Index.save` copies them)."""

    def __init__(self):
        self.path: str | None = None

    def __call__(self) -> str:
        if self.path is None:
            self.path = tempfile.mkdtemp(prefix="cliplab-index-")
        return self.path

    def remove(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, True)

    def remove_with(self, owner) -> None:
        if self.path is not None:
            weakref.finalize(owner, shutil.rmtree, self.path, True)


def _adder(plan, source, engine: str, workers: int, add_chunk: int, scratch: _Scratch):
    """How the trained index gets its vectors: the same chunks in the same order, added locally, encoded on Ray, or
    (on-disk lists) encoded into blocks merged on disk."""
    from .distributed import DISTRIBUTED_KINDS, add_on_ray

    ray = engine == "ray" and plan.kind in DISTRIBUTED_KINDS

    def add_all(index):
        if ray:  # shards are read by the tasks themselves; arrays travel from here
            sharded = isinstance(source, ShardSource)
            return add_on_ray(index, source.chunk_plan(add_chunk) if sharded else source.chunks(add_chunk),
                              workers=workers, scratch=scratch() if plan.on_disk else None,
                              column=source.column if sharded else None)
        if plan.on_disk:
            return add_on_disk(index, source.chunks(add_chunk), scratch())
        for chunk in source.chunks(add_chunk):
            index.add(chunk)
        return index

    return add_all


def _timed(steps: dict[str, float], name: str, fn, *args):
    t = time.perf_counter()
    try:
        return fn(*args)
    finally:
        steps[name] = time.perf_counter() - t


def _exact_copy(source, scratch: _Scratch) -> np.ndarray:
    """The exact vectors for re-ranking: the array itself, or a streamed source written to a scratch file."""
    return source.array() if isinstance(source, ArraySource) else source.array(scratch())


def _tune(index, kind: str, params: dict[str, Any], source, queries, seed: int, chunk: int, vectors, rerank: int,
          recall_target: float, max_query_ms: float | None) -> dict[str, Any]:
    """Tune an approximate index's search breadth to the recall target (``params`` gets the choice); the info to
    record."""
    q, qsrc = recall_queries(source, queries, seed)
    param, grid = breadth_grid(kind, params)
    chosen, tuned = tune_breadth(index, param, grid, q, exact_truth(source, q, chunk), vectors=vectors,
                                 rerank=rerank, recall_target=recall_target, max_query_ms=max_query_ms)
    params[param] = chosen
    if rerank:
        params["rerank"] = int(rerank)
    return {"exact": False, "recall_target": recall_target, "recall_queries": len(q), "recall_query_source": qsrc,
            **tuned}


def _metadata_table(got):
    """One metadata row per vector: id, item index, path, caption."""
    import pyarrow as pa

    return pa.table({"id": pa.array(got.ids, pa.string()), "index": pa.array(got.item_index, pa.int64()),
                     "path": pa.array(got.paths, pa.string()), "caption": pa.array(got.captions, pa.string())})


def _resolved(path: str | os.PathLike) -> str:
    """A file's resolved absolute path (symlinks followed), for comparing two spellings of one file."""
    try:
        return str(Path(path).expanduser().resolve())
    except (OSError, RuntimeError):
        return os.path.abspath(os.fspath(path))


def resident_memory_mb() -> float | None:
    """This process's resident memory in MB (Linux ``/proc``; None elsewhere): what a memory-mapped index costs
    once the pages its queries touch are in."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def iter_hits(results: Iterable[Hit]) -> list[dict[str, Any]]:
    return [h.to_dict() for h in results]
