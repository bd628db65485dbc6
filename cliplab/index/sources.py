"""Where :meth:`cliplab.index.Index.build` reads vectors from: an array in memory, or an embedding job's Parquet
shards read one at a time (:class:`ShardSource`), so that a job larger than memory can be indexed. Both give the
same rows in the same order (item order; rows without a vector of the field left out; in an image index, rows that
repeat an image file left out after the first) and the same metadata, so the two builds give the same index."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

__all__ = ["ArraySource", "ShardSource", "ShardChunk", "read_chunk"]

#: one chunk of a :class:`ShardSource` as (shard file, rows of that shard) pieces, in index order: what a Ray task
#: needs to read the chunk's vectors itself
ShardChunk = list[tuple[str, np.ndarray]]


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """A float32 copy with unit rows (zero rows stay zero); a ``[dim]`` vector becomes ``[1, dim]``."""
    x = np.array(x, dtype=np.float32, copy=True, order="C")
    if x.ndim == 1:
        x = x[None]
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def first_of_each_file(rows, paths, seen: set[str]) -> np.ndarray:
    """``rows`` without those whose file is already in ``seen`` (which is updated): several rows (captions) of one
    image file are indexed once, with the first row's metadata. Rows without a path are all kept."""
    first = []
    for i in rows:
        p = paths[i]
        if p is None or p not in seen:
            first.append(i)
            if p is not None:
                seen.add(p)
    return np.asarray(first, dtype=np.int64)


class ArraySource:
    """Normalised vectors in memory (and optionally the other modality's, for recall queries)."""

    def __init__(self, x: np.ndarray, other: np.ndarray | None = None):
        self.x = x
        self.n, self.dim = x.shape
        self.other = other
        self.other_count = 0 if other is None else len(other)

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        for start in range(0, self.n, size):
            yield self.x[start:start + size]

    def take(self, rows: Sequence[int]) -> np.ndarray:
        return self.x[np.asarray(rows, dtype=np.int64)]

    def take_other(self, rows: Sequence[int]) -> np.ndarray:
        return normalize_rows(self.other[np.asarray(rows, dtype=np.int64)])

    def array(self) -> np.ndarray:
        return self.x


class ShardSource:
    """The ``field`` vectors of an embedding job, read shard by shard: one pass reads the metadata (and which rows
    have vectors); vectors are then read per shard whenever they are needed, never all at once."""

    def __init__(self, job_dir: str | os.PathLike, field: str, dedupe: bool = True):
        import pyarrow.parquet as pq

        from ..pipeline.shards import ShardStore, fixed_list_to_numpy

        self._fixed = fixed_list_to_numpy
        store = ShardStore(job_dir)
        self.files = [store.shard_path(k) for k in sorted(store.committed())]
        columns = {"image": "image_embedding", "text": "text_embedding"}
        self.column, self.other_column = columns[field], columns["text" if field == "image" else "image"]
        self.ids, self.paths, self.captions, self.item_index = [], [], [], []
        self.keep: list[np.ndarray] = []  # per shard: the rows indexed, in order
        self.other_keep: list[np.ndarray] = []  # per shard: the rows with a vector of the other modality
        self.duplicates, self.dim = 0, None
        seen: set[str] = set()
        for path in self.files:
            names = pq.read_schema(path).names
            if self.column not in names:
                raise ValueError(f"the embeddings have no {field} vectors (the job did not embed {field}s)")
            wanted = ["index", "id", "path", "caption", self.column] + \
                ([self.other_column] if self.other_column in names else [])
            table = pq.read_table(path, columns=wanted)
            vecs, valid = fixed_list_to_numpy(table.column(self.column))
            self.dim = vecs.shape[1]
            rows = np.flatnonzero(valid)
            paths = table.column("path").to_pylist()
            if field == "image" and dedupe:
                first = first_of_each_file(rows, paths, seen)
                self.duplicates += len(rows) - len(first)
                rows = first
            self.keep.append(rows)
            ids, caps, idx = (table.column(c).to_pylist() for c in ("id", "caption", "index"))
            self.ids += [ids[i] for i in rows]
            self.paths += [paths[i] for i in rows]
            self.captions += [caps[i] for i in rows]
            self.item_index += [idx[i] for i in rows]
            if self.other_column in names:
                _, o_valid = fixed_list_to_numpy(table.column(self.other_column))
                self.other_keep.append(np.flatnonzero(o_valid))
            else:
                self.other_keep.append(np.zeros(0, np.int64))
            del vecs, table
        self.n = len(self.ids)
        self.other_count = int(sum(len(r) for r in self.other_keep))
        self._starts = np.cumsum([0] + [len(r) for r in self.keep])
        self._other_starts = np.cumsum([0] + [len(r) for r in self.other_keep])

    def _read(self, shard: int, column: str) -> np.ndarray:
        return _read_column(self.files[shard], column)

    def chunk_plan(self, size: int) -> list[ShardChunk]:
        """The rows of :meth:`chunks` ``(size)``, chunk by chunk, as (shard file, rows) pieces: read with
        :func:`read_chunk`, each gives the same vectors as the matching chunk."""
        plan: list[ShardChunk] = []
        current: ShardChunk = []
        held = 0
        for s, rows in enumerate(self.keep):
            pos = 0
            while pos < len(rows):
                take = min(size - held, len(rows) - pos)
                current.append((str(self.files[s]), rows[pos:pos + take]))
                held, pos = held + take, pos + take
                if held == size:
                    plan.append(current)
                    current, held = [], 0
        if current:
            plan.append(current)
        return plan

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        """Normalised vectors in index order, ``size`` rows at a time (chunks never span a shard boundary's
        buffer: at most one shard is in memory)."""
        buffer: list[np.ndarray] = []
        held = 0
        for s, rows in enumerate(self.keep):
            if not len(rows):
                continue
            part = normalize_rows(self._read(s, self.column)[rows])
            buffer.append(part)
            held += len(part)
            while held >= size:
                joined = np.concatenate(buffer)
                yield joined[:size]
                rest = joined[size:]
                buffer, held = ([rest] if len(rest) else []), len(rest)
        if held:
            yield np.concatenate(buffer)

    def _gather(self, rows: Sequence[int], keep, starts, column) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.zeros((len(rows), self.dim), np.float32)
        shard_of = np.searchsorted(starts, rows, side="right") - 1
        for s in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == s)
            vecs = self._read(int(s), column)
            out[sel] = vecs[keep[s][rows[sel] - starts[s]]]
        return normalize_rows(out)

    def take(self, rows: Sequence[int]) -> np.ndarray:
        """Rows (positions in the index) in the order given, normalised."""
        return self._gather(rows, self.keep, self._starts, self.column)

    def take_other(self, rows: Sequence[int]) -> np.ndarray:
        """Rows among the other modality's vectors (in item order), normalised."""
        return self._gather(rows, self.other_keep, self._other_starts, self.other_column)

    def array(self, directory: str | os.PathLike) -> np.ndarray:
        """Every vector, written to ``directory/vectors.npy`` chunk by chunk and memory-mapped."""
        out = np.lib.format.open_memmap(Path(directory) / "vectors.npy", mode="w+", dtype=np.float32,
                                        shape=(self.n, self.dim))
        start = 0
        for chunk in self.chunks(65_536):
            out[start:start + len(chunk)] = chunk
            start += len(chunk)
        out.flush()
        return out


def _read_column(path, column: str) -> np.ndarray:
    """One shard's vectors of ``column`` (zeros where a row has none)."""
    import pyarrow.parquet as pq

    from ..pipeline.shards import fixed_list_to_numpy

    return fixed_list_to_numpy(pq.read_table(path, columns=[column]).column(column))[0]


def read_chunk(chunk: ShardChunk, column: str) -> np.ndarray:
    """A :meth:`ShardSource.chunk_plan` chunk's vectors, read from its shards and normalised (rows are normalised
    one by one, so this equals the matching chunk of :meth:`ShardSource.chunks`)."""
    return np.concatenate([normalize_rows(_read_column(path, column)[rows]) for path, rows in chunk])
