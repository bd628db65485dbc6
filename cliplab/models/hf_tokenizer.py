"""Tokenizers that ship with a checkpoint (``tokenizer.json``: SigLIP's SentencePiece model, any Hugging Face CLIP),
read with the Hugging Face ``tokenizers`` library and given :class:`~cliplab.models.tokenizer.CLIPTokenizer`'s
interface, so that a model loaded from such a directory tokenizes as it was trained and the token-level API
(``token_positions``, spans) works the same.

Rules, from the files (``tokenizer.json``, and ``tokenizer_config.json`` / ``special_tokens_map.json`` if present):

* **ids** are the library's own: its normaliser, pre-tokeniser, model, and the special tokens its post-processor adds
  (CLIP: ``<|startoftext|> ... <|endoftext|>``; SigLIP: ``... </s>``).
* **spans** are the library's character offsets for the text's tokens; the special tokens the post-processor adds get
  empty spans, ``(0, 0)`` before the text and ``(len(text), len(text))`` after it (as CLIPTokenizer's SOT / EOT).
* **truncation** keeps the first ``context_length - n_special`` content tokens and the special tokens (the library's
  own truncation gives the same ids); it is reported as CLIPTokenizer reports it (flags, one
  :class:`~cliplab.models.tokenizer.TruncationWarning`, or :class:`~cliplab.models.tokenizer.TruncationError` with
  ``truncate=False``).
* **padding**: every row is right-padded to the context length with the pad id: ``tokenizer.json``'s
  ``padding.pad_id``, else the ``pad_token`` of the config files, else the closing special token.
* **pooled position** (``TokenizedBatch.eot_index``): the model's ``config.text.pool``, passed as ``pool``: ``"eot"``
  pools at the closing special token (``lengths - 1``), ``"last"`` at the last position of the fixed-length row
  (SigLIP, trained on rows padded to 64).

:func:`attach_checkpoint_tokenizer` gives a loaded model its directory's tokenizer; ``CLIP.save`` writes the files
back and names ``tokenizer.json`` in ``cliplab.json``'s ``config.tokenizer``, so load -> save -> load keeps it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .tokenizer import Span, TokenizedBatch, as_text_list, ids_as_list, truncation_error, warn_truncated


__all__ = ["CheckpointTokenizer", "attach_checkpoint_tokenizer", "TOKENIZER_FILE", "DEFAULT_TOKENIZER"]

TOKENIZER_FILE = "tokenizer.json"
#: the side files read (and written back by ``save``) when present
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
#: ``ModelConfig.tokenizer`` of a model tokenized with OpenAI's BPE (:class:`~cliplab.models.tokenizer.CLIPTokenizer`)
DEFAULT_TOKENIZER = "openai-clip-bpe"
#: transformers writes a huge ``model_max_length`` when it knows none
_NO_MAX_LENGTH = 1_000_000
_FALLBACK_CONTEXT = 77
_POOLS = ("eot", "last")


def _token_name(value) -> str | None:
    """A special token as written in the config files: a string, or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class CheckpointTokenizer:
    """A ``tokenizer.json`` with CLIPTokenizer's interface (see the module docstring for the rules).

    ``tokenizer_json``: the file's text; ``configs``: the texts of ``tokenizer_config.json`` /
    ``special_tokens_map.json`` by file name; ``context_length`` (default: the files' fixed padding or maximum length,
    else 77); ``pool``: ``"eot"`` or ``"last"``, the model's ``config.text.pool``."""

    def __init__(self, tokenizer_json: str, configs: dict[str, str] | None = None, *,
                 context_length: int | None = None, pool: str = "eot", source: str = TOKENIZER_FILE):
        from tokenizers import Tokenizer

        if pool not in _POOLS:
            raise ValueError(f"pool must be one of {_POOLS}, got {pool!r}")
        self.source = source
        self._json = tokenizer_json
        self._configs = dict(configs or {})
        try:
            tok = Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{source}: not a readable tokenizer.json ({e})") from e
        raw = json.loads(tokenizer_json)
        settings: dict = {}
        for name in CONFIG_FILES:  # tokenizer_config.json wins over special_tokens_map.json
            if name in self._configs:
                settings = {**json.loads(self._configs[name]), **settings}
        tok.no_padding()  # padding and truncation are ours (reported, to the model's context length)
        tok.no_truncation()
        self._tok = tok
        # CLIP's BPE marks word ends with "</w>", which its ByteLevel decoder leaves in: transformers'
        # CLIPTokenizerFast replaces it by a space after decoding, and so do we
        self._word_end = getattr(tok.model, "end_of_word_suffix", None) or None
        self.pool = pool
        self.n_special = tok.num_special_tokens_to_add(is_pair=False)
        prefix, suffix = self._special_layout()
        self.n_prefix = len(prefix)
        self.sot_id = prefix[0] if prefix else None
        eos = _token_name(settings.get("eos_token"))
        self.eot_id = suffix[-1] if suffix else (tok.token_to_id(eos) if eos else None)
        pad = (raw.get("padding") or {}).get("pad_id")
        if pad is None:
            name = _token_name(settings.get("pad_token"))
            pad = tok.token_to_id(name) if name else None
        self.pad_id = int(pad if pad is not None else (self.eot_id if self.eot_id is not None else 0))
        self.context_length = int(context_length if context_length is not None
                                  else self._own_length(raw, settings) or _FALLBACK_CONTEXT)
        if self.context_length < max(self.n_special, 1):
            raise ValueError(f"context_length must be >= {max(self.n_special, 1)} (the tokenizer adds {self.n_special} "
                             f"special token(s)), got {self.context_length}")

    # ---- construction
    @classmethod
    def from_file(cls, path: str | Path, **kw) -> "CheckpointTokenizer":
        """Read ``path`` (a ``tokenizer.json``) and the config files beside it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        configs = {n: (path.parent / n).read_text(encoding="utf-8") for n in CONFIG_FILES
                   if (path.parent / n).is_file()}
        return cls(path.read_text(encoding="utf-8"), configs, source=str(path), **kw)

    @classmethod
    def from_dir(cls, directory: str | Path, **kw) -> "CheckpointTokenizer":
        return cls.from_file(Path(directory) / TOKENIZER_FILE, **kw)

    def with_context_length(self, context_length: int) -> "CheckpointTokenizer":
        """The same tokenizer at another context length (shares the parsed tokenizer)."""
        if context_length < max(self.n_special, 1):
            raise ValueError(f"context_length must be >= {max(self.n_special, 1)}, got {context_length}")
        other = copy.copy(self)
        other.context_length = int(context_length)
        return other

    @property
    def fingerprint(self) -> str:
        """``tokenizer.json:<sha256 prefix>`` of the files: what caches and embedding jobs record, so that two
        different shipped tokenizers on the same weights never share an entry."""
        import hashlib

        h = hashlib.sha256(self._json.encode("utf-8"))
        for name in sorted(self._configs):
            h.update(f"\0{name}\0{self._configs[name]}".encode("utf-8"))
        return f"{TOKENIZER_FILE}:{h.hexdigest()[:16]}"

    def save(self, directory: str | Path) -> str:
        """Write the files as they were read (``tokenizer.json`` and the config files); returns the tokenizer's file
        name, what ``ModelConfig.tokenizer`` records."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / TOKENIZER_FILE).write_text(self._json, encoding="utf-8")
        for name, text in self._configs.items():
            (directory / name).write_text(text, encoding="utf-8")
        return TOKENIZER_FILE

    def _special_layout(self) -> tuple[list[int], list[int]]:
        """Ids of the special tokens the post-processor puts before and after a text's tokens."""
        for probe in ("a", "x", "0", "hello world"):
            enc = self._tok.encode(probe, add_special_tokens=True)
            seq = enc.sequence_ids
            if any(s is not None for s in seq):
                first = seq.index(0)
                last = len(seq) - 1 - seq[::-1].index(0)
                return list(enc.ids[:first]), list(enc.ids[last + 1:])
        return [], list(self._tok.encode("", add_special_tokens=True).ids)  # pragma: no cover - no probe tokenizes

    @staticmethod
    def _own_length(raw: dict, settings: dict) -> int | None:
        strategy = (raw.get("padding") or {}).get("strategy")
        if isinstance(strategy, dict) and "Fixed" in strategy:
            return int(strategy["Fixed"])
        trunc = (raw.get("truncation") or {}).get("max_length")
        if trunc:
            return int(trunc)
        longest = settings.get("model_max_length")
        return int(longest) if isinstance(longest, (int, float)) and 0 < longest < _NO_MAX_LENGTH else None

    # ---- the tokenizer's facts
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def tokenizer(self):
        """The underlying ``tokenizers.Tokenizer`` (padding and truncation disabled)."""
        return self._tok

    def __repr__(self) -> str:
        return (f"CheckpointTokenizer({self.source!r}, vocab_size={self.vocab_size}, context_length="
                f"{self.context_length}, pad_id={self.pad_id}, eot_id={self.eot_id}, pool={self.pool!r})")

    # ---- encoding
    def encode(self, text: str) -> list[int]:
        """Content token ids of ``text`` (without the special tokens the post-processor adds)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[Span]]:
        """Content ids and, per id, its ``(start, end)`` character span in ``text`` (the library's offsets)."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None, truncate: bool = True,
                 stacklevel: int = 2) -> TokenizedBatch:
        """Tokenize a text or list of texts into a :class:`TokenizedBatch` padded to the context length. ``stacklevel``
        places the truncation warning (wrappers pass theirs + 1 so it points at their caller)."""
        texts = as_text_list(texts)
        L = self.context_length if context_length is None else int(context_length)
        if L < max(self.n_special, 1):
            raise ValueError(f"context_length must be >= {max(self.n_special, 1)}, got {L}")
        max_content = L - self.n_special
        encoded = self._tok.encode_batch(texts, add_special_tokens=False) if texts else []
        too_long = [(k, len(e.ids)) for k, e in enumerate(encoded) if len(e.ids) > max_content]
        if too_long and not truncate:
            raise truncation_error(too_long, len(texts), L, max_content)
        ids = torch.full((len(texts), L), self.pad_id, dtype=torch.long)
        lens, drops, spans = [], [], []
        for k, enc in enumerate(encoded):
            drops.append(max(0, len(enc.ids) - max_content))
            if drops[-1]:
                enc.truncate(max_content)
            full = self._tok.post_process(enc, None, add_special_tokens=True)
            row = list(full.ids)
            ids[k, : len(row)] = torch.tensor(row, dtype=torch.long)
            lens.append(len(row))
            spans.append(self._spans(full, len(texts[k])))
        n_dropped = torch.tensor(drops, dtype=torch.long)
        if too_long:
            warn_truncated(too_long, len(texts), L, int(n_dropped.sum()), stacklevel=stacklevel)
        return TokenizedBatch(ids=ids, lengths=torch.tensor(lens, dtype=torch.long), spans=spans,
                              truncated=n_dropped > 0, n_dropped=n_dropped, texts=texts, pool=self.pool)

    def _spans(self, enc, n_chars: int) -> list[Span]:
        """The library's offsets for the text's tokens; empty spans at the text's start / end for the special tokens
        the post-processor added before / after them."""
        out: list[Span] = []
        seen_text = False
        for k, (seq, off) in enumerate(zip(enc.sequence_ids, enc.offsets)):
            if seq is not None:
                seen_text = True
                out.append(tuple(off))
            elif seen_text or k >= self.n_prefix:
                out.append((n_chars, n_chars))
            else:
                out.append((0, 0))
        return out

    # ---- decoding
    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of ``ids`` (the library's decoder), without special tokens and without the padding of a padded row
        (a run of pad ids after the closing special token)."""
        lst = ids_as_list(ids, self.vocab_size)
        j = len(lst)
        while j > 0 and lst[j - 1] == self.pad_id:
            j -= 1
        if j < len(lst) and j > 0 and lst[j - 1] == self.eot_id:
            lst = lst[:j]  # trailing padding after the closing token
        return self._decode(lst, skip_special_tokens=True)

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        if self._word_end and self._word_end in text:
            text = text.replace(self._word_end, " ").strip()
        return text

    def token_strings(self, ids: Iterable[int] | torch.Tensor) -> list[str]:
        """Readable string per id (for plots): the id decoded alone, or its vocabulary entry where that decodes to
        nothing visible (e.g. SentencePiece's lone ``"▁"``); special tokens by name."""
        out = []
        for i in ids_as_list(ids, self.vocab_size):
            s = self._decode([i], skip_special_tokens=False)
            out.append(s if s.strip() else (self._tok.id_to_token(i) or s))
        return out


def attach_checkpoint_tokenizer(model, directory: str | Path) -> CheckpointTokenizer | None:
    """Tokenize ``model`` with the ``tokenizer.json`` that ``directory`` ships (or the file its config names); returns
    the tokenizer, or None where the directory ships none (the model keeps OpenAI's BPE).

    The model's ``config.text.pool`` says where it pools; ``config.tokenizer`` becomes ``"tokenizer.json"``, so
    ``model.save`` writes the files and a reload finds them."""
    from .layouts.base import CheckpointError  # not the package: it imports the native layout, which imports CLIP

    cfg = model.config
    named = cfg.tokenizer.endswith(".json")  # a native config that recorded its tokenizer file
    path = Path(directory) / (cfg.tokenizer if named else TOKENIZER_FILE)
    if not path.is_file():
        if named:
            raise CheckpointError(f"{directory}: the config's tokenizer is {cfg.tokenizer!r}, but that file is "
                                  "missing; copy it back, or set config.tokenizer to 'openai-clip-bpe'")
        return None
    try:
        tok = CheckpointTokenizer.from_file(path, context_length=cfg.text.context_length, pool=cfg.text.pool)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    if tok.vocab_size > cfg.text.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the text tower embeds "
                              f"{cfg.text.vocab_size}; this tokenizer.json is not the model's")
    if cfg.text.pool == "eot" and tok.eot_id != cfg.text.eot_token_id:
        raise CheckpointError(f"{path}: the tokenizer ends texts with id {tok.eot_id}, but the text tower pools at id "
                              f"{cfg.text.eot_token_id} (config text.eot_token_id); this tokenizer.json is not the "
                              "model's")
    cfg.tokenizer = TOKENIZER_FILE  # what model.save records (in place: the config object the model holds)
    model.checkpoint_tokenizer = tok
    model.__dict__.pop("tokenizer", None)  # rebuilt from the checkpoint's tokenizer at the model's context length
    return tok
