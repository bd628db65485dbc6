"""The local engine: a thread pool decodes and preprocesses while the calling thread runs the model."""

from __future__ import annotations

import math
import os
import sys
import time
from collections import deque
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ..context import JobContext, ShardBuilder
    from ..sources import Item


def decode_one(source, preprocessor, item: "Item") -> tuple[np.ndarray | None, str | None]:
    """``(pixels [3, S, S] float32, None)`` or ``(None, reason)``; never raises for bad input."""
    from ...models.preprocess import ImageLoadError

    try:
        return preprocessor(source.image_input(item)).numpy(), None
    except ImageLoadError as e:
        return None, e.reason
    except Exception as e:  # anything else about one input (I/O errors, odd formats) rejects that input only
        return None, f"{type(e).__name__}: {e}"


def tokenize_items(model, items: list["Item"]):
    """``(items_ok, TokenizedBatch | None, [(item, reason)])``; a failing batch is retried text by text."""
    try:
        return items, model.tokenize([it.caption for it in items], truncate=True), []
    except Exception:
        ok, failed = [], []
        for it in items:
            try:
                model.tokenize([it.caption], truncate=True)
                ok.append(it)
            except Exception as e:
                failed.append((it, f"cannot tokenize caption ({type(e).__name__}: {e})"))
        return ok, (model.tokenize([it.caption for it in ok], truncate=True) if ok else None), failed


def encode_text_batch(ctx: "JobContext", b: "ShardBuilder", items, tb, failed) -> int:
    import torch

    done = 0
    for it, reason in failed:
        done += b.text_failed(it.index, reason)
    if items:
        with torch.inference_mode():
            emb = ctx.model.encode_text(tb, normalize=ctx.options.normalize).float().cpu().numpy()
        trunc = tb.truncated.tolist()
        dropped = tb.n_dropped.tolist()
        for r, it in enumerate(items):
            done += b.text_ok(it.index, emb[r], trunc[r], dropped[r])
    return done


def image_groups(ctx: "JobContext", b: "ShardBuilder") -> list[list["Item"]]:
    """The shard's items that need an image, grouped so each distinct image is decoded once."""
    groups: dict[Any, list] = {}
    for it in b.items:
        if it.index in b.outstanding and ctx.needs_image(it):
            key = ("path", it.path) if it.path is not None else ("key", it.key)
            groups.setdefault(key, []).append(it)
    return list(groups.values())


def text_items(ctx: "JobContext", b: "ShardBuilder") -> list["Item"]:
    """The shard's captions, shortest first, so each batch is padded to similar lengths."""
    its = [it for it in b.items if it.index in b.outstanding and ctx.needs_text(it)]
    return sorted(its, key=lambda it: len(it.caption))


def _lower_thread_priority(step: int = 10) -> None:
    """Pool-thread initializer: on Linux, niceness is per thread, so decode threads yield the cores to the model's
    compute threads and use the cycles those leave. Decoding still gets a full core whenever the model waits for
    input, so it cannot starve; it just stops preempting torch's OpenMP threads mid-barrier (which costs the model
    far more than the decode work itself on a machine with few cores)."""
    import threading

    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + step))
    except (AttributeError, OSError, PermissionError):  # not Linux, or not allowed: keep the default priority
        pass


def run_local(ctx: "JobContext", pending: list[int]) -> None:
    import torch
    from concurrent.futures import ThreadPoolExecutor

    opts = ctx.options
    model, source = ctx.model, ctx.source
    pre = model.preprocessor  # build cached front ends before the threads share them
    _ = model.tokenizer
    device, dtype = model.device, model.dtype
    workers = opts.workers
    chunk = max(1, min(16, opts.batch_size // workers))
    window = max(2 * workers, 2 * math.ceil(opts.batch_size / chunk) + workers)

    def decode_chunk(groups):
        return [(its, *decode_one(source, pre, its[0])) for its in groups]

    def tasks():
        for k in pending:
            b = ctx.builder(k)
            yield "begin", b, None
            groups = image_groups(ctx, b)
            for i in range(0, len(groups), chunk):
                yield "image", b, partial(decode_chunk, groups[i:i + chunk])
            texts = text_items(ctx, b)
            for i in range(0, len(texts), opts.text_batch_size):
                yield "text", b, partial(tokenize_items, model, texts[i:i + opts.text_batch_size])
            yield "end", b, None

    buf: list[tuple[list, np.ndarray]] = []
    n_buf = 0

    def flush(b) -> None:
        nonlocal buf, n_buf
        if not buf:
            return
        t = time.perf_counter()
        x = torch.from_numpy(np.stack([a for _, a in buf])).to(device=device, dtype=dtype)
        rows = len(x)
        if getattr(model, "compiled", False) and rows < opts.batch_size:
            # a torch.compile'd tower compiles again for each new batch shape (~20 s for ViT-B/32): the last, short
            # batch of a job runs padded to the usual size instead (rows are independent; the padding is dropped)
            x = torch.cat([x, x.new_zeros((opts.batch_size - rows, *x.shape[1:]))])
        with torch.inference_mode():
            emb = model.encode_image(x, normalize=opts.normalize)[:rows].float().cpu().numpy()
        ctx.model_seconds += time.perf_counter() - t
        done = 0
        for (its, _), e in zip(buf, emb):
            for it in its:
                done += b.image_ok(it.index, e)
        ctx.advance(done)
        buf, n_buf = [], 0

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cliplab-decode",
                              initializer=_lower_thread_priority if opts.device == "cpu" else None)
    queue: deque = deque()
    gen = tasks()

    def fill() -> None:
        while len(queue) < window:
            t = next(gen, None)
            if t is None:
                return
            kind, b, fn = t
            queue.append((kind, b, pool.submit(fn) if fn is not None else None))

    # The model's forward re-takes the GIL between ops; a decode thread holding it makes the main thread wait up to
    # the switch interval (5 ms by default) each time. A shorter interval while the job runs keeps the model fed.
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(min(old_interval, 0.0005))
    try:
        fill()
        while queue:
            kind, b, fut = queue.popleft()
            fill()
            if kind == "image":
                done = 0
                for its, arr, reason in fut.result():
                    if arr is None:
                        for it in its:
                            done += b.image_failed(it.index, reason)
                    else:
                        buf.append((its, arr))
                        n_buf += 1
                        if n_buf >= opts.batch_size:
                            flush(b)
                ctx.advance(done)
            elif kind == "text":
                res = fut.result()
                t = time.perf_counter()
                ctx.advance(encode_text_batch(ctx, b, *res))
                ctx.model_seconds += time.perf_counter() - t
            elif kind == "end":
                flush(b)
                ctx.commit(b)
    finally:
        sys.setswitchinterval(old_interval)
        pool.shutdown(wait=True, cancel_futures=True)
