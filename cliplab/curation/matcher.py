"""Whole-word substring matching of a metadata list against texts (Aho-Corasick), and the inverted index.

MetaCLIP's matcher (``facebookresearch/MetaCLIP``, ``substr_matching.py``): the text is "spaced" (the punctuation
``, . ; : ? ! ``\\` `` wrapped in spaces, tabs and line breaks turned into spaces, one space added at each end) and
an entry ``e`` matches when ``" " + e + " "`` occurs in it. So "cat" matches "A cat." and "cat, dog" but not
"category" or "concat", and a multi-word entry matches across the punctuation spacing ("golden gate" in "the
golden gate, at dusk"). Matching is case-sensitive, as in the official code, unless ``lowercase=True``.

All entries are found in one pass over each text by an Aho-Corasick automaton (``pyahocorasick``), the official
code's fast path; a Python loop over 500k entries would be hopeless. The automaton finds overlapping occurrences,
so " cat dog " matches both " cat " and " dog " (they share the middle space).

Shared by the curation methods (MetaCLIP balancing, and any metadata statistics a caption method wants).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

__all__ = ["spacing", "SubstringMatcher", "inverted_index", "entry_counts", "build_metadata", "STOPWORDS",
           "require_ahocorasick"]

_WRAP = (",", ".", ";", ":", "?", "!", "`")
_TO_SPACE = ("\t", "\n", "\r")

#: Function words left out of a metadata list built from the pool itself (MetaCLIP's lists come from WordNet and
#: Wikipedia, where such words do not reach the thresholds as entries of their own).
STOPWORDS = frozenset("""a an the and or of in on at to for with from by is are was were be been being it its this
that these those there their they them he she his her him we you i as into onto over under while near next up down
out off some one s 's has have had do does not no""".split())


def require_ahocorasick():
    """The ``ahocorasick`` module, or :class:`cliplab.models.lm.MissingDependency` with the install command."""
    try:
        import ahocorasick
    except ModuleNotFoundError:
        from ..models.lm import MissingDependency

        raise MissingDependency("metadata matching needs the optional package 'pyahocorasick': "
                                "pip install 'cliplab[curate]'") from None
    return ahocorasick


def spacing(text: str) -> str:
    """MetaCLIP's text normalisation before matching (module docstring): wrap punctuation in spaces, turn tabs and
    line breaks into spaces, pad both ends with one space. Runs of spaces are kept, as in the official code."""
    out = f" {text} "
    for p in _WRAP:
        out = out.replace(p, f" {p} ")
    for c in _TO_SPACE:
        out = out.replace(c, " ")
    return out


class SubstringMatcher:
    """``match(text)``: the sorted ids (positions in ``entries``) of the entries that occur in ``text`` as whole
    words (module docstring). Duplicate entries are an error (their counts would be split)."""

    def __init__(self, entries: Sequence[str], lowercase: bool = False):
        ahocorasick = require_ahocorasick()
        self.entries = [str(e) for e in entries]
        self.lowercase = bool(lowercase)
        keys = [e.lower() if self.lowercase else e for e in self.entries]
        bad = [e for e in keys if not e.strip() or e != e.strip()]
        if bad:
            raise ValueError(f"metadata entries must be non-empty without outer spaces, got {bad[:3]!r}")
        seen: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key in seen:
                raise ValueError(f"metadata entry {key!r} appears twice (positions {seen[key]} and {i}); "
                                 "deduplicate the list")
            seen[key] = i
        self._automaton = ahocorasick.Automaton()
        for i, key in enumerate(keys):
            self._automaton.add_word(f" {key} ", i)
        if keys:
            self._automaton.make_automaton()

    def __len__(self) -> int:
        return len(self.entries)

    def match(self, text: str) -> list[int]:
        if not self.entries:
            return []
        spaced = spacing(text.lower() if self.lowercase else text)
        return sorted({i for _, i in self._automaton.iter(spaced)})

    def match_many(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.match(t) for t in texts]


def inverted_index(matches: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """``(entry_ids, pair_offsets)``: one row per (pair, matched entry), in pair-major order (pair 0's entries,
    then pair 1's, ...). Sorting by ``entry_ids`` gives each entry's pairs (``np.argsort(..., kind="stable")``)."""
    lengths = np.fromiter((len(m) for m in matches), dtype=np.int64, count=len(matches))
    offsets = np.repeat(np.arange(len(matches), dtype=np.int64), lengths)
    entry_ids = np.fromiter((e for m in matches for e in m), dtype=np.int64, count=int(lengths.sum()))
    return entry_ids, offsets


def entry_counts(matches: Sequence[Sequence[int]], n_entries: int) -> np.ndarray:
    """How many texts match each entry (a text counts once per entry it matches)."""
    entry_ids, _ = inverted_index(matches)
    return np.bincount(entry_ids, minlength=n_entries).astype(np.int64)


_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


def build_metadata(texts: Iterable[str], min_count: int = 5, bigram_min_count: int = 5, min_pmi: float = 3.0,
                   stopwords: Iterable[str] = STOPWORDS, extra: Iterable[str] = ()) -> list[str]:
    """A metadata list built from a pool's own text, in MetaCLIP's spirit (its list has Wikipedia unigrams with
    count >= 100 and bigrams with high PMI, plus WordNet lemmas and titles; none of those sources is here):
    lower-cased unigrams seen at least ``min_count`` times, and bigrams seen at least ``bigram_min_count`` times
    with pointwise mutual information ``ln p(ab) / (p(a) p(b)) >= min_pmi``, neither word a stopword; then the
    ``extra`` entries (e.g. lemmas from a word list). Sorted, deduplicated."""
    stop = frozenset(stopwords)
    unigrams: Counter[str] = Counter()
    bigrams: Counter[tuple[str, str]] = Counter()
    for text in texts:
        words = _WORD.findall(text.lower())
        unigrams.update(words)
        bigrams.update(zip(words, words[1:]))
    total_uni = sum(unigrams.values()) or 1
    total_bi = sum(bigrams.values()) or 1
    out = {w for w, c in unigrams.items() if c >= min_count and w not in stop}
    for (a, b), c in bigrams.items():
        if c < bigram_min_count or a in stop or b in stop:
            continue
        pmi = math.log((c / total_bi) / ((unigrams[a] / total_uni) * (unigrams[b] / total_uni)))
        if pmi >= min_pmi:
            out.add(f"{a} {b}")
    out.update(e.strip() for e in extra if e.strip())
    return sorted(out)
