"""Rejected inputs: one JSON object per line, ``{"id", "index", "path", "stage", "reason"}`` (+ ``caption``).

Rejects are written per shard (``rejects/part-NNNNN.jsonl``, before the shard itself is committed) and merged into
``rejects.jsonl`` when the job finishes. Only the rejects of committed shards are merged, so a rerun after a crash
never counts a reject twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from .sources import Item

__all__ = ["REJECTS_FILE", "REJECTS_DIR", "reject_record", "write_jsonl_atomic", "read_jsonl", "read_rejects"]

REJECTS_FILE = "rejects.jsonl"
REJECTS_DIR = "rejects"

#: stages at which an item can be rejected
STAGES = ("listing", "image", "caption")


def reject_record(item: Item, stage: str, reason: str) -> dict[str, Any]:
    rec: dict[str, Any] = {"id": item.id, "index": item.index, "path": item.path, "stage": stage, "reason": reason}
    if item.caption is not None:
        rec["caption"] = item.caption
    return rec


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write records to a temporary name, fsync, and rename over ``path``; returns the count."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return n


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_rejects(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The merged rejects of a finished job (``[]`` when it rejected nothing)."""
    p = Path(out_dir) / REJECTS_FILE
    return read_jsonl(p) if p.exists() else []
