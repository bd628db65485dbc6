"""Inputs and the timer shared by the benchmark scripts (``suite.py``, ``onnx_backend.py``): the Flickr8k caption
and photo samples from ``../shared/data`` (random captions when it is absent) and best-of-N timing.

Scripts in this directory import it as ``from common import ...``; it imports none of them.
"""

from __future__ import annotations

import csv
import random
import time

import torch
from pathlib import Path

from cliplab.export.parity import random_captions

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k-1k"


def load_captions(n: int, seed: int = 0) -> list[str]:
    path = DATA / "all_captions.csv"
    if path.exists():
        with path.open(newline="", encoding="utf-8") as f:
            caps = [row["caption"] for row in csv.DictReader(f)]
    else:  # keeps the suite runnable without the shared data; the report says which
        caps = random_captions(n, seed=seed, max_words=25)
    random.Random(seed).shuffle(caps)
    return caps[:n]


def flickr_photos(n: int) -> list[Path]:
    return sorted((DATA / "images").glob("*.jpg"))[:n] if (DATA / "images").exists() else \
        sorted(DATA.rglob("*.jpg"))[:n]


def flickr_pairs(n: int) -> tuple[list[Path], list[str]]:
    """Photos with their first caption (for the retrieval overlap)."""
    path = DATA / "captions.csv"
    photos = flickr_photos(n)
    first: dict[str, str] = {}
    if path.exists():
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                key = Path(row.get("image") or row.get("filename") or "").name
                first.setdefault(key, row["caption"])
    return [p for p in photos if p.name in first], [first[p.name] for p in photos if p.name in first]


def best_rate(fn, work: float, repeats: int) -> float:
    """``work`` units per second, best of ``repeats`` timed calls after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return work / best


def interleaved(fns: dict[str, object], work: float, repeats: int, ctxs: dict[str, object]) -> dict[str, float]:
    """Best rate of each path, timing the paths in turn each round, so a drift in machine speed hits all alike."""
    best = {label: float("inf") for label in fns}
    for r in range(repeats + 1):  # round 0 warms up
        for label, fn in fns.items():
            with torch.inference_mode(), ctxs[label]():
                t = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - t
            if r:
                best[label] = min(best[label], elapsed)
    return {label: work / t for label, t in best.items()}


def write_report(text: str, out: Path | None, args, rows: list) -> None:
    """Print a benchmark's markdown report; with ``out``, also write it there and ``rows`` (with the run's
    arguments) as JSON next to it."""
    import json

    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                        "rows": rows}, indent=2))
