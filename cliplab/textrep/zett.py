"""ZeTT: zero-shot tokenizer transfer with a hypernetwork that predicts embeddings for a new tokenizer's tokens.

Paper: *Zero-Shot Tokenizer Transfer*, Benjamin Minixhofer, Edoardo Maria Ponti, Ivan Vulić (NeurIPS 2024; code
bminixhofer/zett, read to understand, not copied). The method:

1. **Decomposition** (:func:`decompose_vocabulary`): every token of the *new* tokenizer is spelled in the *original*
   tokenizer, at most ``max_pieces`` (7, the paper's ``hn_surface_maxlen``) pieces.
2. **Hypernetwork** (:class:`HyperNetwork`): the pieces' *original* embeddings, through an input projection, a small
   transformer encoder (no causal mask) and an output projection read at position 0, give the new token's
   embedding.
3. **Training** (:func:`train_hypernet`): the LM is frozen. Each step takes a tokenizer from a pool of sampled
   tokenizers, tokenizes a batch of text with it, predicts the embeddings of its whole vocabulary and scores the
   frozen LM with them (next-token loss; the LM's tied input/output table replaced by the prediction), plus the
   auxiliary loss: the mean squared error to the original embedding for tokens that both vocabularies share
   (weight ``aux_weight`` = 0.5, the paper's). The first ``warmup_steps`` are the **identity warm-up**: the
   hypernetwork learns to return each original token's embedding from the original token alone.
4. **Transfer**: :func:`predict_embeddings` for an unseen tokenizer; the LM then runs on it with no further training.
   The controls are random embeddings (:func:`random_embeddings`, the table's scale) and the mean of the pieces'
   embeddings (:func:`mean_of_pieces`, the common heuristic).

It also applies to a CLIP text tower (:func:`train_clip_hypernet`, :func:`encode_text_with_tokenizer`): the tower's
token table (``model.text.token_embed``, before the positional embeddings) is the original table and CLIP's BPE the
original tokenizer; the new tokenizer's embeddings enter ``encode_text(inputs_embeds=..., eot_index=...)``, with
CLIP's start/end-of-text embeddings around them.

Where it acts: the token-embedding table only (the LM's input and, tied, its output layer; CLIP's input table).

Choices that differ from the paper, and why:

* *Tokenizer sampling.* A fixed pool of BPE tokenizers (``tokenizers`` library, random vocabulary sizes, each trained
  on a random half of the training text) instead of a fresh noisy UnigramLM per batch: training a tokenizer per step
  costs more than the step on 2 CPU cores. The evaluation tokenizer is never in the pool.
* *Residual on the mean of pieces* (``residual=True``, the default): the hypernetwork's output is added to the
  mean of the pieces' original embeddings and its output layer starts at zero, so before training it *is* the
  mean-of-pieces heuristic (and the identity for a one-piece token), and training only learns a correction. The
  paper predicts the embedding outright and reaches the identity with a 10k-step warm-up; with the few hundred
  CPU steps here the plain form (``residual=False``, kept) would start from noise (in a first run, before the
  rescaler below, it gave features with cosine 0.18 to CLIP's own after 30 steps, against 0.98 for the mean of
  pieces).
* *Sizes.* A 2-layer hypernetwork of the LM's width (the paper: a RoBERTa-style network of hidden 768), a few
  hundred steps. The paper's rescaler is one scalar here: inputs are divided and outputs multiplied by the original
  table's standard deviation (CLIP's table is at about 0.01, the tiny LM's at about 0.02-0.1).
* *Special tokens* (BOS, EOS, PAD, UNK) take the original model's special embeddings (copied, not predicted).
* *CLIP tower objective.* A CLIP text tower has no LM head, so its hypernetwork is trained to make the pooled text
  feature through the new tokenizer match the feature through CLIP's own tokenizer (cosine distillation), with the
  same identity warm-up and auxiliary loss; the paper trains encoders with their MLM loss.

Public API: :class:`HyperNetwork`, :class:`Decomposition`, :func:`decompose_vocabulary`, :func:`identity_pieces`,
:func:`predict_embeddings`, :func:`mean_of_pieces`, :func:`random_embeddings`, :func:`sample_tokenizers`,
:func:`train_hypernet`, :func:`transfer_bpb`, :func:`clip_decomposition`, :func:`encode_text_with_tokenizer`,
:func:`train_clip_hypernet`, :func:`run` (train and measure; registered with
:func:`cliplab.textrep.lm_training.register_lm_method`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..methods import register_method
from .lm_training import (Codec, clip_bpe_ids, encode_rows, evaluate_bpb, next_token_nll, pad_rows,
                          register_lm_method, train_bpe_codec)

register_method(
    "zett",
    "Zero-Shot Tokenizer Transfer",
    "a hypernetwork predicts a new tokenizer's embeddings from each token's pieces in the original tokenizer "
    "(identity warm-up, then the frozen LM's loss over sampled tokenizers); also for CLIP's text tower",
    doc="docs/methods/zett.md",
)(__name__)

__all__ = ["Decomposition", "HyperNetwork", "clip_decomposition", "codec_decomposition", "decompose_vocabulary", "encode_text_with_tokenizer",
           "identity_pieces", "mean_of_pieces", "predict_embeddings", "random_embeddings", "run", "sample_tokenizers",
           "train_clip_hypernet", "train_hypernet", "transfer_bpb"]


@dataclass
class Decomposition:
    """A new vocabulary spelled in the original one: ``pieces`` ``[V, P]`` original ids (padded with 0), ``mask``
    ``[V, P]`` (True on real pieces; every row has at least one), ``copy`` ``{new id: original id}`` for the special
    tokens whose embedding is copied, ``shared`` ``[(new id, original id)]`` tokens with the same surface in both."""

    pieces: torch.Tensor
    mask: torch.Tensor
    copy: dict[int, int]
    shared: list[tuple[int, int]]

    def __len__(self) -> int:
        return self.pieces.shape[0]


def decompose_vocabulary(surfaces: Sequence[tuple[bytes, bool] | None], decompose: Callable[[bytes, bool], list[int]],
                         *, specials: dict[int, int], fallback: int, original_surfaces: dict | None = None,
                         max_pieces: int = 7) -> Decomposition:
    """Spell each new token ``surfaces[i]`` (``(bytes, word_final)``, None for a special) with ``decompose``, cut to
    ``max_pieces``. ``specials`` maps new special ids to the original ones (copied); a token with no piece gets
    ``[fallback]``. ``original_surfaces`` ``{(bytes, word_final): original id}`` finds the shared tokens."""
    rows, shared = [], []
    for i, s in enumerate(surfaces):
        if i in specials:
            rows.append([specials[i]])
            continue
        ids = decompose(*s)[:max_pieces] if s is not None else []
        rows.append(ids or [fallback])
        if original_surfaces is not None and s is not None and s in original_surfaces:
            shared.append((i, original_surfaces[s]))
    pieces = torch.zeros(len(rows), max_pieces, dtype=torch.long)
    mask = torch.zeros(len(rows), max_pieces, dtype=torch.bool)
    for i, r in enumerate(rows):
        pieces[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    return Decomposition(pieces, mask, dict(specials), shared)


def codec_decomposition(new: Codec, original: Codec, max_pieces: int = 7) -> Decomposition:
    """:func:`decompose_vocabulary` of codec ``new`` in codec ``original`` (both with ``surfaces()``, the original
    with ``decompose()``): BOS, EOS, PAD (and UNK, as PAD) copied."""
    specials = {new.bos_id: original.bos_id, new.eos_id: original.eos_id, new.pad_id: original.pad_id}
    if getattr(new, "unk_id", None) is not None:
        specials[new.unk_id] = original.pad_id
    orig = {s: i for i, s in enumerate(original.surfaces()) if s is not None}
    return decompose_vocabulary(new.surfaces(), original.decompose, specials=specials, fallback=original.pad_id,
                                original_surfaces=orig, max_pieces=max_pieces)


def identity_pieces(vocab_size: int, max_pieces: int = 7, ids: torch.Tensor | None = None) -> Decomposition:
    """The original vocabulary (or its ``ids``) spelled as itself, one piece per token: the identity warm-up's input."""
    ids = torch.arange(vocab_size) if ids is None else ids
    pieces = torch.zeros(len(ids), max_pieces, dtype=torch.long)
    pieces[:, 0] = ids
    mask = torch.zeros_like(pieces, dtype=torch.bool)
    mask[:, 0] = True
    return Decomposition(pieces, mask, {}, [])


class HyperNetwork(nn.Module):
    """Pieces' original embeddings ``[N, P, W]`` -> a new embedding ``[N, W]`` (module docstring, step 2)."""

    def __init__(self, width: int, *, hidden: int | None = None, layers: int = 2, heads: int = 4,
                 max_pieces: int = 7, residual: bool = True, seed: int = 0):
        super().__init__()
        hidden = hidden or width
        self.residual = residual
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.inp = nn.Linear(width, hidden)
            self.position = nn.Parameter(torch.randn(max_pieces, hidden) * 0.02)
            layer = nn.TransformerEncoderLayer(hidden, heads, 2 * hidden, dropout=0.0, batch_first=True,
                                               norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(hidden)
            self.out = nn.Linear(hidden, width)
            if residual:  # start exactly at the mean-of-pieces heuristic
                nn.init.zeros_(self.out.weight)
                nn.init.zeros_(self.out.bias)
        self.max_pieces = max_pieces

    def forward(self, table: torch.Tensor, pieces: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pieces_embedded = table[pieces]
        scale = table.detach().std()  # the rescaler: the network works in units of the table's spread
        x = self.inp(pieces_embedded / scale) + self.position[: pieces.shape[1]]
        h = self.encoder(x, src_key_padding_mask=~mask)
        out = self.out(self.norm(h[:, 0])) * scale
        if self.residual:
            m = mask.to(table.dtype)[..., None]
            out = out + (pieces_embedded * m).sum(1) / m.sum(1)
        return out


def predict_embeddings(hypernet: HyperNetwork, table: torch.Tensor, dec: Decomposition,
                       chunk: int = 4096) -> torch.Tensor:
    """``[V, W]`` embeddings of the new vocabulary of ``dec`` from the original ``table`` (specials copied)."""
    out = torch.cat([hypernet(table, dec.pieces[i: i + chunk], dec.mask[i: i + chunk])
                     for i in range(0, len(dec), chunk)])
    return _copy_specials(out, table, dec)


def _copy_specials(out: torch.Tensor, table: torch.Tensor, dec: Decomposition) -> torch.Tensor:
    if not dec.copy:
        return out
    new_ids = torch.tensor(list(dec.copy))
    out = out.clone()
    out[new_ids] = table[torch.tensor(list(dec.copy.values()))].to(out.dtype)
    return out


def mean_of_pieces(table: torch.Tensor, dec: Decomposition) -> torch.Tensor:
    """The heuristic control: each new token's embedding is the mean of its pieces' original embeddings."""
    m = dec.mask.to(table.dtype)[..., None]
    return _copy_specials((table[dec.pieces] * m).sum(1) / m.sum(1), table, dec)


def random_embeddings(table: torch.Tensor, dec: Decomposition, seed: int = 0) -> torch.Tensor:
    """The other control: ``N(mean, std)`` of the original table per dimension, seeded (specials copied)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(len(dec), table.shape[1], generator=g) * table.std(0) + table.mean(0)
    return _copy_specials(out.to(table.dtype), table, dec)


def sample_tokenizers(texts: Sequence[str], n: int, *, vocab_range: tuple[int, int] = (500, 4000),
                      exclude: Sequence[int] = (), seed: int = 0) -> list:
    """``n`` BPE codecs (:func:`~cliplab.textrep.lm_training.train_bpe_codec`), each on a random half of ``texts``
    with a random vocabulary size in ``vocab_range`` (sizes in ``exclude`` avoided): the training pool."""
    rng = random.Random(seed)
    pool = []
    for _ in range(n):
        size = rng.randint(*vocab_range)
        while size in exclude:
            size = rng.randint(*vocab_range)
        half = rng.sample(list(texts), max(1, len(texts) // 2))
        pool.append(train_bpe_codec(half, size, name=f"pool-bpe-{size}"))
    return pool


def _identity_loss(hypernet, table, n_tokens: int, gen: torch.Generator, max_pieces: int):
    ids = torch.randint(table.shape[0], (min(n_tokens, table.shape[0]),), generator=gen)
    pred = hypernet(table, *_pm(identity_pieces(table.shape[0], max_pieces, ids)))
    return F.mse_loss(pred, table[ids]) / table.pow(2).mean()


def _pm(dec: Decomposition):
    return dec.pieces, dec.mask


def _aux_loss(pred: torch.Tensor, table: torch.Tensor, dec: Decomposition) -> torch.Tensor:
    if not dec.shared:
        return pred.new_zeros(())
    new, old = torch.tensor(dec.shared).T
    return F.mse_loss(pred[new], table[old]) / table.pow(2).mean()


def train_hypernet(hypernet: HyperNetwork, lm, original: Codec, pool: Sequence[Codec], texts: Sequence[str], *,
                   steps: int, warmup_steps: int = 0, batch_size: int = 32, lr: float = 1e-3,
                   aux_weight: float = 0.5, identity_tokens: int = 1024, seed: int = 0,
                   progress: bool | None = False):
    """Train ``hypernet`` for the frozen token LM ``lm`` (a :class:`~cliplab.models.lm.LlamaDecoder` with tied
    embeddings over ``original``'s vocabulary): ``warmup_steps`` of identity warm-up, then the LM loss through
    tokenizers of ``pool`` in turn on random batches of ``texts`` plus ``aux_weight`` x the shared-token loss."""
    from ..text.training import fit

    for p in lm.parameters():
        p.requires_grad_(False)
    lm.eval()
    table = lm.token_embed.weight.detach()
    decs = [codec_decomposition(c, original, hypernet.max_pieces) for c in pool]
    gen = torch.Generator().manual_seed(seed)

    def step(i):
        if i < warmup_steps:
            loss = _identity_loss(hypernet, table, identity_tokens, gen, hypernet.max_pieces)
            return loss, {"identity": float(loss.detach())}
        k = (i - warmup_steps) % len(pool)
        codec, dec = pool[k], decs[k]
        pick = torch.randint(len(texts), (batch_size,), generator=gen).tolist()
        ids, lengths = pad_rows(encode_rows(codec, [texts[j] for j in pick]), codec.pad_id)
        pred = predict_embeddings(hypernet, table, dec)
        total, count = next_token_nll(lm, ids, lengths, embeddings=pred)
        lm_loss = total / count
        aux = _aux_loss(pred, table, dec)
        return lm_loss + aux_weight * aux, {"lm": float(lm_loss.detach()), "aux": float(aux.detach())}

    hypernet.train()
    result = fit(hypernet.parameters(), step, steps=steps, lr=lr, warmup=max(1, steps // 20), weight_decay=0.01,
                 seed=seed, progress=progress, desc="zett")
    hypernet.eval()
    return result


@torch.no_grad()
def transfer_bpb(lm, original: Codec, new: Codec, texts: Sequence[str], *, hypernet: HyperNetwork | None = None,
                 seed: int = 0) -> dict:
    """Bits per byte of the frozen ``lm`` on ``texts`` through ``new`` with random, mean-of-pieces and (given
    ``hypernet``) predicted embeddings, and through ``original`` (the reference)."""
    table = lm.token_embed.weight.detach()
    dec = codec_decomposition(new, original, hypernet.max_pieces if hypernet is not None else 7)
    arms = {"random": random_embeddings(table, dec, seed), "mean_of_pieces": mean_of_pieces(table, dec)}
    if hypernet is not None:
        arms["hypernet"] = predict_embeddings(hypernet, table, dec)
    out = {name: evaluate_bpb(lm, new, texts, embeddings=e)["bpb"] for name, e in arms.items()}
    out["original_tokenizer"] = evaluate_bpb(lm, original, texts)["bpb"]
    return out


# --- CLIP text tower -------------------------------------------------------------------------------------------------
SOT_ID, EOT_ID = 49406, 49407


def clip_decomposition(new: Codec, max_pieces: int = 7) -> Decomposition:
    """``new`` spelled in OpenAI CLIP's BPE (full 49,408 ids): specials BOS/EOS -> start/end of text, PAD and UNK ->
    id 0 (CLIP's padding id)."""
    from .lm_training import clip_surface, clip_vocabulary

    specials = {new.bos_id: SOT_ID, new.eos_id: EOT_ID, new.pad_id: 0}
    if getattr(new, "unk_id", None) is not None:
        specials[new.unk_id] = 0
    orig = {clip_surface(t): i for i, t in enumerate(clip_vocabulary()[:SOT_ID])}
    return decompose_vocabulary(new.surfaces(), clip_bpe_ids, specials=specials, fallback=0,
                                original_surfaces=orig, max_pieces=max_pieces)


def encode_text_with_tokenizer(model, codec: Codec, embeddings: torch.Tensor, texts: Sequence[str], *,
                               normalize: bool = False) -> torch.Tensor:
    """CLIP text features ``[B, D]`` of ``texts`` tokenized by ``codec`` with ``embeddings`` ``[V, W]`` for its
    vocabulary: ``[BOS] tokens [EOS]`` (BOS/EOS carry CLIP's start/end embeddings when the embeddings were made
    with :func:`clip_decomposition`), pooled at EOS, through ``model.encode_text(inputs_embeds=..., eot_index=...)``."""
    limit = model.config.text.context_length
    rows = encode_rows(codec, texts)
    if max(len(r) for r in rows) > limit:
        raise ValueError(f"a text has more than {limit} tokens under {codec.name}; shorten it")
    ids, lengths = pad_rows(rows, codec.pad_id)
    out = model.encode_text(inputs_embeds=embeddings[ids], eot_index=lengths - 1, normalize=normalize)
    return out.pooled


def train_clip_hypernet(hypernet: HyperNetwork, model, pool: Sequence[Codec], texts: Sequence[str], *, steps: int,
                        warmup_steps: int = 0, batch_size: int = 32, lr: float = 1e-3, aux_weight: float = 0.5,
                        identity_tokens: int = 1024, seed: int = 0, progress: bool | None = False):
    """ZeTT for a frozen CLIP ``model``'s text tower: identity warm-up on the tokens the ``texts`` use under CLIP's
    tokenizer, then ``1 - cos`` between the features through a pool tokenizer (predicted embeddings) and through
    CLIP's own tokenizer, plus ``aux_weight`` x the shared-token loss."""
    from ..text.training import fit

    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    table = model.text.token_embed.weight.detach()
    decs = [clip_decomposition(c, hypernet.max_pieces) for c in pool]
    used = torch.tensor(sorted({i for t in texts for i in model.tokenizer.encode(t)}))
    gen = torch.Generator().manual_seed(seed)

    def step(i):
        if i < warmup_steps:
            ids = used[torch.randint(len(used), (min(identity_tokens, len(used)),), generator=gen)]
            pred = hypernet(table, *_pm(identity_pieces(table.shape[0], hypernet.max_pieces, ids)))
            loss = F.mse_loss(pred, table[ids]) / table[used].pow(2).mean()
            return loss, {"identity": float(loss.detach())}
        k = (i - warmup_steps) % len(pool)
        pick = [texts[j] for j in torch.randint(len(texts), (batch_size,), generator=gen).tolist()]
        pred = predict_embeddings(hypernet, table, decs[k])
        with torch.no_grad():
            target = model.encode_text(model.tokenizer(pick), normalize=True)
        feats = encode_text_with_tokenizer(model, pool[k], pred, pick, normalize=True)
        distill = (1 - (feats * target).sum(-1)).mean()
        aux = _aux_loss(pred, table, decs[k])
        return distill + aux_weight * aux, {"distill": float(distill.detach()), "aux": float(aux.detach())}

    hypernet.train()
    result = fit(hypernet.parameters(), step, steps=steps, lr=lr, warmup=max(1, steps // 20), weight_decay=0.01,
                 seed=seed, progress=progress, desc="zett-clip")
    hypernet.eval()
    return result


@register_lm_method("zett")
def run(train_texts: Sequence[str], held_texts: Sequence[str], *, steps: int, batch_size: int | None = None,
        lr: float | None = None, seed: int = 0, progress: bool | None = False, lm_steps: int | None = None,
        new_vocab: int = 2000, pool: int = 4):
    """Train a tiny CLIP-BPE LM on ``train_texts`` (``lm_steps``, default ``steps``), then a hypernetwork for
    ``steps`` over a pool of ``pool`` BPEs (a quarter of the steps identity warm-up), and measure held-out bits per
    byte through an unseen BPE of ``new_vocab`` tokens: random, mean of pieces, hypernetwork, original."""
    from .lm_training import CompactCLIPCodec, normalize_text, tiny_lm, train_lm

    train = [normalize_text(t) for t in train_texts]
    held = [normalize_text(t) for t in held_texts]
    original = CompactCLIPCodec(train)
    lm = tiny_lm(original.vocab_size, width=128, layers=4, seed=seed)
    train_lm(lm, encode_rows(original, train), pad_id=original.pad_id, steps=lm_steps or steps,
             batch_size=batch_size or 32, lr=3e-3, seed=seed, progress=progress)
    tokenizers = sample_tokenizers(train, pool, vocab_range=(500, 4000), exclude=(new_vocab,), seed=seed)
    hn = HyperNetwork(128, seed=seed)
    train_hypernet(hn, lm, original, tokenizers, train, steps=steps, warmup_steps=steps // 4,
                   batch_size=batch_size or 32, lr=lr or 1e-3, seed=seed, progress=progress)
    new = train_bpe_codec(train, new_vocab, name=f"unseen-bpe-{new_vocab}")
    return {"method": "zett", "steps": steps, "new_vocab": new.vocab_size,
            "bits_per_byte": transfer_bpb(lm, original, new, held, hypernet=hn, seed=seed)}, hn
