"""Edit distance between strings: one implementation for the methods that compare spellings (CLIPPINGS' string
matching baseline, FDP's near-spelling candidates)."""

from __future__ import annotations

__all__ = ["levenshtein"]


def levenshtein(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions, each of cost 1 (two rows of the table)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]
