"""Lexinvariant language model: no fixed token embeddings; every sequence gets fresh random Gaussian embeddings.

Paper: *Lexinvariant Language Models*, Qian Huang, Eric Zelikman, Sarah Li Chen, Yuhuai Wu, Gregory Valiant, Percy
Liang (NeurIPS 2023). No official code is public. The method: for each sequence draw ``E ~ N(0, sigma^2)`` of shape
``[V, W]``; the input at position ``t`` is ``E[x_t]`` and the next-token logits are ``h_t . E^T`` with the same matrix,
so a token's identity carries no meaning except through its repetitions and co-occurrences in the context. The loss
is therefore invariant to any permutation of the vocabulary, in distribution over ``E`` (and exactly, for a fixed
``E`` permuted with the tokens: :func:`lexinvariant_nll` on ``pi(x)`` with ``E[pi^-1]`` equals it on ``x`` with
``E``), and the model must decipher the token identities in context: its perplexity falls with context length towards
a standard LM's, and it is unaffected by a per-sequence substitution cipher that defeats a standard LM.

Where it acts: the token layer, both ends: the input embeddings (before the first block) and the output layer (the
logits read the final states after the last RMSNorm against the same random table). The transformer is cliplab's
Llama-style decoder (:func:`cliplab.textrep.lm_training.tiny_lm`); its own token table is unused (size 1).

Choices (the paper's settings that differ, and why):

* *Scale of E.* ``sigma = 1 / sqrt(W)`` (unit-norm rows in expectation); the blocks' RMSNorm makes the input scale
  irrelevant, and the final norm's learned gain sets the output temperature.
* *Data and tokenisation.* Bytes of Flickr8k captions packed into windows of 256 (the paper uses subword tokens of
  The Pile / GitHub at 1-8k context and models of 150M+ parameters). Byte level keeps the vocabulary small (259), so
  a few hundred bytes of context are enough to decipher it, which a CPU run can train for.
* *Evaluation* averages over ``draws`` embedding samples (seeded), as the paper averages over samples of E.
* *Not implemented:* the paper's lexinvariance *regularisation* (mixing learned and random embeddings with a
  probability ``p``), and the synthetic in-context reasoning tasks.

Public API: :class:`LexinvariantLM` (``sample_embeddings``, ``nll``), :func:`lexinvariant_nll`,
:func:`train_lexinvariant`, :func:`cipher`, :func:`position_nll` (per-position loss of any ``nll_fn``), :func:`run`
(train and measure; registered with :func:`cliplab.textrep.lm_training.register_lm_method`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..methods import register_method
from ..models.lm import LlamaDecoder
from .lm_training import ByteCodec, count_params, encode_rows, next_token_nll, normalize_text, pack_stream, \
    register_lm_method, tiny_lm_config

register_method(
    "lexinvariant_lm",
    "Lexinvariant Language Models",
    "a decoder LM with no fixed token embeddings: each sequence gets fresh random Gaussian embeddings (input and "
    "output), so the model infers token identity from context; vocabulary-permutation invariant, cipher-proof",
    doc="docs/methods/lexinvariant_lm.md",
)(__name__)

__all__ = ["LexinvariantLM", "cipher", "lexinvariant_nll", "per_position", "position_nll", "run", "train_lexinvariant"]


class LexinvariantLM(nn.Module):
    """A decoder over ``vocab_size`` token ids with per-sequence random embeddings (module docstring)."""

    def __init__(self, vocab_size: int, *, width: int = 128, layers: int = 4, head_dim: int = 32,
                 max_positions: int = 1024, sigma: float | None = None, seed: int = 0):
        super().__init__()
        self.vocab_size = int(vocab_size)
        self.width = width
        self.sigma = float(sigma) if sigma is not None else width ** -0.5
        self.lm = LlamaDecoder(tiny_lm_config(1, width=width, layers=layers, head_dim=head_dim,
                                              max_positions=max_positions)).init_weights(seed)

    def sample_embeddings(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[batch, V, W]`` independent ``N(0, sigma^2)`` tables, one per sequence."""
        return torch.randn(batch, self.vocab_size, self.width, generator=generator) * self.sigma

    def nll(self, ids: torch.Tensor, lengths: torch.Tensor | None = None, *, embeddings: torch.Tensor | None = None,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """``(summed next-token NLL, count)`` of ``ids`` ``[B, n]`` with ``embeddings`` ``[B, V, W]`` (drawn from
        ``generator`` when None): :func:`cliplab.textrep.lm_training.next_token_nll` with a per-row table."""
        if embeddings is None:
            embeddings = self.sample_embeddings(ids.shape[0], generator)
        return next_token_nll(self.lm, ids, lengths, embeddings=embeddings)


def lexinvariant_nll(model: LexinvariantLM, ids: torch.Tensor, *, draws: int = 1, seed: int = 0) -> float:
    """Mean per-token NLL of ``ids`` ``[B, n]`` averaged over ``draws`` seeded embedding samples (no gradients)."""
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for _ in range(draws):
            s, c = model.nll(ids, generator=gen)
            total += float(s) / c
    return total / draws


def cipher(ids: torch.Tensor, n_symbols: int, *, seed: int = 0) -> torch.Tensor:
    """A random substitution per row: ids below ``n_symbols`` are permuted (a fresh permutation each row, seeded),
    ids at or above it (specials) are kept."""
    gen = torch.Generator().manual_seed(seed)
    out = ids.clone()
    for r in range(ids.shape[0]):
        perm = torch.randperm(n_symbols, generator=gen)
        row = ids[r]
        keep = row >= n_symbols
        out[r] = torch.where(keep, row, perm[row.clamp(max=n_symbols - 1)])
    return out


@torch.no_grad()
def position_nll(nll_fn: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor,
                 batch_size: int = 32) -> torch.Tensor:
    """``[n - 1]`` mean NLL of predicting position ``t + 1`` over ``windows`` ``[N, n]``; ``nll_fn(ids)`` returns
    per-position losses ``[B, n - 1]`` (e.g. from :func:`per_position`)."""
    parts = [nll_fn(windows[i: i + batch_size]) for i in range(0, len(windows), batch_size)]
    return torch.cat(parts).mean(0)


def per_position(model: nn.Module, ids: torch.Tensor, *, embeddings: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, n - 1]`` next-token NLL per position of a token LM (``model`` a :class:`LlamaDecoder`), or of a
    :class:`LexinvariantLM` with ``embeddings`` ``[B, V, W]`` (required for it)."""
    import torch.nn.functional as F

    if isinstance(model, LexinvariantLM):
        if embeddings is None:
            raise ValueError("a LexinvariantLM needs embeddings= (model.sample_embeddings)")
        x = torch.gather(embeddings, 1, ids[..., None].expand(-1, -1, embeddings.shape[-1]))
        states = model.lm(inputs_embeds=x).tokens[:, :-1]
        logits = torch.einsum("bnw,bvw->bnv", states.float(), embeddings.float())
    else:
        logits = model.logits(model(ids).tokens[:, :-1])
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")


def train_lexinvariant(model: LexinvariantLM, windows: torch.Tensor, *, steps: int, batch_size: int = 16,
                       lr: float = 3e-3, warmup: int | None = None, weight_decay: float = 0.01, seed: int = 0,
                       progress: bool | None = False):
    """Train on seeded random batches of ``windows`` ``[N, n]`` (e.g. :func:`cliplab.textrep.lm_training.pack_stream`),
    a fresh embedding draw per sequence and step."""
    from ..text.training import fit

    gen = torch.Generator().manual_seed(seed)

    def step(i):
        pick = torch.randint(len(windows), (batch_size,), generator=gen)
        total, count = model.nll(windows[pick], generator=gen)
        return total / count, {}

    model.train()
    result = fit(model.parameters(), step, steps=steps, lr=lr, warmup=warmup if warmup is not None else
                 max(1, steps // 20), weight_decay=weight_decay, seed=seed, progress=progress, desc="lexinvariant")
    model.eval()
    return result


@register_lm_method("lexinvariant_lm")
def run(train_texts: Sequence[str], held_texts: Sequence[str], *, steps: int, batch_size: int | None = None,
        lr: float | None = None, seed: int = 0, progress: bool | None = False, length: int = 256):
    """Train a byte-level :class:`LexinvariantLM` on ``train_texts`` packed into windows of ``length`` and measure
    held-out bits per byte on plain and on ciphered windows (2 embedding draws)."""
    import math

    codec = ByteCodec()
    train = pack_stream(encode_rows(codec, [normalize_text(t) for t in train_texts]), length)
    held = pack_stream(encode_rows(codec, [normalize_text(t) for t in held_texts]), length)
    model = LexinvariantLM(codec.vocab_size, seed=seed)
    fit = train_lexinvariant(model, train, steps=steps, batch_size=batch_size or 16, lr=lr or 3e-3, seed=seed,
                             progress=progress)
    bits = 1 / math.log(2)
    return {"method": "lexinvariant_lm", "params": count_params(model), "steps": steps, "final_loss": fit.losses[-1],
            "bits_per_byte_plain": lexinvariant_nll(model, held, draws=2, seed=seed) * bits,
            "bits_per_byte_cipher": lexinvariant_nll(model, cipher(held, 256, seed=seed + 1), draws=2, seed=seed) * bits,
            "windows": len(held)}, model
