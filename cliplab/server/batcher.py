"""Micro-batching: concurrent requests share one model call.

Each request thread puts its item on a queue and waits on a future. One worker thread takes the first waiting item,
keeps collecting for at most ``wait_ms`` (or until ``max_batch`` items), runs ``fn`` once on the whole batch and hands
each caller its own row. With one client the wait costs at most ``wait_ms``; with many, the model runs on batches,
which is where a CPU's matmuls are efficient.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Sequence


class BatcherClosed(RuntimeError):
    """The batcher was closed (the server is shutting down)."""


class MicroBatcher:
    """``submit(item)`` -> ``Future`` of ``fn([..., item, ...])[i]``; ``fn`` maps a list of items to a sequence of
    results of the same length. ``on_batch(size)`` is told every batch size (for metrics). An exception in ``fn``
    fails every future of that batch (and nothing else)."""

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], *, max_batch: int = 32, wait_ms: float = 5.0,
                 name: str = "batcher", on_batch: Callable[[int], None] | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if wait_ms < 0:
            raise ValueError(f"wait_ms must be >= 0, got {wait_ms}")
        self.fn, self.max_batch, self.wait_s = fn, int(max_batch), wait_ms / 1000.0
        self.on_batch = on_batch
        self.calls = 0  # model calls made (tests read it: two concurrent queries, one call)
        self._queue: queue.Queue[tuple[Any, Future] | None] = queue.Queue()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self._worker.start()

    def submit(self, item: Any) -> Future:
        if self._closed:
            raise BatcherClosed("the server is shutting down")
        fut: Future = Future()
        self._queue.put((item, fut))
        return fut

    def __call__(self, item: Any, timeout: float | None = None) -> Any:
        """Submit and wait. After ``timeout`` seconds: ``TimeoutError``, and the item is withdrawn if the worker has
        not taken it yet (an overloaded server does not go on to compute answers nobody waits for)."""
        fut = self.submit(item)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._worker.join(timeout=5)

    def _collect(self) -> list[tuple[Any, Future]] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.perf_counter() + self.wait_s
        while len(batch) < self.max_batch:
            left = deadline - time.perf_counter()
            try:
                nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:  # closing: finish this batch, then stop
                self._queue.put(None)
                break
            batch.append(nxt)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                break
            live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
            if not live:
                continue
            self.calls += 1
            if self.on_batch is not None:
                self.on_batch(len(live))
            try:
                out = self.fn([item for item, _ in live])
                if len(out) != len(live):
                    raise RuntimeError(f"batch function returned {len(out)} results for {len(live)} items")
            except BaseException as exc:  # every caller of this batch gets the error; the worker lives on
                for _, fut in live:
                    fut.set_exception(exc)
                continue
            for (_, fut), result in zip(live, out):
                fut.set_result(result)
        while not self._queue.empty():  # anything submitted during shutdown fails instead of hanging
            rest = self._queue.get_nowait()
            if rest is not None and rest[1].set_running_or_notify_cancel():
                rest[1].set_exception(BatcherClosed("the server is shutting down"))
