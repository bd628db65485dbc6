"""LinCIR-style projection phi: a joint-space embedding -> one pseudo-word in the text tower's input embeddings.

Paper: G. Gu, S. Chun, W. Kim, Y. Kang, S. Yun, "Language-only Training of Zero-shot Composed Image Retrieval"
(LinCIR, CVPR 2024; official code navervision/lincir). phi is the projection that projection-based zero-shot CIR
methods (LinCIR, SEARLE, Pic2Word) put in front of a frozen CLIP text tower, and that RTD (:mod:`cliplab.cir.rtd`)
keeps frozen. It is trained **text-only** (Self-Masking Projection):

* a caption ``c`` is encoded by the frozen text tower: ``e = E_T(c)`` (the pooled, projected feature, not
  normalised, as the code's ``text_embeds``);
* noise is added, ``e + s * u * n`` with ``u ~ U(0, 1)`` per sample and ``n ~ N(0, I)`` (``noise_scale`` ``s``: the
  code's 1.0 for LinCIR, 0.5 in RTD's code), so that phi also accepts image embeddings (the modality gap);
* the keywords of ``c`` (runs of adjectives and nouns, DET included; the code finds them with spaCy) are replaced by
  the placeholder ``$``, every one by the same pseudo-word ``phi(e + noise)``;
* loss: ``MSE(E_T(masked c with $ = phi(...)), e)``; only phi is trained.

At inference the reference image's embedding ``E_I(x)`` goes through phi into a template such as
``"a photo of $ that {modification}"`` (:func:`composed_queries`).

Where it acts: phi's output replaces the input token embedding of every ``$`` position, *before* the positional
embedding is added (site ``text.input`` of :mod:`cliplab.tokens`); nothing else of the forward pass changes, so the
other positions are bit-identical to a plain forward pass with the same ids.

Choices that differ from the official code, and why:

* keywords are the maximal runs of the synthetic world's closed vocabulary (sizes, colours, textures, shapes, their
  plurals, count words and articles, as spaCy's DET) instead of spaCy's part-of-speech tags: no spaCy here, and on the synthetic
  grammar the runs are exactly its noun phrases ("a large red circle"). A caption without a keyword falls back to
  ``"a photo of $"`` as in the code.
* ``l2_normalize`` defaults to on (an option of the official code, off there by default): the evaluation cache gives
  normalised image features, and the image and text features of ``shapes-tiny`` have different norms (~10.5 vs ~12).
* no EMA of phi's weights, no LR warm-up/scheduler (short CPU runs); AdamW as in the code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..tokens import Intervention, as_hooks

__all__ = ["PLACEHOLDER", "Phi", "placeholder_id", "placeholder_mask", "encode_with_pseudo_words", "keyword_runs",
           "mask_keywords", "train_phi", "composed_queries", "DEFAULT_TEMPLATE", "lincir_noise"]

PLACEHOLDER = "$"
DEFAULT_TEMPLATE = "a photo of $ that {}"


class Phi(nn.Module):
    """SEARLE/LinCIR's phi: ``Linear(D, 4D) - GELU - Dropout - Linear(4D, 4D) - GELU - Dropout - Linear(4D, W)``
    from the joint space (``D = embed_dim``) to the text tower's token-embedding width ``W``."""

    def __init__(self, input_dim: int, output_dim: int, hidden_dim: int | None = None, dropout: float = 0.5,
                 l2_normalize: bool = True):
        super().__init__()
        hidden = hidden_dim or 4 * input_dim
        self.l2_normalize = l2_normalize  # the code's --l2_normalize: inputs (after noise) to the unit sphere
        self.config = {"input_dim": input_dim, "output_dim": output_dim, "hidden_dim": hidden, "dropout": dropout,
                       "l2_normalize": l2_normalize}
        self.layers = nn.Sequential(nn.Linear(input_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                    nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout),
                                    nn.Linear(hidden, output_dim))

    @classmethod
    def for_model(cls, model, **kwargs) -> "Phi":
        return cls(model.config.embed_dim, model.config.text.width, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(F.normalize(x, dim=-1) if self.l2_normalize else x)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        torch.save({"config": self.config, "state_dict": self.state_dict()}, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Phi":
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
        phi = cls(**blob["config"])
        phi.load_state_dict(blob["state_dict"])
        return phi.eval()


# --- pseudo-word injection ----------------------------------------------------------------------------------------
def placeholder_id(model, placeholder: str = PLACEHOLDER) -> int:
    """The token id of ``placeholder``; it must be one token of the model's tokenizer."""
    batch = model.tokenize([placeholder])
    n = int(batch.lengths[0])
    if n != 3:  # SOT, the token, EOT
        raise ValueError(f"placeholder {placeholder!r} is {n - 2} tokens for this tokenizer; pick a one-token one")
    return int(batch.ids[0, 1])


def placeholder_mask(model, batch, placeholder: str = PLACEHOLDER) -> torch.Tensor:
    """Bool mask ``[B, n]`` of the placeholder tokens, ``n`` the width ``encode_text`` cuts the batch to; every row
    must hold at least one placeholder."""
    width = int(batch.lengths.max())
    mask = batch.ids[:, :width] == placeholder_id(model, placeholder)
    missing = (~mask.any(1)).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"texts {missing} hold no placeholder {placeholder!r}: "
                         f"e.g. {batch.texts[missing[0]]!r}")
    return mask


def encode_with_pseudo_words(model, texts: Sequence[str], words: torch.Tensor, placeholder: str = PLACEHOLDER,
                             normalize: bool = False) -> torch.Tensor:
    """Pooled text features ``[B, D]`` of ``texts`` with every ``placeholder`` token's input embedding replaced by
    that row's pseudo-word ``words[row]`` (``[B, W]``), through the token layer (site ``text.input``).
    Differentiable in ``words`` and in the model's text tower."""
    texts = list(texts)
    if words.shape[0] != len(texts):
        raise ValueError(f"{words.shape[0]} pseudo-words for {len(texts)} texts")
    batch = model.tokenize(texts)
    mask = placeholder_mask(model, batch, placeholder)
    row_of = mask.nonzero()[:, 0]  # x[mask] lists the selected positions row by row
    iv = Intervention("text.input", lambda selected: words[row_of.to(words.device)].to(selected.dtype),
                      positions=mask)
    out = model.encode_text(batch, hooks=as_hooks(model, iv))
    return F.normalize(out.pooled, dim=-1) if normalize else out.pooled


# --- keywords (self-masking) ---------------------------------------------------------------------------------------
_DETERMINERS = frozenset({"a", "an", "the", "one", "two", "three", "four", "five"})


def _default_vocabulary() -> frozenset[str]:
    from ..data.synthetic import COLOURS, SHAPES, SIZES, TEXTURES

    return frozenset([*COLOURS, *SIZES, *TEXTURES, *SHAPES, *(s + "s" for s in SHAPES), *_DETERMINERS])


def keyword_runs(caption: str, vocabulary: Sequence[str] | None = None) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the maximal runs of vocabulary words in ``caption`` (default: the
    synthetic world's sizes, colours, textures, shapes, plurals, counts and articles); runs made only of
    determiners/counts are dropped."""
    vocab = _default_vocabulary() if vocabulary is None else frozenset(w.lower() for w in vocabulary)
    words = [(m.start(), m.end(), m.group().lower()) for m in re.finditer(r"[A-Za-z]+", caption)]
    runs, current = [], []
    for i, (s, e, w) in enumerate(words):
        contiguous = current and caption[current[-1][1]:s].strip() == ""
        if w in vocab and (not current or contiguous):
            current.append((s, e, w))
            continue
        runs.append(current)
        current = [(s, e, w)] if w in vocab else []
    runs.append(current)
    return [(r[0][0], r[-1][1]) for r in runs if r and any(w not in _DETERMINERS for _, _, w in r)]


def mask_keywords(caption: str, vocabulary: Sequence[str] | None = None, placeholder: str = PLACEHOLDER) -> str:
    """``caption`` with every keyword run replaced by ``placeholder`` (LinCIR's self-masking); ``"a photo of $"``
    when it has no keyword."""
    runs = keyword_runs(caption, vocabulary)
    if not runs:
        return f"a photo of {placeholder}"
    out, last = [], 0
    for s, e in runs:
        out += [caption[last:s], placeholder]
        last = e
    out.append(caption[last:])
    return "".join(out)


def lincir_noise(features: torch.Tensor, noise_scale: float, generator: torch.Generator | None = None):
    """``features + noise_scale * u * n``: ``u ~ U(0, 1)`` per row, ``n ~ N(0, I)`` (LinCIR / RTD code)."""
    if noise_scale == 0:
        return features
    u = torch.rand(features.shape[0], 1, generator=generator, device=features.device)
    n = torch.randn(features.shape, generator=generator, device=features.device)
    return features + noise_scale * u * n


# --- training -----------------------------------------------------------------------------------------------------
def train_phi(model, captions: Sequence[str], *, steps: int = 300, batch_size: int = 64, lr: float = 1e-3,
              weight_decay: float = 0.01, noise_scale: float = 1.0, dropout: float = 0.5,
              hidden_dim: int | None = None, l2_normalize: bool = True, vocabulary: Sequence[str] | None = None,
              seed: int = 0, phi: Phi | None = None) -> Phi:
    """Text-only Self-Masking Projection training of phi on ``captions`` with ``model``'s frozen text tower.
    Returns phi in eval mode; ``model`` is not changed (its parameters get no gradient)."""
    captions = list(captions)
    if not captions:
        raise ValueError("train_phi needs captions")
    gen = torch.Generator().manual_seed(seed)
    masked = [mask_keywords(c, vocabulary) for c in captions]
    with torch.no_grad():
        targets = model.encode_texts(captions)
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        with torch.random.fork_rng(devices=[]):  # phi's init and dropout are seeded; the global stream is untouched
            torch.manual_seed(seed)
            if phi is None:
                phi = Phi.for_model(model, hidden_dim=hidden_dim, dropout=dropout, l2_normalize=l2_normalize)
            _fit_phi(model, phi, masked, targets, steps, batch_size, lr, weight_decay, noise_scale, gen)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return phi.eval()


def _fit_phi(model, phi, masked, targets, steps, batch_size, lr, weight_decay, noise_scale, gen) -> None:
    opt = torch.optim.AdamW(phi.parameters(), lr=lr, weight_decay=weight_decay)
    phi.train()
    for _ in range(steps):
        idx = torch.randint(len(masked), (min(batch_size, len(masked)),), generator=gen)
        e = targets[idx]
        words = phi(lincir_noise(e, noise_scale, gen))
        pred = encode_with_pseudo_words(model, [masked[i] for i in idx.tolist()], words)
        loss = F.mse_loss(pred.float(), e)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)  # leave no gradients on phi


def composed_queries(text_model, phi: Phi, reference_features: torch.Tensor, modifications: Sequence[str],
                     template: str = DEFAULT_TEMPLATE, placeholder: str = PLACEHOLDER,
                     batch_size: int = 256) -> torch.Tensor:
    """Normalised composed-query features ``[Q, D]``: ``text_model`` on ``template.format(m)`` with ``$`` =
    ``phi(reference_features[q])`` (LinCIR / RTD inference; ``reference_features`` are the reference images'
    joint-space features, normalised or not when phi normalises its input, as by default)."""
    if placeholder not in template.format(""):
        raise ValueError(f"template {template!r} must hold the placeholder {placeholder!r}")
    mods = list(modifications)
    if reference_features.shape[0] != len(mods):
        raise ValueError(f"{reference_features.shape[0]} reference features for {len(mods)} modifications")
    out = []
    with torch.no_grad():
        was = phi.training
        phi.eval()
        for s in range(0, len(mods), batch_size):
            words = phi(reference_features[s: s + batch_size].float())
            texts = [template.format(m) for m in mods[s: s + batch_size]]
            out.append(encode_with_pseudo_words(text_model, texts, words, placeholder, normalize=True))
        phi.train(was)
    return torch.cat(out) if out else torch.empty(0, text_model.config.embed_dim)
