"""Progress reporting for long work, the same everywhere: a bar on a terminal, a plain line now and then otherwise.

``progress=None`` (the default of every long-running API and ``--progress/--no-progress`` unset) means: a tqdm bar
when stderr is a terminal, and otherwise one plain line every :data:`LINE_EVERY` seconds (``embed: 1200/5000 items
(24%), 35.1/s``), so logs of batch jobs show progress without carriage-return noise. ``True`` forces the bar,
``False`` is silent.

    with Progress(total=len(items), desc="embed", unit="item", enabled=options.progress) as bar:
        for batch in batches:
            ...
            bar.update(len(batch))

Imports nothing from cliplab: every layer may use it.
"""

from __future__ import annotations

import sys
import time

#: seconds between two plain progress lines when stderr is not a terminal
LINE_EVERY = 10.0


class Progress:
    """A progress reporter (see the module docstring). ``initial`` counts work already done (a resumed job)."""

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it", enabled: bool | None = None,
                 initial: int = 0, file=None, leave: bool = True):
        self.file = file or sys.stderr
        self.total, self.desc, self.unit = total, desc, unit
        self.n = initial
        self._initial = initial
        self._bar = None
        self._lines = False
        self._postfix = ""
        self._printed_at = initial
        if enabled is None:
            enabled = True
            interactive = getattr(self.file, "isatty", lambda: False)()
        else:
            interactive = enabled
        if not enabled:
            return
        if interactive:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover - tqdm is a dependency
                self._lines = True
            else:
                self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=self.file,
                                 dynamic_ncols=True, leave=leave, smoothing=0.1)
        else:
            self._lines = True
        self._t0 = self._last = time.perf_counter()

    @property
    def active(self) -> bool:
        return self._bar is not None or self._lines

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._lines:
            now = time.perf_counter()
            if now - self._last >= LINE_EVERY:
                self._last = now
                self._line(now)

    def set_postfix(self, **values) -> None:
        """Figures shown after the count (a bar's postfix; the next plain line's tail)."""
        self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def write(self, message: str) -> None:
        """A message that does not break the bar."""
        if self._bar is not None:
            self._bar.write(message, file=self.file)
        else:
            print(message, file=self.file, flush=True)

    def _line(self, now: float) -> None:
        self._printed_at = self.n
        done = self.n - self._initial
        rate = done / (now - self._t0) if now > self._t0 else 0.0
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        tail = f", {self._postfix}" if self._postfix else ""
        print(f"{self.desc}: {self.n}{of} {self.unit}s{pct}, {rate:.1f}/s{tail}", file=self.file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._lines and self.n != self._printed_at and time.perf_counter() - self._t0 >= LINE_EVERY:
            self._line(time.perf_counter())  # a final line for work long enough to have printed some
        self._lines = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(iterable, total: int | None = None, desc: str = "", unit: str = "it", enabled: bool | None = None):
    """Iterate ``iterable`` while reporting progress (``total`` defaults to ``len(iterable)`` when it has one)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with Progress(total=total, desc=desc, unit=unit, enabled=enabled) as bar:
        for x in iterable:
            yield x
            bar.update(1)
