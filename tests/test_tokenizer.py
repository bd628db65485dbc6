"""Tests for cliplab.models.tokenizer (OpenAI CLIP BPE with character offsets).

Parity references:
* ``_RefTokenizer`` below: an independent, literal transcription of OpenAI's
  ``simple_tokenizer.py`` algorithm, built from ``bpe_simple_vocab_16e6.txt.gz``;
* Hugging Face ``tokenizers`` loading ``tokenizer.json``;
* ``instant_clip_tokenizer`` (Rust).
Tests that need ``../shared/data`` skip with a reason when it is absent.
"""

from __future__ import annotations

import csv
import functools
import gzip
import html
import os
import warnings
from pathlib import Path

import ftfy
import pytest
import regex
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cliplab.models import text_normalization as N, tokenizer as T
from cliplab.models.tokenizer import (
    EOT_ID,
    PAD_ID,
    SOT_ID,
    VOCAB_SIZE,
    CLIPTokenizer,
    TokenizedBatch,
    TruncationError,
    TruncationWarning,
    VocabularyError,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(rel: str) -> Path:
    """Path under ../shared/data, or skip the test with a reason."""
    p = DATA / rel
    if not p.exists():
        pytest.skip(f"{p} not found: the shared real-data folder ../shared/data is absent (fresh clone)")
    return p


# --------------------------------------------------------------------------- independent reference


def _ref_bytes_to_unicode():
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _ref_pairs(word):
    return {(a, b) for a, b in zip(word, word[1:])}


class _RefTokenizer:
    """Literal transcription of OpenAI's simple_tokenizer algorithm (reference only)."""

    def __init__(self, bpe_path: Path):
        self.byte_encoder = _ref_bytes_to_unicode()
        merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")
        merges = merges[1 : 49152 - 256 - 2 + 1]
        self.merges = [tuple(m.split()) for m in merges]
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab]
        for m in self.merges:
            vocab.append("".join(m))
        vocab.extend(["<|startoftext|>", "<|endoftext|>"])
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.bpe_ranks = dict(zip(self.merges, range(len(self.merges))))
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        self.pat = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )

    @staticmethod
    def clean(text):
        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text))
        text = text.strip()
        text = regex.sub(r"\s+", " ", text)
        return text.strip().lower()

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _ref_pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                    new_word.extend(word[i:j])
                    i = j
                except ValueError:
                    new_word.extend(word[i:])
                    break
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = _ref_pairs(word)
        word = " ".join(word)
        self.cache[token] = word
        return word

    def encode(self, text):
        out = []
        for token in regex.findall(self.pat, self.clean(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            out.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return out

    def tokenize(self, texts, context_length=77):
        result = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            tokens = [SOT_ID] + self.encode(text) + [EOT_ID]
            if len(tokens) > context_length:
                tokens = tokens[:context_length]
                tokens[-1] = EOT_ID
            result[i, : len(tokens)] = torch.tensor(tokens)
        return result


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


@functools.lru_cache(maxsize=1)
def _ref_cached(path: str) -> _RefTokenizer:
    return _RefTokenizer(Path(path))


@pytest.fixture(scope="module")
def ref():
    return _ref_cached(str(shared("clip-tokenizer/bpe_simple_vocab_16e6.txt.gz")))


@pytest.fixture(scope="module")
def captions():
    path = shared("flickr8k-1k/all_captions.csv")
    with open(path, newline="", encoding="utf-8") as fh:
        caps = [row["caption"] for row in csv.DictReader(fh)]
    assert len(caps) == 40455
    return caps


@pytest.fixture(scope="module")
def caption_batch(tok, captions):
    with warnings.catch_warnings():
        warnings.simplefilter("error", TruncationWarning)  # no caption is too long
        return tok(captions)


@pytest.fixture(scope="module")
def caption_ids(caption_batch):
    b = caption_batch
    return [b.ids[i, 1 : int(b.lengths[i]) - 1].tolist() for i in range(len(b))]


def _token_bytes(tok: CLIPTokenizer, i: int) -> bytes:
    return tok._v.token_bytes(i)


# --------------------------------------------------------------------------- vocabulary


def test_merges_extracted_from_package():
    merges = T.load_merges()
    assert len(merges) == T.N_MERGES == 48894
    assert merges[0] == ("i", "n") and merges[-1] == ("jeky", "ll</w>")
    assert T.load_merges() is merges  # loaded once
    tok = CLIPTokenizer()
    assert tok._v is CLIPTokenizer()._v  # shared singleton
    assert len(tok._v.encoder) == VOCAB_SIZE
    assert tok._v.encoder["<|startoftext|>"] == SOT_ID and tok._v.encoder["<|endoftext|>"] == EOT_ID
    assert (tok.vocab_size, tok.sot_id, tok.eot_id, tok.pad_id, tok.context_length) == (49408, SOT_ID, EOT_ID, 0, 77)


def test_merges_match_openai_file():
    path = shared("clip-tokenizer/bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    assert [tuple(m.split(" ")) for m in lines] == T.load_merges()


def test_vocabulary_errors(monkeypatch):
    with pytest.raises(VocabularyError, match="not found"):
        T._extract_merges(b"\x7fELF no table here", "fake.so")
    with pytest.raises(VocabularyError, match="truncated"):
        T._extract_merges(b"xx#version: 0.2\na b\nc d\n", "fake.so")
    bogus = b"#version: 0.2\n" + b"a b\n" * (T.N_MERGES + 3)
    with pytest.raises(VocabularyError, match="sha256"):
        T._extract_merges(bogus, "fake.so")
    monkeypatch.setattr(T.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(VocabularyError, match="instant-clip-tokenizer"):
        T._find_extension()


# --------------------------------------------------------------------------- parity on real captions


def test_parity_reference_all_captions(ref, captions, caption_ids):
    mism = [i for i, c in enumerate(captions) if ref.encode(c) != caption_ids[i]]
    assert mism == [], [captions[i] for i in mism[:5]]


def test_call_matches_reference_padding(ref, captions, caption_batch):
    expected = ref.tokenize(captions)
    assert caption_batch.ids.dtype == torch.long
    assert torch.equal(caption_batch.ids, expected)
    assert torch.equal(caption_batch.eot_index, expected.argmax(dim=-1))  # no literal EOT in captions
    assert caption_batch.num_truncated == 0 and int(caption_batch.n_dropped.sum()) == 0


def test_parity_hf_tokenizers_all_captions(tok, captions, caption_ids):
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(shared("clip-tokenizer/tokenizer.json")))
    # tokenizer.json: NFC + \s+ -> " " + lowercase (no ftfy / html.unescape); its
    # post-processor adds SOT/EOT, so compare content ids without special tokens.
    # Every caption is plain ASCII on which ftfy and html.unescape are no-ops, so
    # both normalisations agree:
    assert all(c.isascii() and html.unescape(c) == c for c in captions)
    hf_ids = [e.ids for e in hf.encode_batch(captions, add_special_tokens=False)]
    mism = [i for i in range(len(captions)) if hf_ids[i] != caption_ids[i]]
    assert mism == [], [captions[i] for i in mism[:5]]
    with_special = hf.encode(captions[0]).ids
    assert with_special == [SOT_ID] + caption_ids[0] + [EOT_ID]


def test_parity_instant_clip_tokenizer(captions, caption_ids):
    ict = pytest.importorskip("instant_clip_tokenizer")
    rust = ict.Tokenizer()
    # instant-clip-tokenizer only lower-cases (no ftfy / html.unescape): compare on
    # texts where those are no-ops, which holds for every caption (checked).
    comparable = [i for i, c in enumerate(captions) if ftfy.fix_text(c) == c and html.unescape(c) == c]
    assert len(comparable) == len(captions)
    mism = [i for i in comparable if list(rust.encode(captions[i])) != caption_ids[i]]
    assert mism == [], [captions[i] for i in mism[:5]]


def test_caption_offsets(captions, caption_batch, tok):
    b = caption_batch
    for r, text in enumerate(captions):
        n = int(b.lengths[r])
        spans = b.spans[r]
        assert len(spans) == n
        assert spans[0] == (0, 0) and spans[-1] == (len(text), len(text))
        prev_end = 0
        for pos in range(1, n - 1):
            s, e = spans[pos]
            assert prev_end <= s < e <= len(text)  # ordered, disjoint (ASCII text: no shared chars)
            prev_end = e
            expected = _token_bytes(tok, int(b.ids[r, pos])).decode("utf-8")
            assert text[s:e].strip().lower() == expected, (text, pos)


def test_caption_speed(tok, captions):
    import time

    t0 = time.perf_counter()
    tok(captions)
    elapsed = time.perf_counter() - t0
    assert elapsed < 15.0, f"tokenizing {len(captions)} captions took {elapsed:.1f}s"


# --------------------------------------------------------------------------- arbitrary unicode


def _is_simple(text: str) -> bool:
    """Normalisation only strips, collapses whitespace and lower-cases (length-preserving)."""
    return (
        ftfy.fix_text(text) == text
        and html.unescape(text) == text
        and len(text.lower()) == len(text)
    )


_PAT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def _covered(norm: str) -> list[int]:
    """Indices of normalised characters inside pre-token matches.

    Not every non-whitespace character is: with IGNORECASE, a mark such as U+0345
    (which case-folds to a letter) matches none of OpenAI's alternatives and is
    dropped, exactly as in OpenAI's tokenizer.
    """
    return [k for m in _PAT.finditer(norm) for k in range(m.start(), m.end())]


def _expected_spans_simple(tok, text, ids):
    """Independent offsets for a 'simple' text: kept characters map 1:1 to the original."""
    lo = text.lower()
    head = len(text) - len(text.lstrip())
    tail = len(text.rstrip())
    kept = [k for k in range(head, tail) if not regex.match(r"\s", text[k])]
    norm = regex.sub(r"\s+", " ", text.strip()).strip().lower()
    nonspace = [j for j in range(len(norm)) if norm[j] != " "]
    assert len(nonspace) == len(kept)
    to_orig = dict(zip(nonspace, kept))
    char_of_byte = []
    for j in _covered(norm):
        k = to_orig[j]
        char_of_byte.extend([k] * len(lo[k].encode("utf-8")))
    spans = []
    pos = 0
    for i in ids:
        nb = len(_token_bytes(tok, i))
        spans.append((char_of_byte[pos], char_of_byte[pos + nb - 1] + 1))
        pos += nb
    assert pos == len(char_of_byte)  # tokens cover every pre-tokenised byte
    return spans


def _check_generic(tok, ref, text):
    ids, spans = tok.encode_with_offsets(text)
    assert ids == tok.encode(text)
    if ref is not None:
        assert ids == ref.encode(text)
        assert T.normalize(text) == ref.clean(text)
    assert len(spans) == len(ids)
    # bounds and order: starts and ends non-decreasing
    for k, (s, e) in enumerate(spans):
        assert 0 <= s <= e <= len(text)
        if k:
            assert spans[k - 1][0] <= s and spans[k - 1][1] <= e
    # coverage: tokens reproduce the pre-tokenised normalised text, byte for byte
    norm, nmap = T.normalize_with_offsets(text)
    assert len(nmap) == len(norm)
    kept = _covered(norm)
    assert b"".join(_token_bytes(tok, i) for i in ids) == "".join(norm[k] for k in kept).encode("utf-8")
    # each span is the union of the alignment spans of the normalised chars the token covers
    char_of_byte = [k for k in kept for _ in norm[k].encode("utf-8")]
    pos = 0
    for i, (s, e) in zip(ids, spans):
        nb = len(_token_bytes(tok, i))
        c0, c1 = char_of_byte[pos], char_of_byte[pos + nb - 1]
        assert (s, e) == (nmap[c0][0], nmap[c1][1])
        pos += nb
    # overlap only when justified: a split UTF-8 character or one source group
    for k in range(1, len(spans)):
        if spans[k][0] < spans[k - 1][1]:
            prev_bytes = sum(len(_token_bytes(tok, i)) for i in ids[:k])
            last_prev = char_of_byte[prev_bytes - 1]
            first_next = char_of_byte[prev_bytes]
            shared_char = last_prev == first_next
            a, b = nmap[last_prev], nmap[first_next]
            shared_group = a[0] < b[1] and b[0] < a[1]
            assert shared_char or shared_group, (text, spans[k - 1], spans[k])
    return ids, spans


def _check_simple(tok, text, ids, spans):
    assert spans == _expected_spans_simple(tok, text, ids)
    lo = text.lower()
    for k, (i, (s, e)) in enumerate(zip(ids, spans)):
        shared = (k > 0 and spans[k - 1][1] > s) or (k + 1 < len(spans) and spans[k + 1][0] < e)
        if shared:  # token splits a multi-byte character: its span is that whole character
            assert e - s >= 1 and len(text[s:e].encode("utf-8")) > len(_token_bytes(tok, i))
            continue
        # lower-case the span in context (Python's final-sigma rule is context dependent)
        assert lo[s:e].strip() == _token_bytes(tok, i).decode("utf-8")
        assert text[s:e].strip().lower().replace("ς", "σ") == lo[s:e].replace("ς", "σ")


# CLIPLAB_HYPOTHESIS_EXAMPLES raises the example count for a longer local search
_HYP = settings(max_examples=int(os.environ.get("CLIPLAB_HYPOTHESIS_EXAMPLES", "200")), deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_HYP
@given(st.text())
def test_offsets_arbitrary_text(tok, text):
    ids, spans = _check_generic(tok, _ref_or_none(), text)
    if _is_simple(text):
        _check_simple(tok, text, ids, spans)


_WORDS = st.text(alphabet=st.characters(categories=["Ll", "Lu", "Nd", "Po", "Lo", "Mn", "So"]), min_size=1, max_size=8)
_SIMPLE_PIECES = st.sampled_from(
    ["Dog", "ΣΟΦΟΣ", "naïve", "日本語のテキスト", "👋🏽", "👨‍👩‍👧", "x\u0301\u0302", "don't", "we'll", "ÄÖÜ", "12345", "!!?", "Ω≈ç√"]
)
_MESSY_PIECES = st.sampled_from(
    [
        "&amp;", "&lt;b&gt;", "&#233;t&eacute;", "&amp;amp;", "&ampx", "&#x1F600;", "&notit;",
        "Ã©", "cafÃ©", "Ã¼ber", "â€œquoteâ€\x9d", "İstanbul", "İİ", "ﬁne", "ﬂow", "e\u0301",
        "ＡＢＣ", "“curly”", "\x1b[31mred\x1b[0m", "a\x00b", "½", "ǅ", "ß", "ΑΣ",
    ]
)
_SEPS = st.sampled_from([" ", "  ", "\t", "\n", " \r\n ", "\u2003", " \u3000 "])


@_HYP
@given(st.lists(st.one_of(_WORDS, _SIMPLE_PIECES), min_size=1, max_size=12), st.lists(_SEPS, min_size=12, max_size=12))
def test_offsets_simple_targeted(tok, pieces, seps):
    text = seps[0] + "".join(p + s for p, s in zip(pieces, seps[1:]))
    ids, spans = _check_generic(tok, _ref_or_none(), text)
    if _is_simple(text):
        _check_simple(tok, text, ids, spans)


@_HYP
@given(
    st.lists(st.one_of(_MESSY_PIECES, _SIMPLE_PIECES, _WORDS), min_size=1, max_size=8),
    st.lists(st.sampled_from([" ", "  ", "\t", "\n", " \r\n "]), min_size=8, max_size=8),
)
# regression: the "&" of "&amp;amp;" got span (8, 22), starting inside the terminal
# escape "\x1b[0m" that ftfy deletes and swallowing the separator
@example(pieces=["\x1b[31mred\x1b[0m", "&amp;amp;"], seps=[" "] * 8)
def test_offsets_normalisation_changes(tok, pieces, seps):
    """ftfy/html change characters: each token's span stays inside the piece it came from."""
    bounds = []
    text = ""
    for p, s in zip(pieces, seps):
        bounds.append((len(text), len(text) + len(p)))
        text += p + s
    ids, spans = _check_generic(tok, _ref_or_none(), text)
    if ftfy.fix_text(text) != "".join(ftfy.fix_text(p) + ftfy.fix_text(s) for p, s in zip(pieces, seps)):
        # ftfy joined a piece with its separator (e.g. "Ã" + " " is mojibake for "à"):
        # tokens may then legitimately span the boundary; the generic checks still ran.
        return
    for s, e in spans:
        assert any(a <= s and e <= b for a, b in bounds), (text, (s, e), text[s:e], bounds)
    # every piece that produces tokens on its own is covered by some token span
    for (a, b), p in zip(bounds, pieces):
        if tok.encode(p):
            assert any(a <= s < e <= b for s, e in spans), (text, p)


def test_offsets_deleted_and_adjacent_groups(tok):
    """Deleted characters map to nothing; neighbouring replaced groups stay apart."""
    text = "\x1b[31mred\x1b[0m &amp;amp; "
    ids, spans = tok.encode_with_offsets(text)
    assert tok.token_strings(ids) == ["red", "&"] and spans == [(5, 8), (13, 22)]
    text = "\x1b[1m&lt;\x1b[0m&gt; a\x00&amp;"
    ids, spans = tok.encode_with_offsets(text)
    assert [text[s:e] for s, e in spans] == ["&lt;", "&gt;", "a", "&amp;"]
    ids, spans = tok.encode_with_offsets("&lt;&gt;")
    assert tok.token_strings(ids) == ["<", ">"] and spans == [(0, 4), (4, 8)]
    norm, nmap = T.normalize_with_offsets("&lt;&gt; &ampx")
    assert norm == "<> &x" and nmap == [(0, 4), (4, 8), (8, 9), (9, 13), (13, 14)]
    text = "&amp;\x1b[0mDog\x1b[0mDogDog\x1b[0m"  # ftfy's steps are replayed exactly
    ids, spans = tok.encode_with_offsets(text)
    assert spans == [(0, 5), (9, 12), (16, 19), (19, 22)]
    # the generic alignment leaves deleted escapes out of a replaced group
    assert N._align("\x1b[0m\u201c", '"') == [(4, 5)]


def test_offsets_examples(tok):
    ids, spans = tok.encode_with_offsets("x &amp;amp; y")
    assert tok.token_strings(ids) == ["x", "&", "y"] and spans == [(0, 1), (2, 11), (12, 13)]
    text = "cafÃ© İstanbul ﬁne"
    ids, spans = tok.encode_with_offsets(text)
    assert tok.decode(ids) == "café i ̇ stanbul fine "
    assert [text[s:e] for s, e in spans] == ["cafÃ©", "İ", "İ", "stanbul", "ﬁne"]
    text = "世界"  # each CJK char is split into several byte tokens that share its span
    ids, spans = tok.encode_with_offsets(text)
    assert len(ids) > 2 and {text[s:e] for s, e in spans} == {"世", "界"}
    assert spans == sorted(spans)
    assert tok.token_strings(ids)[0].startswith("\\x")


def _ref_or_none():
    p = DATA / "clip-tokenizer" / "bpe_simple_vocab_16e6.txt.gz"
    return _ref_cached(str(p)) if p.exists() else None


# --------------------------------------------------------------------------- batch API


def test_token_positions(tok):
    b = tok(["a man riding a horse", "A skateboarder and a MAN and a man"])
    assert isinstance(b, TokenizedBatch) and len(b) == 2
    pos = b.token_positions(0, "man")
    assert pos == [2] and tok.token_strings([int(b.ids[0, 2])]) == ["man"]
    sk = b.token_positions(1, "skateboarder")
    assert len(sk) >= 2 and sk == list(range(sk[0], sk[-1] + 1))
    assert "".join(tok.token_strings(b.ids[1, sk])) == "skateboarder"
    first, second = b.token_positions(1, "man"), b.token_positions(1, "Man", occurrence=1)
    assert first != second and len(first) == len(second) == 1
    assert b.spans[1][first[0]] == (21, 24) and b.spans[1][second[0]] == (31, 34)
    with pytest.raises(ValueError):
        b.token_positions(0, "zebra")
    with pytest.raises(ValueError):
        b.token_positions(0, "man", occurrence=1)
    assert b.token_positions(0, "riding a") == [3, 4]


def test_batch_structure_and_to(tok):
    texts = ["Hello world", "", "  green   grass  "]
    b = tok(texts, context_length=16)
    assert b.ids.shape == (3, 16) and b.lengths.tolist() == [4, 2, 4]
    assert b.eot_index.tolist() == [3, 1, 3]
    for r, t in enumerate(texts):
        n = int(b.lengths[r])
        assert b.ids[r, 0] == SOT_ID and b.ids[r, n - 1] == EOT_ID
        assert (b.ids[r, n:] == PAD_ID).all()
        assert b.spans[r][0] == (0, 0) and b.spans[r][-1] == (len(t), len(t))
    assert [t[s:e] for s, e in b.spans[2][1:-1]] == ["green", "grass"]
    m = b.to("meta")
    assert m.ids.device.type == "meta" and m.texts == texts and m.spans == b.spans
    assert tok("one text").ids.shape == (1, 77)


def _long_text(n_words=300):
    words = ["horse", "field", "running", "brown", "dog", "grass", "photographer", "sunny"]
    return " ".join(words[i % len(words)] for i in range(n_words))


def test_truncation_warns_once(tok):
    text = _long_text()
    n = len(tok.encode(text))
    assert n > 75
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        b = tok([text, "short", text + " extra"])
    tw = [w for w in rec if issubclass(w.category, TruncationWarning)]
    assert len(tw) == 1 and "2 of 3" in str(tw[0].message)
    assert issubclass(TruncationWarning, UserWarning)
    assert b.lengths.tolist() == [77, 3, 77] and b.ids[0, -1] == EOT_ID and b.ids[2, 76] == EOT_ID
    assert b.truncated.tolist() == [True, False, True] and b.num_truncated == 2
    assert b.n_dropped.tolist() == [n - 75, 0, len(tok.encode(text + " extra")) - 75]
    assert b.ids[0, 1:76].tolist() == tok.encode(text)[:75]
    assert len(b.spans[0]) == 77 and b.spans[0][-1] == (len(text), len(text))
    # the dropped part of the text cannot be located
    with pytest.raises(ValueError, match="truncated"):
        b.token_positions(0, "sunny", occurrence=30)


def test_truncation_matches_openai(ref, tok):
    text = _long_text()
    with pytest.warns(TruncationWarning):
        b = tok([text])
    assert torch.equal(b.ids, ref.tokenize([text]))


def test_truncation_error(tok):
    text = _long_text()
    with pytest.raises(TruncationError, match=r"row 1: \d+ content tokens") as exc:
        tok(["fine", text], truncate=False)
    assert isinstance(exc.value, ValueError) and "context_length=77" in str(exc.value)
    text = _long_text(200)
    n = len(tok.encode(text))
    assert 75 < n <= 246
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = tok(["fine", text], context_length=248, truncate=False)  # fits: no warning
    assert b.ids.shape == (2, 248) and int(b.lengths[1]) == n + 2 and not b.truncated.any()
    with pytest.warns(TruncationWarning):
        b2 = CLIPTokenizer(context_length=248)(_long_text(600))
    assert b2.ids.shape == (1, 248) and b2.ids[0, -1] == EOT_ID and b2.n_dropped.item() > 0


def test_decode(tok):
    for text in ["a man riding a horse", "two dogs play in the grass !", "it's 3 o'clock"]:
        ids = tok.encode(text)
        assert tok.decode(ids).strip() == " ".join(
            regex.findall(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", text)
        )
    assert tok.decode(tok.encode("a man riding a horse")) == "a man riding a horse "
    assert tok.decode(tok.encode("hi!")) == "hi ! "  # id 0 is '!' inside content
    row = tok("a dog!").ids[0]
    assert tok.decode(row) == "a dog ! "  # SOT/EOT and trailing padding dropped
    with pytest.raises(ValueError):
        tok.decode([VOCAB_SIZE])


def test_literal_special_tokens_follow_openai(tok):
    assert tok.encode("<|endoftext|>") == [EOT_ID]
    assert tok.token_strings([SOT_ID, EOT_ID]) == ["<|startoftext|>", "<|endoftext|>"]


def test_doc_example_runs(capsys):
    doc = Path(__file__).resolve().parents[1] / "docs" / "tokenizer.md"
    if not doc.exists():
        pytest.skip(f"{doc} not found")
    blocks = regex.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), flags=regex.S)
    exec(compile(blocks[-1], str(doc), "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "torch.Size([2, 77])",
        "[7, 5]",
        "['man']",
        "['caf&eacute;', 'with', 'milk']",
        "café with milk ",
    ]
