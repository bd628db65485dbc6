"""Adding vectors to a trained IVF index on Ray: the quantiser is trained once on the driver, chunks of vectors are
encoded into copies of the empty index by parallel tasks (with their global ids), and the tasks' inverted lists are
merged back in chunk order (in memory, or on disk: :mod:`cliplab.index.ondisk`). A job read shard by shard sends
the tasks file names and row numbers only: each task reads its own rows from the Parquet shards. Every list then holds the same entries in the same order as a local build that adds the
same chunks one after another: the index is bit-identical (tested), only the encoding ran in parallel.

Flat and HNSW indexes are not distributed (a flat index has nothing to encode; HNSW graphs do not merge).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterable

import numpy as np

from .sizing import IVF_KINDS

__all__ = ["add_on_ray", "ray_session", "DISTRIBUTED_KINDS"]

DISTRIBUTED_KINDS = IVF_KINDS


@contextlib.contextmanager
def ray_session(workers: int):
    """A local Ray cluster with ``workers`` CPUs for the duration (or the cluster already connected)."""
    try:
        import ray
    except ImportError as e:
        raise RuntimeError(f"--engine ray needs Ray ({e}); pip install 'cliplab[ray]'") from None
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                 configure_logging=True)
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _encode_chunk(blob: np.ndarray, vectors, start: int, out_path: str | None = None, column: str | None = None):
    """The chunk's rows (ids from ``start``) in a copy of the empty index: serialised, or written to ``out_path``
    (a block for on-disk lists) and the path returned. ``vectors``: an array, or with ``column`` a
    :data:`~cliplab.index.sources.ShardChunk` that the task reads from the shards itself."""
    import faiss

    if column is not None:
        from .sources import read_chunk

        vectors = read_chunk(vectors, column)
    index = faiss.deserialize_index(blob)
    index.add_with_ids(vectors, np.arange(start, start + len(vectors), dtype=np.int64))
    if out_path is not None:
        faiss.write_index(index, out_path)
        return out_path
    return faiss.serialize_index(index)


def add_on_ray(index, chunks: Iterable, *, workers: int = 2, scratch: str | None = None, column: str | None = None):
    """``index`` (a trained, empty IVF index, possibly behind an OPQ rotation) with the rows of ``chunks`` added by
    Ray tasks, one per chunk; returns the merged index (ids 0..n-1, as a local ``add`` of the same chunks).

    ``chunks``: arrays, which travel from the driver through the object store; or, with ``column``, a shard
    source's :meth:`~cliplab.index.sources.ShardSource.chunk_plan`: each task then reads its own rows of that column
    from the Parquet shards (only file names and row numbers travel). With ``scratch`` (a folder the tasks can
    write: a local cluster) the tasks write their blocks there and the lists are merged on disk
    (:mod:`cliplab.index.ondisk`, ``scratch/index.ivfdata``)."""
    import faiss

    if index.ntotal:
        raise ValueError("add_on_ray expects an empty trained index")
    blob = faiss.serialize_index(index)
    with ray_session(workers) as ray:
        task = ray.remote(_encode_chunk)
        blob_ref = ray.put(blob)
        refs, start = [], 0
        for chunk in chunks:  # arrays: one chunk at a time into the object store
            out = None if scratch is None else str(Path(scratch) / f"block-{len(refs):05d}.faiss")
            if column is None:
                refs.append(task.remote(blob_ref, ray.put(np.ascontiguousarray(chunk)), start, out))
                start += len(chunk)
            else:
                refs.append(task.remote(blob_ref, chunk, start, out, column))
                start += sum(len(rows) for _, rows in chunk)
        parts = ray.get(refs)  # in submission order: chunk order
    if scratch is not None:
        from .ondisk import ONDISK_FILE, merge_blocks_on_disk

        try:
            return merge_blocks_on_disk(index, [Path(b) for b in parts], Path(scratch) / ONDISK_FILE)
        finally:
            for b in parts:
                Path(b).unlink(missing_ok=True)
    merged = faiss.deserialize_index(blob)
    ivf = faiss.extract_index_ivf(merged)
    for part_blob in parts:
        part = faiss.deserialize_index(part_blob)
        ivf.merge_from(faiss.extract_index_ivf(part), 0)  # 0: keep the tasks' global ids
    merged.ntotal = ivf.ntotal  # an OPQ wrapper counts its own vectors
    return merged
