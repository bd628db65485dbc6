"""Image-text pair tables in and out, and a resumable row job with exactly-once output (shared by the curation
methods and ``cliplab curate``).

* :func:`read_pairs` reads a CSV/TSV/JSONL/Parquet table the way every cliplab command does
  (``cliplab.data.tables.read_table_rows``); a row that cannot be used (bytes that do not decode, a malformed line,
  a missing or blank caption) gets a reason instead of stopping the read.
* :func:`write_pairs` writes rows as Parquet (``.parquet``/``.pq``) or CSV (``.csv``) through a temporary file that
  is renamed into place, so the output either exists whole or not at all. List values (rewrites) are Parquet lists,
  or JSON arrays in a CSV cell.
* :func:`run_rows` processes the rows in chunks like ``cliplab embed`` (``cliplab.pipeline.shards.ShardStore``): in
  the work folder ``OUT.parts/`` each chunk's rejects are written, then its rows as a Parquet file renamed into
  place; a chunk's file is the only record that it is done. A rerun with the same job (``job.json``: method,
  options, the input's size and SHA-256) skips committed chunks and redoes the rest, so a crash at any instant
  leaves every row either done once or to be done. The final table and ``OUT.rejects.jsonl`` are rebuilt from the
  committed chunks.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["Pairs", "read_pairs", "write_pairs", "read_output", "RowJobResult", "run_rows", "work_dir",
           "rejects_path", "finish", "rebase_images", "JobMismatchError", "ROW_COLUMN"]

#: column of every output row: the row's position among the input's rows (0-based), so outputs join back to inputs
ROW_COLUMN = "row"
OUTPUT_SUFFIXES = (".parquet", ".pq", ".csv")


class JobMismatchError(ValueError):
    """``OUT.parts/`` holds a different job (method, options or input); pass overwrite=True (``--overwrite``)."""


@dataclass
class Pairs:
    """Rows of a pairs table; ``errors[i]`` says why row ``i`` cannot be used (None when it can)."""

    file: str
    columns: list[str]
    rows: list[dict[str, Any]]
    errors: list[str | None]
    caption_column: str = "caption"

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def captions(self) -> list[str | None]:
        return [r.get(self.caption_column) if e is None else None for r, e in zip(self.rows, self.errors)]


def read_pairs(path: str | os.PathLike, caption_column: str = "caption", encoding: str = "utf-8") -> Pairs:
    """The rows of a table with at least ``caption_column`` (module docstring)."""
    from ..data.tables import read_table_rows

    table = read_table_rows(path, encoding)
    if table.rows and caption_column not in table.columns:
        raise ValueError(f"{path}: no column {caption_column!r} (columns: {table.columns}); pass the caption column")
    name = os.path.basename(os.fspath(path))
    errors: list[str | None] = []
    for row, line, error in zip(table.rows, table.lines, table.errors):
        caption = row.get(caption_column)
        if error is None:
            if caption is None or (isinstance(caption, str) and not caption.strip()):
                error = f"{name}:{line}: empty caption"
            elif not isinstance(caption, str):
                error = f"{name}:{line}: the caption is a {type(caption).__name__}, not text"
        errors.append(error)
    return Pairs(os.fspath(path), list(table.columns), table.rows, errors, caption_column)


def _check_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"{path}: write .parquet or .csv (got {suffix or 'no suffix'!r})")
    return suffix


def write_pairs(rows: Sequence[dict[str, Any]], path: str | os.PathLike, columns: Sequence[str] | None = None) -> None:
    """Write ``rows`` (dicts; ``columns`` in this order, default: the keys of all rows in first-seen order) to
    ``path`` atomically (module docstring)."""
    path = Path(path)
    suffix = _check_suffix(path)
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if suffix == ".csv":
        import csv

        with open(tmp, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            for r in rows:
                w.writerow(["" if r.get(c) is None else json.dumps(r[c], ensure_ascii=False)
                            if isinstance(r.get(c), (list, dict)) else r[c] for c in columns])
            f.flush()
            os.fsync(f.fileno())
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows]) if rows else \
            pa.table({c: pa.array([], pa.string()) for c in columns})
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)


def read_output(path: str | os.PathLike, list_columns: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Rows written by :func:`write_pairs`; ``list_columns`` of a CSV are decoded from their JSON arrays, and its
    :data:`ROW_COLUMN` read back as integers."""
    from ..data.tables import read_table_rows

    rows = read_table_rows(path).rows
    for r in rows:
        if isinstance(r.get(ROW_COLUMN), str) and r[ROW_COLUMN].isdigit():
            r[ROW_COLUMN] = int(r[ROW_COLUMN])
        for c in list_columns:
            if isinstance(r.get(c), str):
                r[c] = json.loads(r[c]) if r[c] else []
    return rows


def work_dir(out: str | os.PathLike) -> Path:
    """Where a job writing ``out`` keeps its chunks: ``OUT.parts/``."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def rejects_path(out: str | os.PathLike) -> Path:
    """The rejects file beside ``out``: ``OUT.rejects.jsonl`` (one JSON object per line: row, line, reason)."""
    out = Path(out)
    return out.with_name(out.name + ".rejects.jsonl")


def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class RowJobResult:
    """``rows``: the processed rows in input order (each with :data:`ROW_COLUMN`); ``rejects``: the rows that could
    not be processed, with their reasons; ``chunks_done`` / ``chunks_skipped``: this run's work and what an earlier
    run had committed."""

    rows: list[dict[str, Any]]
    rejects: list[dict[str, Any]]
    chunks_done: int = 0
    chunks_skipped: int = 0
    info: dict[str, Any] = field(default_factory=dict)


#: ``process(rows) -> [(output row or None, reject reason or None)]``, one per input row, in order
Processor = Callable[[list[dict[str, Any]]], list[tuple[dict[str, Any] | None, str | None]]]


def run_rows(pairs: Pairs, out: str | os.PathLike, process: Processor, job: dict[str, Any], chunk_size: int = 256,
             progress: bool | None = None, overwrite: bool = False, desc: str = "curate") -> RowJobResult:
    """Run ``process`` over the usable rows of ``pairs`` in chunks of ``chunk_size``, resumably (module docstring);
    returns every committed row and reject. ``job`` identifies the work (method and options): a rerun with another
    job or another input refuses unless ``overwrite``. Rows that :func:`read_pairs` found unusable are rejects
    without reaching ``process``."""
    import shutil

    import pyarrow as pa

    from ..pipeline.shards import ShardStore, atomic_write_json
    from ..progress import Progress

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    work = work_dir(out)
    identity = {"job": job, "input": os.path.abspath(pairs.file), "input_sha256": _sha256(pairs.file),
                "rows": len(pairs), "chunk_size": int(chunk_size), "caption_column": pairs.caption_column}
    job_file = work / "job.json"
    if work.exists() and overwrite:
        shutil.rmtree(work)
    if job_file.exists():
        old = json.loads(job_file.read_text(encoding="utf-8"))
        if old != json.loads(json.dumps(identity)):
            changed = sorted(k for k in identity if old.get(k) != json.loads(json.dumps(identity[k])))
            raise JobMismatchError(f"{work} holds a different curation job (changed: {', '.join(changed)}); pass "
                                   "--overwrite (overwrite=True) to start over or choose another output")
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(job_file, identity)
    store = ShardStore(work)
    store.ensure()
    store.cleanup()
    done = store.committed()
    n_chunks = (len(pairs) + chunk_size - 1) // chunk_size
    name = os.path.basename(pairs.file)
    skipped = sum(1 for k in done if k < n_chunks)
    with Progress(total=len(pairs), desc=desc, unit="row", enabled=progress,
                  initial=min(len(pairs), skipped * chunk_size)) as bar:
        ran = 0
        for k in range(n_chunks):
            if k in done:
                continue
            lo, hi = k * chunk_size, min(len(pairs), (k + 1) * chunk_size)
            usable = [i for i in range(lo, hi) if pairs.errors[i] is None]
            rejects = [{ROW_COLUMN: i, "reason": pairs.errors[i]} for i in range(lo, hi) if pairs.errors[i]]
            results = process([pairs.rows[i] for i in usable]) if usable else []
            if len(results) != len(usable):
                raise RuntimeError(f"the processor returned {len(results)} results for {len(usable)} rows")
            kept = []
            for i, (row, reason) in zip(usable, results):
                if reason is not None or row is None:
                    rejects.append({ROW_COLUMN: i, "reason": f"{name}: row {i}: {reason or 'no output'}"})
                else:
                    kept.append({ROW_COLUMN: i, **row})
            rejects.sort(key=lambda r: r[ROW_COLUMN])
            table = pa.Table.from_pylist([{"payload": json.dumps(r, ensure_ascii=False, default=str)} for r in kept],
                                         schema=pa.schema([("payload", pa.string())]))
            store.commit(k, table, rejects, {"rows": len(kept), "rejects": len(rejects)})
            ran += 1
            bar.update(hi - lo)
    rows, rejects = _collect(store, n_chunks)
    return RowJobResult(rows, rejects, chunks_done=ran, chunks_skipped=skipped)


def _collect(store, n_chunks: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for k in range(n_chunks):
        rows.extend(json.loads(p) for p in pq.read_table(store.shard_path(k)).column("payload").to_pylist())
    return rows, store.read_rejects(range(n_chunks))


def rebase_images(rows: Sequence[dict[str, Any]], src: str | os.PathLike, out: str | os.PathLike,
                  image_column: str = "image") -> list[dict[str, Any]]:
    """Rows whose relative image paths (resolved for the table ``src`` by the rule every command uses,
    ``cliplab.data.tables.image_root_for``) are made relative to the folder of ``out``, so the output table finds
    its images wherever it is written. Absolute paths and rows without an image stay as they are."""
    from ..data.tables import image_root_for

    paths = [r.get(image_column) for r in rows]
    relative = [p for p in paths if isinstance(p, str) and p.strip() and not os.path.isabs(os.path.expanduser(p))]
    if not relative:
        return list(rows)
    root, _ = image_root_for(src, relative)
    base = os.path.dirname(os.path.abspath(os.fspath(out)))
    if os.path.abspath(root) == base:
        return list(rows)
    out_rows = []
    for r in rows:
        p = r.get(image_column)
        if isinstance(p, str) and p.strip() and not os.path.isabs(os.path.expanduser(p)):
            r = {**r, image_column: os.path.relpath(os.path.join(root, p), base)}
        out_rows.append(r)
    return out_rows


def finish(out: str | os.PathLike, rows: Sequence[dict[str, Any]], rejects: Sequence[dict[str, Any]],
           columns: Sequence[str] | None = None, src: str | os.PathLike | None = None,
           image_column: str = "image") -> None:
    """Write the final table and ``OUT.rejects.jsonl`` (each atomically). With ``src``, relative image paths are
    rebased onto the output's folder (:func:`rebase_images`)."""
    from ..pipeline.rejects import write_jsonl_atomic

    if src is not None:
        rows = rebase_images(rows, src, out, image_column)
    write_pairs(rows, out, columns)
    write_jsonl_atomic(rejects_path(out), rejects)
