"""MetaCLIP: metadata-based curation of image-text pairs with balancing.

Paper: Xu et al., "Demystifying CLIP Data" (ICLR 2024); code ``facebookresearch/MetaCLIP`` (``substr_matching.py``,
``balancing.py``), read to understand, not copied.

The algorithm acts on the data, before any model: no layer of a CLIP is touched.

1. **Match** each text against a metadata list (:class:`cliplab.curation.matcher.SubstringMatcher`: whole-word
   substring matching after MetaCLIP's punctuation spacing, with an Aho-Corasick automaton).
2. **Count** ``count[e]``: the number of texts that match entry ``e`` (the inverted index entry -> pairs).
3. **Balance** with a per-entry cap ``t``: ``p_e = t / max(count[e], t)``. A pair is kept when **any** of its matched
   entries passes an independent Bernoulli(``p_e``) trial, so it is kept with probability
   ``1 - prod_e (1 - p_e)``: pairs whose entries are all tail entries (``count <= t``) are always kept, a head entry
   keeps about ``t`` of its pairs, and pairs that match nothing are dropped. The trials are drawn over the inverted
   index in one vectorised step (the paper's efficient form); :func:`balance_loop` is the per-pair loop of the
   official code, for parity.

Differences from the paper, and why:

* **Metadata.** The paper's 500k entries come from WordNet synsets, Wikipedia unigrams (count >= 100), bigrams (high
  PMI) and titles (page views). None of those is on this machine (no WordNet package is installed), so
  :func:`cliplab.curation.matcher.build_metadata` builds the list from the pool's own text (lower-cased unigrams and
  high-PMI bigrams, stopwords left out); any list can be passed instead (``--metadata FILE``).
* **t.** The paper's t = 20,000 is for 400M pairs (170k for 2.5B); a pool of thousands needs a t scaled to its size.
  The default of :func:`curate` is the paper's 20k; the experiments state their t.
* **Case.** The official code matches case-sensitively; ``lowercase=True`` lower-cases texts and entries (used with
  a lower-cased list built from the pool).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..methods import register_method
from .matcher import SubstringMatcher, entry_counts, inverted_index

__all__ = ["entry_probabilities", "keep_probability", "balance", "balance_loop", "MetaCLIPCuration", "curate",
           "entry_entropy", "head_tail_stats", "DEFAULT_T", "curate_table", "read_metadata", "hash_entries"]

register_method("metaclip", "Demystifying CLIP Data (MetaCLIP)",
                "metadata curation: whole-word Aho-Corasick matching, inverted index, balancing with per-entry cap t",
                doc="docs/methods/metaclip.md")(__name__)

#: the paper's cap for its 400M pool ("the magic 20k")
DEFAULT_T = 20_000


def entry_probabilities(counts: np.ndarray, t: float) -> np.ndarray:
    """``p_e = t / max(count_e, t)``: 1 for tail entries, ``t / count`` for head ones."""
    if t <= 0:
        raise ValueError(f"t must be positive, got {t}")
    counts = np.asarray(counts, dtype=np.float64)
    return t / np.maximum(counts, t)


def keep_probability(matched: Sequence[int], probs: np.ndarray) -> float:
    """The probability that balancing keeps a pair matching ``matched``: ``1 - prod (1 - p_e)`` (0 for no match)."""
    return float(1.0 - np.prod(1.0 - np.asarray(probs, dtype=np.float64)[list(matched)])) if len(matched) else 0.0


def _draws(rng: np.random.Generator | int | None, n: int) -> np.ndarray:
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    return rng.random(n)


def balance(matches: Sequence[Sequence[int]], probs: np.ndarray, rng: np.random.Generator | int | None = 0,
            draws: np.ndarray | None = None) -> np.ndarray:
    """Keep mask over the pairs (module docstring, step 3), vectorised over the inverted index: one uniform draw per
    (pair, matched entry) in pair-major order (``draws`` gives them explicitly), and a pair is kept when any of its
    draws falls below its entry's probability."""
    entry_ids, offsets = inverted_index(matches)
    u = _draws(rng, len(entry_ids)) if draws is None else np.asarray(draws, dtype=np.float64)
    if len(u) != len(entry_ids):
        raise ValueError(f"need {len(entry_ids)} draws (one per pair and matched entry), got {len(u)}")
    keep = np.zeros(len(matches), dtype=bool)
    keep[np.unique(offsets[u < np.asarray(probs, dtype=np.float64)[entry_ids]])] = True
    return keep


def balance_loop(matches: Sequence[Sequence[int]], probs: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """The official per-pair loop (``balancing.py``) with given draws (pair-major, as :func:`balance` uses them):
    the reference that the vectorised form must equal."""
    keep = np.zeros(len(matches), dtype=bool)
    k = 0
    for i, matched in enumerate(matches):
        for e in matched:
            if draws[k] < probs[e]:
                keep[i] = True
            k += 1
    return keep


def entry_entropy(matches: Sequence[Sequence[int]], n_entries: int, keep: np.ndarray | None = None) -> float:
    """Entropy (nats) of the distribution of matches over entries, of all pairs or of the kept ones: balancing
    flattens it, so it rises."""
    chosen = matches if keep is None else [m for m, k in zip(matches, keep) if k]
    c = entry_counts(chosen, n_entries).astype(np.float64)
    if c.sum() == 0:
        return 0.0
    p = c[c > 0] / c.sum()
    return float(-(p * np.log(p)).sum())


def head_tail_stats(counts: np.ndarray, t: float) -> dict[str, float]:
    """Head entries (count > t), tail entries (0 < count <= t), unmatched entries, and the share of all matches
    that fall on head entries."""
    counts = np.asarray(counts)
    head = counts > t
    total = counts.sum()
    return {"entries": int(len(counts)), "head_entries": int(head.sum()),
            "tail_entries": int(((counts > 0) & ~head).sum()), "unmatched_entries": int((counts == 0).sum()),
            "head_match_share": float(counts[head].sum() / total) if total else 0.0,
            "max_count": int(counts.max()) if len(counts) else 0}


@dataclass
class MetaCLIPCuration:
    """The result of :func:`curate`: ``matches[i]`` (entry ids of text ``i``), ``counts`` (per entry, over the whole
    pool), ``probs`` (``p_e``), ``keep`` (the balanced selection)."""

    entries: list[str]
    matches: list[list[int]]
    counts: np.ndarray
    probs: np.ndarray
    keep: np.ndarray
    t: float
    seed: int | None

    @property
    def kept_indices(self) -> np.ndarray:
        return np.flatnonzero(self.keep)

    def stats(self) -> dict[str, float]:
        n = len(self.matches)
        matched = sum(1 for m in self.matches if m)
        kept_counts = entry_counts([m for m, k in zip(self.matches, self.keep) if k], len(self.entries))
        return {"pairs": n, "matched_pairs": matched, "kept_pairs": int(self.keep.sum()), "t": self.t,
                "entropy_before": entry_entropy(self.matches, len(self.entries)),
                "entropy_after": entry_entropy(self.matches, len(self.entries), self.keep),
                "max_kept_count": int(kept_counts.max()) if len(kept_counts) else 0,
                **head_tail_stats(self.counts, self.t)}


def curate(texts: Sequence[str], entries: Sequence[str], t: float = DEFAULT_T, seed: int | None = 0,
           lowercase: bool = False, matcher: SubstringMatcher | None = None,
           matches: Sequence[Sequence[int]] | None = None) -> MetaCLIPCuration:
    """Match ``texts`` against ``entries`` and balance with cap ``t`` (module docstring). ``seed`` fixes the
    Bernoulli draws; ``matcher`` reuses a built automaton; ``matches`` skips matching (precomputed entry ids)."""
    if matches is None:
        matcher = matcher or SubstringMatcher(entries, lowercase=lowercase)
        matches = matcher.match_many(texts)
    elif len(matches) != len(texts):
        raise ValueError(f"{len(matches)} match lists for {len(texts)} texts")
    matches = [list(m) for m in matches]
    counts = entry_counts(matches, len(entries))
    probs = entry_probabilities(counts, t)
    keep = balance(matches, probs, np.random.default_rng(seed))
    return MetaCLIPCuration(list(entries), matches, counts, probs, keep, t, seed)


def read_metadata(path) -> list[str]:
    """A metadata list file: one entry per line (blank lines and duplicates skipped), or a JSON list."""
    import json
    from pathlib import Path

    text = Path(path).read_text(encoding="utf-8")
    entries = json.loads(text) if text.lstrip().startswith("[") else text.splitlines()
    return list(dict.fromkeys(e.strip() for e in entries if isinstance(e, str) and e.strip()))


def curate_table(src, out, entries: Sequence[str] | None = None, t: float = DEFAULT_T, seed: int | None = 0,
                 lowercase: bool | None = None, min_count: int = 5, caption_column: str = "caption",
                 encoding: str = "utf-8", chunk_size: int = 2048, progress: bool | None = None,
                 overwrite: bool = False):
    """Curate a pairs table ``src`` into ``out`` (Parquet or CSV): the kept rows, each with its ``matched`` entries;
    rejects (rows that cannot be read or have no caption) in ``OUT.rejects.jsonl``. ``entries``: the metadata list
    (default: built from the table's captions with ``min_count``, and then ``lowercase`` defaults to True).
    Matching runs in resumable chunks (``cliplab.curation.pairs_io.run_rows``); balancing with ``t`` and ``seed``
    runs on all matches at the end. Returns ``(MetaCLIPCuration, RowJobResult)``."""
    from .matcher import build_metadata
    from .pairs_io import finish, read_pairs, run_rows

    pairs = read_pairs(src, caption_column, encoding)
    if entries is None:
        entries = build_metadata([c for c in pairs.captions if c], min_count=min_count)
        lowercase = True if lowercase is None else lowercase
    entries = list(entries)
    matcher = SubstringMatcher(entries, lowercase=bool(lowercase))

    def process(rows):
        return [({"matched": matcher.match(r[caption_column])}, None) for r in rows]

    job = {"method": "metaclip", "entries": len(entries), "entries_hash": hash_entries(entries),
           "lowercase": bool(lowercase)}
    result = run_rows(pairs, out, process, job, chunk_size=chunk_size, progress=progress, overwrite=overwrite,
                      desc="metaclip match")
    done = result.rows
    cur = curate([pairs.rows[r["row"]][caption_column] for r in done], entries, t=t, seed=seed,
                 matches=[r["matched"] for r in done])
    kept = [{**pairs.rows[r["row"]], "row": r["row"], "matched": [entries[e] for e in r["matched"]]}
            for r, k in zip(done, cur.keep) if k]
    finish(out, kept, result.rejects, src=src)
    result.info = cur.stats()
    return cur, result


def hash_entries(entries: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(entries).encode("utf-8")).hexdigest()[:16]
