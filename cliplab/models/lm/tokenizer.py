"""Tokenizers of the text models (``tokenizer.json`` files, or a GGUF file's vocabulary), through the Hugging Face
``tokenizers`` library, with the cliplab conventions: right padding, lengths, and truncation that is reported.

A :class:`TextTokenizer` turns texts into a :class:`TextBatch`: ids padded on the right to the batch's longest row,
a mask of real tokens, per-row lengths and truncation flags. Rows longer than ``max_length`` are cut (keeping the
model's closing special token, e.g. BERT's ``[SEP]``) and a :class:`~cliplab.models.tokenizer.TruncationWarning`
says how many.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..tokenizer import TruncationWarning
from .deps import require


@dataclass
class TextBatch:
    """Token ids ``[B, n]`` (right-padded with ``pad_id``), ``mask`` ``[B, n]`` (True on real tokens), ``lengths``
    ``[B]``, ``truncated`` ``[B]`` (bool), the input ``texts`` and, per row, each token's character span."""

    ids: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor
    truncated: torch.Tensor
    texts: list[str]
    spans: list[list[tuple[int, int]]]

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def last_index(self) -> torch.Tensor:
        """Position of the last real token of each row ``[B]``."""
        return (self.lengths - 1).clamp(min=0)

    def select(self, rows: torch.Tensor) -> "TextBatch":
        """The sub-batch of ``rows``, cut to its own longest row."""
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        lengths = self.lengths[rows]
        n = int(lengths.max()) if len(rows) else 0
        return TextBatch(self.ids[rows, :n], self.mask[rows, :n], lengths, self.truncated[rows],
                         [self.texts[r] for r in rows], [self.spans[r] for r in rows])


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with right padding and reported truncation.

    ``add_special_tokens`` follows the model's convention (BERT: ``[CLS] ... [SEP]``; SmolLM2: none).
    ``empty_id``: the token an empty text becomes when the tokenizer adds no special tokens (a decoder cannot pool
    over zero tokens); None keeps empty rows empty."""

    def __init__(self, tokenizer, *, max_length: int, pad_id: int, add_special_tokens: bool = True,
                 empty_id: int | None = None, name: str = "tokenizer"):
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.pad_id = int(pad_id)
        self.add_special_tokens = add_special_tokens
        self.empty_id = empty_id
        self.name = name
        tokenizer.no_padding()
        tokenizer.no_truncation()

    @classmethod
    def from_file(cls, path: str | Path, **kw) -> "TextTokenizer":
        """Read a Hugging Face ``tokenizer.json``."""
        tk = require("tokenizers", "reading tokenizer.json")
        try:
            return cls(tk.Tokenizer.from_file(str(path)), **kw)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            if isinstance(e, (FileNotFoundError, TypeError)):
                raise
            raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from e

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise KeyError(f"{token!r} is not in the {self.name} vocabulary")
        return tid

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of one text, untruncated."""
        special = self.add_special_tokens if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(text, add_special_tokens=special).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None, stacklevel: int = 2,
                 add_special_tokens: bool | None = None) -> TextBatch:
        """Tokenize, pad on the right, cut rows over ``max_length`` (default: the tokenizer's) and say how many.
        ``add_special_tokens=False`` leaves out the model's special tokens (e.g. for a prompt's second half)."""
        special = self.add_special_tokens if add_special_tokens is None else add_special_tokens
        texts = [texts] if isinstance(texts, str) else list(texts)
        for k, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{k}] is {type(t).__name__}, expected str")
        limit = self.max_length if max_length is None else int(max_length)
        if texts:
            encs = self.tokenizer.encode_batch(texts, add_special_tokens=special)
        else:
            encs = []
        rows, spans, cut = [], [], []
        for enc in encs:
            ids, offsets = list(enc.ids), list(enc.offsets)
            if not ids and self.empty_id is not None:
                ids, offsets = [self.empty_id], [(0, 0)]
            truncated = len(ids) > limit
            if truncated:
                ids, offsets = self._truncate(ids, offsets, limit, special)
            rows.append(ids)
            spans.append([tuple(o) for o in offsets])
            cut.append(truncated)
        if any(cut):
            warnings.warn(f"{sum(cut)} of {len(texts)} text(s) were truncated to {limit} tokens ({self.name})",
                          TruncationWarning, stacklevel=stacklevel + 1)
        n = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), n, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = True
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        return TextBatch(ids, mask, lengths, torch.tensor(cut, dtype=torch.bool), texts, spans)

    def _truncate(self, ids: list[int], offsets: list, limit: int, special: bool) -> tuple[list[int], list]:
        """Keep the first ``limit`` tokens; with special tokens added, the closing one (``[SEP]``) stays last."""
        if special and offsets and tuple(offsets[-1]) == (0, 0) and limit >= 2:
            return ids[: limit - 1] + ids[-1:], offsets[: limit - 1] + offsets[-1:]
        return ids[:limit], offsets[:limit]


def read_tokenizer_config(directory: Path) -> dict:
    """``tokenizer_config.json`` of a Hugging Face model folder (empty when absent)."""
    path = directory / "tokenizer_config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def word_tokenizer(words: Sequence[str], max_length: int = 64, name: str = "words") -> TextTokenizer:
    """A small BERT-style WordPiece tokenizer over ``words``, for tiny random models in tests and examples: ids 0-4
    are the special tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]``, then ``words`` in order (``##piece`` entries are word
    continuations); texts are lower-cased and become ``[CLS] ... [SEP]``."""
    tk = require("tokenizers", "word_tokenizer")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials)}
    for w in words:
        vocab.setdefault(w.lower() if not w.startswith("##") else "##" + w[2:].lower(), len(vocab))
    tok = tk.Tokenizer(tk.models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = tk.normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
    tok.add_special_tokens([tk.AddedToken(s, special=True) for s in specials])
    tok.post_processor = tk.processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                          special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return TextTokenizer(tok, max_length=max_length, pad_id=0, add_special_tokens=True, name=name)
