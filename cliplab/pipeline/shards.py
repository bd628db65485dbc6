"""Parquet shards, committed atomically, and everything derived from them.

Layout of a job's output directory::

    job.json                 what the job is (source, model, options): a rerun must match it to resume
    plan.parquet             the frozen item list (index, id, path, caption, key, error), written once
    shards/part-NNNNN.parquet   rows of items [N*shard_size, (N+1)*shard_size) that were embedded
    rejects/part-NNNNN.jsonl    the items of that range that were rejected (written *before* the shard)
    rejects.jsonl            merged rejects of all committed shards (written at the end)
    manifest.json            model, preprocessing, versions, counts; rewritten after every shard

A shard is committed by renaming a fully written temporary file (``.part-NNNNN.parquet.tmp-PID``) to its final
name, so it either exists completely or not at all; its presence is the only record that its items are done.
Each shard carries its own counts in the Parquet key-value metadata (key ``cliplab``), so the manifest is
recomputed from the shards present and a crash at any instant leaves nothing to repair but temporary files.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Any, Iterable

import numpy as np

__all__ = [
    "SHARDS_DIR", "MANIFEST_FILE", "JOB_FILE", "PLAN_FILE", "ShardStore", "shard_schema", "build_shard_table",
    "fixed_list_to_numpy", "atomic_write_json", "read_table", "crashpoint",
]

SHARDS_DIR = "shards"
MANIFEST_FILE = "manifest.json"
JOB_FILE = "job.json"
PLAN_FILE = "plan.parquet"
META_KEY = b"cliplab"
_SHARD_RE = re.compile(r"^part-(\d{5,})\.parquet$")
_DTYPES = {"float32": np.float32, "float16": np.float16}


def crashpoint(name: str) -> None:
    """Fault injection for the resume tests: ``CLIPLAB_CRASH_AT=name[:n]`` SIGKILLs this process the n-th time
    (default 1st) execution reaches ``name``. Costs one dict lookup when unset."""
    spec = os.environ.get("CLIPLAB_CRASH_AT")
    if not spec:
        return
    target, _, nth = spec.rpartition(":")
    if not nth.isdigit():
        target, nth = spec, "1"
    if target != name:
        return
    count = _CRASH_COUNTS.get(name, 0) + 1
    _CRASH_COUNTS[name] = count
    if count >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


_CRASH_COUNTS: dict[str, int] = {}


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_schema(dim: int, dtype: str, with_image: bool, with_text: bool):
    import pyarrow as pa

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    value = pa.float16() if dtype == "float16" else pa.float32()
    fields = [pa.field("index", pa.int64(), nullable=False), pa.field("id", pa.string(), nullable=False),
              pa.field("path", pa.string()), pa.field("caption", pa.string())]
    if with_image:
        fields.append(pa.field("image_embedding", pa.list_(value, dim)))
    if with_text:
        fields += [pa.field("text_embedding", pa.list_(value, dim)), pa.field("caption_truncated", pa.bool_()),
                   pa.field("caption_tokens_dropped", pa.int32())]
    return pa.schema(fields)


def _fixed_list(values: np.ndarray | None, valid: np.ndarray, dim: int, dtype: str):
    import pyarrow as pa

    n = len(valid)
    np_dtype = _DTYPES[dtype]
    flat = np.zeros((n, dim), dtype=np_dtype) if values is None else np.asarray(values, dtype=np_dtype)
    value_type = pa.float16() if dtype == "float16" else pa.float32()
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=value_type), dim,
                                             mask=pa.array(~valid))


def build_shard_table(items: list, image: dict[int, np.ndarray], text: dict[int, tuple[np.ndarray, bool, int]],
                      rejected: set[int], schema, dim: int, dtype: str):
    """Rows (in item order) for the items of one shard that were not rejected."""
    import pyarrow as pa

    kept = [it for it in items if it.index not in rejected]
    n = len(kept)
    cols: dict[str, Any] = {
        "index": pa.array([it.index for it in kept], pa.int64()),
        "id": pa.array([it.id for it in kept], pa.string()),
        "path": pa.array([it.path for it in kept], pa.string()),
        "caption": pa.array([it.caption for it in kept], pa.string()),
    }
    names = set(schema.names)
    if "image_embedding" in names:
        valid = np.array([it.index in image for it in kept], dtype=bool)
        vals = np.zeros((n, dim), dtype=np.float32)
        for r, it in enumerate(kept):
            if valid[r]:
                vals[r] = image[it.index]
        cols["image_embedding"] = _fixed_list(vals, valid, dim, dtype)
    if "text_embedding" in names:
        valid = np.array([it.index in text for it in kept], dtype=bool)
        vals = np.zeros((n, dim), dtype=np.float32)
        trunc, dropped = [], []
        for r, it in enumerate(kept):
            if valid[r]:
                vals[r], t, d = text[it.index]
                trunc.append(bool(t))
                dropped.append(int(d))
            else:
                trunc.append(None)
                dropped.append(None)
        cols["text_embedding"] = _fixed_list(vals, valid, dim, dtype)
        cols["caption_truncated"] = pa.array(trunc, pa.bool_())
        cols["caption_tokens_dropped"] = pa.array(dropped, pa.int32())
    return pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)


def fixed_list_to_numpy(column) -> tuple[np.ndarray, np.ndarray]:
    """A fixed-size-list column (Arrow array or chunked array) -> ``(float32 [n, dim], valid bool [n])``; null rows
    are zeros."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    dim = column.type.list_size
    n = len(column)
    values = column.values.slice(column.offset * dim, n * dim)
    arr = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, dim)
    valid = column.is_valid().to_numpy(zero_copy_only=False) if column.null_count else np.ones(n, dtype=bool)
    if column.null_count:
        arr = np.where(valid[:, None], arr, np.float32(0))
    return arr, valid


class ShardStore:
    """The ``shards/`` and ``rejects/`` directories of one job."""

    def __init__(self, out_dir: str | os.PathLike):
        from .rejects import REJECTS_DIR

        self.out = Path(out_dir)
        self.shard_dir = self.out / SHARDS_DIR
        self.reject_dir = self.out / REJECTS_DIR

    def ensure(self) -> None:
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self.reject_dir.mkdir(parents=True, exist_ok=True)

    def shard_path(self, k: int) -> Path:
        return self.shard_dir / f"part-{k:05d}.parquet"

    def rejects_path(self, k: int) -> Path:
        return self.reject_dir / f"part-{k:05d}.jsonl"

    def cleanup(self) -> int:
        """Delete temporary files left by a killed run; returns how many."""
        n = 0
        for d in (self.shard_dir, self.reject_dir, self.out):
            if d.is_dir():
                for p in d.iterdir():
                    if p.name.startswith(".") and ".tmp-" in p.name:
                        p.unlink(missing_ok=True)
                        n += 1
        return n

    def committed(self) -> dict[int, dict[str, Any]]:
        """``{shard number: its stats}`` for every committed shard (read from Parquet metadata only)."""
        import pyarrow.parquet as pq

        out: dict[int, dict[str, Any]] = {}
        if not self.shard_dir.is_dir():
            return out
        for p in sorted(self.shard_dir.iterdir()):
            m = _SHARD_RE.match(p.name)
            if not m:
                continue
            meta = pq.read_schema(p).metadata or {}
            stats = json.loads(meta[META_KEY]) if META_KEY in meta else {}
            stats["file"] = f"{SHARDS_DIR}/{p.name}"
            out[int(m.group(1))] = stats
        return out

    def commit(self, k: int, table, rejects: list[dict[str, Any]], stats: dict[str, Any]) -> None:
        """Write shard ``k``: its rejects first (atomically), then the Parquet file (temp name, fsync, rename)."""
        import pyarrow.parquet as pq
        from .rejects import write_jsonl_atomic

        crashpoint("shard:start")
        write_jsonl_atomic(self.rejects_path(k), rejects)
        crashpoint("shard:rejects-written")
        final = self.shard_path(k)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        meta = dict(table.schema.metadata or {})
        meta[META_KEY] = json.dumps(stats).encode()
        pq.write_table(table.replace_schema_metadata(meta), tmp, compression="zstd")
        _fsync_path(tmp)
        crashpoint("shard:tmp-written")
        os.replace(tmp, final)
        crashpoint("shard:committed")

    def read_rejects(self, shards: Iterable[int]) -> list[dict[str, Any]]:
        from .rejects import read_jsonl

        out: list[dict[str, Any]] = []
        for k in sorted(shards):
            p = self.rejects_path(k)
            if p.exists():
                out.extend(read_jsonl(p))
        return out


def read_table(out_dir: str | os.PathLike, columns: list[str] | None = None):
    """All committed rows of a job, in item order, as one ``pyarrow.Table``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = ShardStore(out_dir)
    done = store.committed()
    if not done and not (Path(out_dir) / JOB_FILE).exists():
        raise FileNotFoundError(f"{out_dir} holds no embedding job output (no {JOB_FILE}, no shards)")
    tables = [pq.read_table(store.shard_path(k), columns=columns) for k in sorted(done)]
    if not tables:
        return None
    return pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
