"""Semantic textual similarity (STS): how well an embedder's cosine similarity ranks sentence pairs like people do.

The STS Benchmark (Cer et al., SemEval 2017) files are tab-separated: genre, file, year, id, score (0-5), sentence 1,
sentence 2 and, on some rows, source columns. The sentences hold stray quotes, so rows are split on tabs (never
parsed as CSV). Lines that do not decode as UTF-8 (or the given ``encoding``), or have too few fields or a
non-numeric score, are set aside with their line number; the good rows are scored.

The metric is the one the literature reports: Spearman's rank correlation x 100 between the cosine similarity of
the two embeddings and the gold score, ties given their average rank (Pearson x 100 beside it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass
class STSData:
    """Sentence pairs with gold scores; ``rejected`` lists ``(line, reason)`` of the rows left out."""

    first: list[str]
    second: list[str]
    scores: list[float]
    path: str = ""
    rejected: list[tuple[int, str]] = field(default_factory=list)
    genres: list[str] = field(default_factory=list)  # the first column (STS-B: main-captions, main-news, main-forums)

    def __len__(self) -> int:
        return len(self.scores)

    def subset(self, rows: list[int]) -> "STSData":
        pick = lambda xs: [xs[i] for i in rows] if xs else []  # noqa: E731
        return STSData(pick(self.first), pick(self.second), pick(self.scores), self.path, self.rejected,
                       pick(self.genres))


class STSRowWarning(UserWarning):
    """Some lines of an STS file were rejected (undecodable, too few fields, bad score)."""


def read_sts(path: str | Path, encoding: str = "utf-8", limit: int | None = None) -> STSData:
    """Read an STS-B style file (see the module docstring). ``limit`` keeps the first ``limit`` good rows."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no STS file at {path}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    first, second, scores, rejected, genres = [], [], [], [], []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as e:
                rejected.append((lineno, f"not {encoding} (byte {raw[e.start]:#04x} at column {e.start + 1})"))
                continue
            parts = line.split("\t")
            if len(parts) < 7:
                rejected.append((lineno, f"{len(parts)} tab-separated fields, expected at least 7"))
                continue
            try:
                score = float(parts[4])
            except ValueError:
                rejected.append((lineno, f"score {parts[4]!r} is not a number"))
                continue
            first.append(parts[5])
            second.append(parts[6])
            scores.append(score)
            genres.append(parts[0])
            if limit is not None and len(scores) >= limit:
                break
    if rejected:
        shown = "; ".join(f"line {n}: {why}" for n, why in rejected[:5])
        more = f" (and {len(rejected) - 5} more)" if len(rejected) > 5 else ""
        warnings.warn(f"{path}: {len(rejected)} line(s) rejected: {shown}{more}", STSRowWarning, stacklevel=2)
    if not scores:
        raise ValueError(f"{path}: no usable sentence pairs (is it an STS-B file?)")
    return STSData(first, second, scores, str(path), rejected, genres)


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of ``x`` (1-D), tied values sharing their average rank."""
    x = x.double()
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    ranks = torch.empty_like(x)
    n = len(x)
    i = 0
    while i < n:
        j = i
        while j + 1 < n and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = x.norm() * y.norm()
    return float((x @ y) / denom) if denom > 0 else float("nan")


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rho: Pearson's correlation of the average ranks."""
    return pearson(average_ranks(x), average_ranks(y))


def sts_scores(first: torch.Tensor, second: torch.Tensor, gold) -> dict:
    """Spearman and Pearson x 100 of the row-wise cosine similarity of two embedding matrices against ``gold``."""
    cos = F.cosine_similarity(first.double(), second.double(), dim=-1)
    gold = torch.as_tensor(gold, dtype=torch.float64)
    return {"spearman": 100 * spearman(cos, gold), "pearson": 100 * pearson(cos, gold), "n": len(gold)}


def evaluate_sts(embedder, data: STSData, pooling=None, batch_size: int = 64, progress: bool = False) -> dict:
    """Encode every sentence once (both sides together, duplicates once) and score the pairs."""
    unique = list(dict.fromkeys(data.first + data.second))
    where = {s: i for i, s in enumerate(unique)}
    extra = {"progress": True} if progress else {}  # an embedder may not take `progress`
    emb = embedder.encode(unique, pooling=pooling, batch_size=batch_size, **extra)
    a = emb[[where[s] for s in data.first]]
    b = emb[[where[s] for s in data.second]]
    res = sts_scores(a, b, data.scores)
    if len(set(data.genres)) > 1:
        res["by_genre"] = {g: sts_scores(a[rows], b[rows], [data.scores[i] for i in rows])
                           for g in sorted(set(data.genres))
                           for rows in [[i for i, x in enumerate(data.genres) if x == g]]}
    res.update(embedder=getattr(embedder, "name", str(embedder)),
               pooling=getattr(pooling, "name", pooling) or getattr(embedder, "default_pooling", None),
               data=data.path, rejected=[{"line": n, "reason": why} for n, why in data.rejected])
    return res
