"""What an engine works with: the job's context (model, source, shard plan, options, ``commit``) and the per-shard
bookkeeping that turns results arriving in any order into one shard's table and rejects.

The engines (``engines/local.py``, ``engines/ray_engine.py``) and the job (``embed.py``) import this module; it
imports neither, so the dependencies point one way.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .rejects import reject_record
from .shards import build_shard_table, shard_schema
from .sources import Item

__all__ = ["JobContext", "ShardBuilder", "plan_segments"]


class ShardBuilder:
    """Collects the results for the items of one shard, in any order, until every item is a row or a reject."""

    def __init__(self, ctx: "JobContext", k: int):
        self.ctx, self.k = ctx, k
        self.items = ctx.shard_items(k)
        self.by_index = {it.index: it for it in self.items}
        self.image: dict[int, np.ndarray] = {}
        self.text: dict[int, tuple[np.ndarray, bool, int]] = {}
        self.reasons: dict[int, list[tuple[str, str]]] = {}
        self.outstanding: dict[int, int] = {}
        self.too_long = 0
        self.t0 = time.perf_counter()
        self.initially_done = 0
        for it in self.items:
            if it.error:
                self._reject(it.index, "listing", it.error)
                continue
            parts = int(ctx.needs_image(it)) + int(ctx.needs_text(it))
            if parts == 0:
                kind = "image" if ctx.options.what == "image" else "caption"
                self._reject(it.index, "listing", f"nothing to embed: --what {ctx.options.what} and the item has "
                                                  f"no {kind}")
                continue
            self.outstanding[it.index] = parts
        self.initially_done = len(self.items) - len(self.outstanding)

    def _reject(self, index: int, stage: str, reason: str) -> None:
        self.reasons.setdefault(index, []).append((stage, reason))

    def _part_done(self, index: int) -> int:
        left = self.outstanding[index] - 1
        if left:
            self.outstanding[index] = left
            return 0
        del self.outstanding[index]
        return 1

    def image_ok(self, index: int, emb: np.ndarray) -> int:
        self.image[index] = emb
        return self._part_done(index)

    def image_failed(self, index: int, reason: str) -> int:
        self._reject(index, "image", reason)
        return self._part_done(index)

    def text_ok(self, index: int, emb: np.ndarray, truncated: bool, dropped: int) -> int:
        if truncated and not self.ctx.options.truncate:
            self.too_long += 1
            ctx = self.ctx.context_length
            self._reject(index, "caption", f"caption is {dropped} token(s) longer than the context allows "
                                           f"({ctx - 2} content tokens); rejected by --no-truncate")
        else:
            self.text[index] = (emb, bool(truncated), int(dropped))
        return self._part_done(index)

    def text_failed(self, index: int, reason: str) -> int:
        self._reject(index, "caption", reason)
        return self._part_done(index)

    @property
    def complete(self) -> bool:
        return not self.outstanding

    def finish(self):
        assert self.complete, f"shard {self.k} finished with {len(self.outstanding)} item(s) outstanding"
        rejected = set(self.reasons)
        table = build_shard_table(self.items, self.image, self.text, rejected, self.ctx.schema, self.ctx.dim,
                                  self.ctx.options.dtype)
        rejects = []
        for it in self.items:
            if it.index in self.reasons:
                stages = self.reasons[it.index]
                rec = reject_record(it, stages[0][0], "; ".join(r for _, r in stages))
                rejects.append(rec)
        kept_text = [v for i, v in self.text.items() if i not in rejected]
        stats = {
            "shard": self.k, "first_index": self.items[0].index if self.items else self.k * self.ctx.shard_size,
            "n_items": len(self.items), "n_rows": table.num_rows, "n_rejects": len(rejects),
            "n_images": sum(1 for i in self.image if i not in rejected), "n_texts": len(kept_text),
            "n_truncated": sum(1 for _, t, _ in kept_text if t),
            "tokens_dropped": int(sum(d for _, t, d in kept_text if t)),
            "n_too_long_rejected": self.too_long,
            "seconds": round(time.perf_counter() - self.t0, 4),
        }
        return table, rejects, stats


def plan_segments(segments: list[int], shard_size: int) -> list[tuple[int, int, int, int]]:
    """``(first_index, n_items, n_shards, first_shard)`` of each run of equal segment numbers in plan order.

    The items a job lists first are segment 0; the items a later run finds new (``cliplab embed`` on a grown folder
    or table) are appended as segment 1, 2, ..., each starting a new shard, so committed shards never change."""
    out: list[tuple[int, int, int, int]] = []
    start, shard = 0, 0
    for i in range(1, len(segments) + 1):
        if i == len(segments) or segments[i] != segments[start]:
            n = i - start
            n_shards = (n + shard_size - 1) // shard_size
            out.append((start, n, n_shards, shard))
            start, shard = i, shard + n_shards
    return out


class JobContext:
    """Everything an engine needs: the model, source, plan, options, and ``commit`` for finished shards."""

    def __init__(self, job: Any, items: list[Item], with_image: bool, with_text: bool):
        self.job = job  # the EmbedJob (not imported: it imports this module)
        self.model = job.model
        self.source = job.source
        self.options = job.options
        self.items = items
        self.shard_size = job.options.shard_size
        self.segments = plan_segments(job.segments_of(items), self.shard_size)
        self.n_shards = sum(seg[2] for seg in self.segments)
        self.with_image, self.with_text = with_image, with_text
        self.dim = self.model.config.embed_dim
        self.context_length = self.model.config.text.context_length
        self.schema = shard_schema(self.dim, self.options.dtype, with_image, with_text)
        self.progress: Any = None
        self.model_seconds = 0.0  # time the model spent encoding in this run (local engine)

    def shard_items(self, k: int) -> list[Item]:
        """The items of shard ``k``: a slice of its segment (a run of items added together), never across two."""
        for first_index, n, n_shards, first_shard in self.segments:
            if first_shard <= k < first_shard + n_shards:
                start = first_index + (k - first_shard) * self.shard_size
                return self.items[start:min(start + self.shard_size, first_index + n)]
        return []

    def needs_image(self, it: Item) -> bool:
        return self.with_image and it.has_image

    def needs_text(self, it: Item) -> bool:
        return self.with_text and it.caption is not None

    def builder(self, k: int) -> ShardBuilder:
        b = ShardBuilder(self, k)
        self.advance(b.initially_done)
        return b

    def advance(self, n: int) -> None:
        if n and self.progress is not None:
            self.progress.update(n)

    def commit(self, builder: ShardBuilder) -> None:
        table, rejects, stats = builder.finish()
        self.job.store.commit(builder.k, table, rejects, stats)
        self.job._shard_committed(builder.k, stats)
