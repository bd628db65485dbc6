"""Small decoder language models on real captions, and bits-per-byte: what ``ltok``, ``zett`` and ``lexinvariant_lm``
share (issue 26).

* **Corpus.** :func:`load_caption_splits` reads the 40,455 Flickr8k captions (``../shared/data/flickr8k-1k``), splits
  them by *image* (all five captions of a held-out image are held out, so no paraphrase of a test caption is trained
  on) and normalises each caption with :func:`normalize_text` (lower case, single spaces: the CLIP BPE lower-cases,
  so every tokenisation is scored on the same text).
* **Tokenisations** (:class:`Codec`): :class:`ByteCodec` (UTF-8 bytes), :class:`CompactCLIPCodec` (OpenAI CLIP's
  BPE, its 49,408-row vocabulary cut to the tokens the training captions use plus the 512 byte tokens, so a tiny LM
  does not spend its parameters on rows it never sees; an unseen BPE token is spelled with byte tokens, so the
  encoding stays lossless) and :class:`HFCodec` (a ``tokenizers`` tokenizer, e.g. a BPE trained on the captions with
  :func:`train_bpe_codec`). Every sequence is ``[BOS] tokens [EOS]``. :func:`bpe_decompose` spells a string in a
  BPE vocabulary (ZeTT's decomposition of a new token into the old tokenizer's pieces).
* **Model.** :func:`tiny_lm` builds cliplab's own Llama-style decoder (:class:`~cliplab.models.lm.LlamaDecoder`:
  RMSNorm, rotary positions, SwiGLU, tied input/output embeddings) at a chosen size; :func:`config_for_params`
  picks the width that brings a model closest to a parameter budget (equal-parameter comparisons).
* **Loss and training.** :func:`next_token_nll` is the summed next-token loss of right-padded rows, optionally with
  an embedding table given from outside (``[V, W]`` for all rows or ``[B, V, W]`` per row: ZeTT's predicted
  embeddings, the lexinvariant LM's random ones), used for the input and, tied, for the output logits.
  :func:`train_lm` trains with :func:`cliplab.text.training.fit` on seeded random batches.
* **Bits per byte.** :func:`bits_per_byte` = total negative log-likelihood in nats / ln 2 / UTF-8 bytes of the texts.
  It compares models with different tokenisations: every model pays for all of a text (and its end), and the
  denominator is the same text. :func:`evaluate_bpb` runs it for a token LM and a codec.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

from ..models.lm import LlamaConfig, LlamaDecoder

__all__ = [
    "ByteCodec", "CaptionSplit", "Codec", "CompactCLIPCodec", "HFCodec", "bits_per_byte", "bpe_decompose",
    "caption_path", "get_lm_method", "list_lm_methods", "register_lm_method", "clip_bpe_ids", "clip_surface", "clip_vocabulary", "config_for_params", "count_params", "encode_rows", "evaluate_bpb", "load_caption_splits",
    "next_token_nll", "normalize_text", "pack_stream", "pad_rows", "tiny_lm", "tiny_lm_config", "train_bpe_codec",
    "train_lm",
]


# --- corpus --------------------------------------------------------------------------------------------------------
def caption_path() -> Path:
    """``../shared/data/flickr8k-1k/all_captions.csv`` beside the project root (may not exist in a fresh clone)."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "flickr8k-1k" / "all_captions.csv"


def normalize_text(text: str) -> str:
    """Lower case with single spaces: the text every tokenisation is scored on (CLIP's BPE lower-cases)."""
    return " ".join(text.lower().split())


@dataclass
class CaptionSplit:
    train: list[str]
    held_out: list[str]


def load_caption_splits(path: str | Path | None = None, *, held_out_images: int = 500, seed: int = 0,
                        max_images: int | None = None) -> CaptionSplit:
    """Flickr8k captions split by image (module docstring). ``max_images`` keeps a seeded subset of the images first
    (for quick runs); ``held_out_images`` of them are held out."""
    from ..eval.paraphrase import read_caption_groups, split_groups

    path = Path(path) if path is not None else caption_path()
    if not path.is_file():
        raise FileNotFoundError(f"no caption table at {path} (the Flickr8k captions of ../shared/data)")
    groups = read_caption_groups(path, min_captions=1)
    if max_images is not None:
        keep = sorted(random.Random(seed).sample(range(len(groups)), min(max_images, len(groups))))
        groups = [groups[i] for i in keep]
    train, held = split_groups(groups, held_out=held_out_images, seed=seed)
    flat = lambda gs: [normalize_text(c) for _, caps in gs for c in caps if c.strip()]  # noqa: E731
    return CaptionSplit(flat(train), flat(held))


# --- tokenisations -------------------------------------------------------------------------------------------------
class Codec(Protocol):
    """A tokenisation for a token LM: ``encode(text) -> ids`` (no specials), ``vocab_size`` (specials included),
    ``bos_id``, ``eos_id``, ``pad_id`` and ``name``."""

    name: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...


class ByteCodec:
    """UTF-8 bytes: ids 0..255, then BOS 256, EOS 257, PAD 258."""

    name = "bytes"
    bos_id, eos_id, pad_id, vocab_size = 256, 257, 258, 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def clip_vocabulary() -> list[str]:
    """OpenAI CLIP's 49,408 token strings (byte-to-unicode symbols, ``</w>`` on word-final tokens) in id order, built
    from the public merge table (:func:`cliplab.models.tokenizer.load_merges`)."""
    from ..models.tokenizer import bytes_to_unicode, load_merges

    base = list(bytes_to_unicode().values())
    return base + [b + "</w>" for b in base] + ["".join(m) for m in load_merges()] + ["<|startoftext|>",
                                                                                       "<|endoftext|>"]


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    from ..models.tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def clip_surface(token: str) -> tuple[bytes, bool]:
    """``(bytes, word_final)`` of a CLIP token string (byte-to-unicode symbols, ``</w>`` when word-final)."""
    decoder = _byte_decoder()
    final = token.endswith("</w>")
    return bytes(decoder[c] for c in token.removesuffix("</w>")), final


_CLIP_TABLES: dict = {}


def clip_bpe_ids(surface: bytes | str, word_final: bool, *, spell: bool = False) -> list[int]:
    """CLIP ids of ``surface`` (raw bytes, or an already byte-encoded CLIP string when ``str``) run through CLIP's BPE
    merges, ``</w>`` on the last symbol when ``word_final`` (a word-internal piece gets no end mark); ``spell`` skips
    the merges (one id per byte). Unlike :class:`~cliplab.models.tokenizer.CLIPTokenizer` it takes any piece, not
    whole pre-tokens."""
    from ..models.tokenizer import bytes_to_unicode, load_merges

    if not _CLIP_TABLES:
        tokens = clip_vocabulary()
        _CLIP_TABLES.update(vocab={t: i for i, t in enumerate(tokens)}, encoder=bytes_to_unicode(),
                            ranks={m: i for i, m in enumerate(load_merges())})
    enc = _CLIP_TABLES["encoder"]
    text = surface if isinstance(surface, str) else "".join(enc[b] for b in surface)
    if not text:
        return []
    token = text + ("</w>" if word_final else "")
    if spell:
        symbols = list(text)
        if word_final:
            symbols[-1] += "</w>"
        return [_CLIP_TABLES["vocab"][s] for s in symbols]
    return bpe_decompose(token, _CLIP_TABLES["vocab"], _CLIP_TABLES["ranks"])


class CompactCLIPCodec:
    """CLIP's BPE on a vocabulary cut to the 512 byte tokens plus every token the ``texts`` use (module docstring).

    ``clip_ids[i]`` is the CLIP id of compact id ``i`` (the specials BOS, EOS, PAD come last and map to CLIP's
    start/end of text and its padding id 0). ``spelled`` counts tokens spelled with bytes because they were not in
    the cut vocabulary (held-out words)."""

    name = "clip-bpe"

    def __init__(self, texts: Sequence[str]):
        from ..models.tokenizer import CLIPTokenizer

        self.clip = CLIPTokenizer()
        self.tokens = clip_vocabulary()
        used = {i for t in texts for i in self.clip.encode(t)}
        self.clip_ids = sorted(set(range(512)) | used) + [49406, 49407, 0]
        self.index = {c: i for i, c in enumerate(self.clip_ids[:-3])}
        self.vocab_size = len(self.clip_ids)
        self.bos_id, self.eos_id, self.pad_id = self.vocab_size - 3, self.vocab_size - 2, self.vocab_size - 1
        self.token_to_clip = {s: i for i, s in enumerate(self.tokens)}
        self.spelled = 0

    def encode(self, text: str) -> list[int]:
        out = []
        for c in self.clip.encode(text):
            if c in self.index:
                out.append(self.index[c])
                continue
            self.spelled += 1
            s = self.tokens[c]
            final = s.endswith("</w>")
            symbols = list(s[:-4] if final else s)
            if final:
                symbols[-1] += "</w>"
            out.extend(self.index[self.token_to_clip[x]] for x in symbols)
        return out

    def token_strings(self) -> list[str | None]:
        """The BPE string of each compact id (byte-to-unicode symbols, ``</w>`` when word-final); None for specials."""
        return [self.tokens[c] for c in self.clip_ids[:-3]] + [None, None, None]

    def surfaces(self) -> list[tuple[bytes, bool] | None]:
        """``(bytes, word_final)`` of each id; None for the specials."""
        return [clip_surface(self.tokens[c]) for c in self.clip_ids[:-3]] + [None, None, None]

    def decompose(self, surface: bytes, word_final: bool) -> list[int]:
        """Compact ids of ``surface`` under CLIP's BPE (a CLIP token outside the cut vocabulary spelled in bytes)."""
        out = []
        for c in clip_bpe_ids(surface, word_final):
            if c in self.index:
                out.append(self.index[c])
            else:
                out.extend(self.index[i] for i in clip_bpe_ids(self.tokens[c].removesuffix("</w>"), False, spell=True))
        return out


class HFCodec:
    """A ``tokenizers.Tokenizer`` whose model is a BPE with ``</w>`` word ends (as :func:`train_bpe_codec` makes);
    specials ``[BOS]``, ``[EOS]``, ``[PAD]`` (and ``[UNK]``) are tokens of its vocabulary."""

    def __init__(self, tokenizer, name: str = "bpe"):
        self.tokenizer = tokenizer
        self.name = name
        self.vocab_size = tokenizer.get_vocab_size()
        self.bos_id, self.eos_id = tokenizer.token_to_id("[BOS]"), tokenizer.token_to_id("[EOS]")
        self.pad_id, self.unk_id = tokenizer.token_to_id("[PAD]"), tokenizer.token_to_id("[UNK]")
        if None in (self.bos_id, self.eos_id, self.pad_id):
            raise ValueError("the tokenizer needs [BOS], [EOS] and [PAD] tokens (make it with train_bpe_codec)")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def token_strings(self) -> list[str | None]:
        """Each id's string (``</w>`` when word-final), None for the specials."""
        specials = {self.bos_id, self.eos_id, self.pad_id, self.unk_id}
        return [None if i in specials else self.tokenizer.id_to_token(i) for i in range(self.vocab_size)]

    def surfaces(self) -> list[tuple[bytes, bool] | None]:
        """``(bytes, word_final)`` of each id; None for the specials."""
        return [None if s is None else (s.removesuffix("</w>").encode("utf-8"), s.endswith("</w>"))
                for s in self.token_strings()]

    def decompose(self, surface: bytes, word_final: bool) -> list[int]:
        """Ids of ``surface`` under this BPE's own merges (characters it lacks are skipped)."""
        if not hasattr(self, "_ranks"):
            import json

            merges = json.loads(self.tokenizer.to_str())["model"]["merges"]
            pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
            self._ranks = {p: i for i, p in enumerate(pairs)}
            self._vocab = self.tokenizer.get_vocab()
        text = surface.decode("utf-8", errors="ignore")
        return bpe_decompose(text + ("</w>" if word_final else ""), self._vocab, self._ranks)


def train_bpe_codec(texts: Sequence[str], vocab_size: int, *, name: str | None = None) -> HFCodec:
    """A BPE trained on ``texts`` with the ``tokenizers`` library: whitespace/punctuation pre-tokenisation, ``</w>``
    on word-final pieces (CLIP's convention, so its pieces decompose in CLIP's BPE), every character of the texts in
    the alphabet."""
    from ..models.lm.deps import require

    tk = require("tokenizers", "training a BPE tokenizer")
    tok = tk.Tokenizer(tk.models.BPE(unk_token="[UNK]", end_of_word_suffix="</w>"))
    tok.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    tok.decoder = tk.decoders.BPEDecoder(suffix="</w>")
    alphabet = sorted({ch for t in texts for ch in t if not ch.isspace()})
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"],
                                     initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    return HFCodec(tok, name or f"bpe-{vocab_size}")


def bpe_decompose(token: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int] | None = None) -> list[int]:
    """Ids of ``token`` (a string with ``</w>`` when word-final) spelled in another BPE vocabulary ``vocab``: merges
    by ``ranks`` when given (the true BPE of that vocabulary), else greedy longest match; a character missing from
    ``vocab`` is skipped (the caller sees fewer pieces)."""
    final = token.endswith("</w>")
    symbols = list(token[:-4] if final else token)
    if not symbols:
        return [vocab[token]] if token in vocab else []
    if final:
        symbols[-1] += "</w>"
    if ranks is not None:
        while len(symbols) > 1:
            pairs = [(ranks.get(p, math.inf), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
            rank, i = min(pairs)
            if rank == math.inf:
                break
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        return [vocab[s] for s in symbols if s in vocab]
    out, i = [], 0
    while i < len(symbols):
        for j in range(len(symbols), i, -1):
            piece = "".join(symbols[i:j])
            if piece in vocab:
                out.append(vocab[piece])
                i = j
                break
        else:
            i += 1
    return out


# --- model ---------------------------------------------------------------------------------------------------------
def tiny_lm_config(vocab_size: int, *, width: int = 128, layers: int = 4, head_dim: int = 32,
                   max_positions: int = 1024) -> LlamaConfig:
    """A small :class:`LlamaConfig`: ``width / head_dim`` heads (no grouping), SwiGLU of ``8/3 width`` (rounded to 32),
    tied embeddings."""
    if width % head_dim:
        raise ValueError(f"width {width} must be a multiple of head_dim {head_dim}")
    heads = width // head_dim
    mlp = max(32, int(round(8 * width / 3 / 32)) * 32)
    return LlamaConfig(vocab_size=vocab_size, width=width, layers=layers, heads=heads, kv_heads=heads,
                       head_dim=head_dim, mlp_dim=mlp, rope_theta=10000.0, max_positions=max_positions,
                       tie_embeddings=True)


def tiny_lm(vocab_size: int, *, seed: int = 0, **config) -> LlamaDecoder:
    """A freshly initialised (std 0.02, seeded) :class:`LlamaDecoder` of :func:`tiny_lm_config` ``(vocab_size,
    **config)``."""
    return LlamaDecoder(tiny_lm_config(vocab_size, **config)).init_weights(seed)


def count_params(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied table counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def config_for_params(vocab_size: int, target: int, *, layers: int = 4, head_dim: int = 32,
                      widths: Sequence[int] | None = None) -> int:
    """The width (a multiple of ``head_dim``) whose :func:`tiny_lm` of ``layers`` layers is closest to ``target``
    parameters, counted from the config without building the model."""
    def n_params(w: int) -> int:
        c = tiny_lm_config(vocab_size, width=w, layers=layers, head_dim=head_dim)
        block = w * (c.heads + 2 * c.kv_heads) * head_dim + c.heads * head_dim * w + 3 * w * c.mlp_dim + 2 * w
        return vocab_size * w + layers * block + w

    widths = widths or range(head_dim, 2049, head_dim)
    return min(widths, key=lambda w: abs(n_params(w) - target))


# --- batches, loss, training ---------------------------------------------------------------------------------------
def encode_rows(codec: Codec, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
    """``[BOS] codec.encode(text) [EOS]`` per text; rows longer than ``max_length`` are cut (keeping BOS)."""
    rows = [[codec.bos_id, *codec.encode(t), codec.eos_id] for t in texts]
    return [r[:max_length] for r in rows] if max_length else rows


def pack_stream(rows: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    """Rows concatenated into one stream and cut into ``[N, length]`` windows (the tail dropped)."""
    flat = [i for r in rows for i in r]
    n = len(flat) // length
    if n == 0:
        raise ValueError(f"{len(flat)} tokens make no window of {length}")
    return torch.tensor(flat[: n * length]).view(n, length)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, n], lengths [B])``, right-padded with ``pad_id``."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return ids, torch.tensor([len(r) for r in rows])


def next_token_nll(model: LlamaDecoder, ids: torch.Tensor, lengths: torch.Tensor | None = None, *,
                   embeddings: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """``(summed next-token NLL in nats, number of predicted tokens)`` of right-padded ``ids`` ``[B, n]``: position
    ``t`` predicts ``ids[:, t+1]`` for ``t + 1 < length``. ``embeddings`` (``[V, W]``, or ``[B, V, W]`` per row)
    replace the model's table at the input and, tied, at the output; by default the model's own table and head."""
    b, n = ids.shape
    lengths = torch.full((b,), n) if lengths is None else lengths
    if embeddings is None:
        states = model(ids).tokens
        logits = model.logits(states[:, :-1])
    else:
        if embeddings.dim() == 2:
            x = embeddings[ids]
            states = model(inputs_embeds=x).tokens
            logits = states[:, :-1].float() @ embeddings.float().T
        else:
            x = torch.gather(embeddings, 1, ids[..., None].expand(-1, -1, embeddings.shape[-1]))
            states = model(inputs_embeds=x).tokens
            logits = torch.einsum("bnw,bvw->bnv", states[:, :-1].float(), embeddings.float())
    targets = ids[:, 1:]
    valid = torch.arange(1, n)[None, :] < lengths[:, None]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (nll * valid.reshape(-1)).sum(), int(valid.sum())


def train_lm(model: LlamaDecoder, rows: Sequence[Sequence[int]], *, pad_id: int, steps: int, batch_size: int = 32,
             lr: float = 3e-3, warmup: int | None = None, weight_decay: float = 0.01, seed: int = 0,
             progress: bool | None = False, loss_fn: Callable | None = None, params=None):
    """Train a token LM on ``rows`` (from :func:`encode_rows`) with seeded random batches; the per-token mean of
    :func:`next_token_nll`, or ``loss_fn(model, ids, lengths) -> (summed nll, count)`` when given (e.g. a custom
    embedding provider). ``params``: what is trained (default: all of ``model``). Returns the
    :class:`~cliplab.text.training.FitResult`."""
    from ..text.training import fit

    if not rows:
        raise ValueError("no training rows")
    loss_fn = loss_fn or (lambda m, ids, lengths: next_token_nll(m, ids, lengths))
    gen = torch.Generator().manual_seed(seed)

    def step(i):
        pick = torch.randint(len(rows), (batch_size,), generator=gen).tolist()
        ids, lengths = pad_rows([rows[j] for j in pick], pad_id)
        total, count = loss_fn(model, ids, lengths)
        return total / max(count, 1), {}

    model.train()
    result = fit(params if params is not None else model.parameters(), step, steps=steps, lr=lr,
                 warmup=warmup if warmup is not None else max(1, steps // 20), weight_decay=weight_decay, seed=seed,
                 progress=progress, desc="lm")
    model.eval()
    return result


# --- bits per byte -------------------------------------------------------------------------------------------------
def bits_per_byte(nats: float, texts: Sequence[str]) -> float:
    """Total NLL ``nats`` over ``texts`` as bits per UTF-8 byte of the texts."""
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    if n_bytes == 0:
        raise ValueError("the texts have no bytes")
    return float(nats) / math.log(2) / n_bytes


@torch.no_grad()
def evaluate_bpb(model: LlamaDecoder, codec: Codec, texts: Sequence[str], *, batch_size: int = 64,
                 embeddings: torch.Tensor | None = None, max_length: int | None = None) -> dict:
    """Bits per byte of ``model`` on ``texts`` under ``codec`` (every token of ``[BOS] text [EOS]`` after BOS scored),
    with ``embeddings`` passed to :func:`next_token_nll`. Returns ``{"bpb", "nats", "tokens", "bytes"}``."""
    model.eval()
    rows = encode_rows(codec, texts, max_length)
    nats, tokens = 0.0, 0
    for i in range(0, len(rows), batch_size):
        ids, lengths = pad_rows(rows[i: i + batch_size], codec.pad_id)
        total, count = next_token_nll(model, ids, lengths, embeddings=embeddings)
        nats += float(total)
        tokens += count
    return {"bpb": bits_per_byte(nats, texts), "nats": nats, "tokens": tokens,
            "bytes": sum(len(t.encode("utf-8")) for t in texts)}


# --- the registry of LM methods (a ``cliplab textrep lm METHOD`` command can dispatch through it) --------------------
_LM_METHODS: dict[str, Callable] = {}


def register_lm_method(slug: str):
    """Decorator on a method module's ``run(train_texts, held_texts, *, steps, batch_size=None, lr=None, seed=0,
    progress=False) -> (summary dict, trained module)``: train on ``train_texts``, measure on ``held_texts``
    (bits per byte and the method's own numbers; ``None`` means the method's default)."""

    def register(fn):
        if slug in _LM_METHODS and _LM_METHODS[slug].__module__ != fn.__module__:
            raise ValueError(f"LM method {slug!r} registered twice")
        _LM_METHODS[slug] = fn
        return fn

    return register


def get_lm_method(slug: str) -> Callable:
    """The registered runner of ``slug`` (import ``cliplab.textrep``'s modules first:
    ``cliplab.methods.import_capability("textrep")``)."""
    if slug not in _LM_METHODS:
        raise KeyError(f"unknown LM method {slug!r} (known: {', '.join(sorted(_LM_METHODS)) or 'none'})")
    return _LM_METHODS[slug]


def list_lm_methods() -> list[str]:
    return sorted(_LM_METHODS)
