"""Continuous, subject-specific attribute control with token-level directions in the text encoder's output space.

Paper: *Continuous, Subject-Specific Attribute Control in T2I Models by Identifying Semantic Directions*,
S. A. Baumann, F. Krause, M. Neumayr, N. Stracke, M. Sevi, V. T. Hu, B. Ommer (CompVis, LMU Munich), arXiv 2403.17064
(CVPR 2025). Official code: ``CompVis/attribute-control`` (``learn_delta_naive_clip.py``, ``prompt_utils.py``).

What is implemented: the paper's optimisation-free ("naive CLIP") direction (Eq. 2) and its application.

* **Direction.** For every prefix and every pair ``(positive, negative)`` (e.g. ``("old man", "young man")``) the
  prompts ``f"{prefix} {positive}"`` and ``f"{prefix} {negative}"`` are encoded to per-token outputs
  (``encode_text(..., output="tokens")``), the output of the *last token of the phrase* (the subject noun) is read in
  each, and ``delta = mean over (prefix, pair) [E(prefix+pos)[last pos token] - E(prefix+neg)[last neg token]]``.
* **Application.** ``tokens'[i] = tokens[i] + alpha * delta`` for every token ``i`` whose character span overlaps the
  subject, as an ``Intervention("text.tokens", ..., mode="add")`` with a bool position mask. SOT and EOT (empty
  spans) are never selected, so the **pooled (EOT) embedding is bit-identical** to the unedited one and every other
  token is untouched: the edit changes only what a token-consuming model (the T2I model's cross-attention) reads at
  the subject's tokens. ``alpha`` is continuous; several (subject, delta, alpha) edits compose with ``+``.

Choices (where the notes, the paper and this library differ):

* *Space.* The paper works on the T2I conditioning sequence, i.e. the text encoder's last hidden states after the
  final LayerNorm (SDXL: one delta per encoder). Here the per-token outputs are those states *after* the text
  projection (cliplab's joint space). The projection is linear, so the construction commutes with it: the delta found
  here is the projection of the paper's delta, and adding it here equals projecting the paper's edit.
* *Subject matching.* The official code builds a character mask from a regex over the prompt (``re.finditer``, every
  match) and takes every token whose characters intersect it. Here the subject is a literal phrase matched
  case-insensitively **on word boundaries** at every occurrence (or one chosen ``occurrence``), by the library's
  matcher (``TokenizedBatch.token_positions`` / ``cliplab.tokens.token_mask``, which match whole words): plain
  substring search would let ``"man"`` select the tokens of ``"woman"``, which breaks subject specificity in prompts
  like "a man and a woman". All sub-tokens of a multi-token word are selected; a subject that selects no token
  raises ``ValueError``.
* *Last token of the phrase.* As in the official code, the phrase is appended after the prefix with one space and its
  last token is the last token whose span overlaps the appended phrase (for an empty prefix the phrase alone is
  encoded).
* *Not implemented:* the learned variant (delta optimised through a diffusion model's noise prediction), which needs
  a text-to-image generator this library does not have.
"""

from __future__ import annotations

from itertools import product
from typing import Sequence

import torch

from ..methods import register_method
from ..models.hooks import TowerOutput
from ..models.tokenizer import TokenizedBatch
from ..tokens import Intervention, as_batch, intervene, token_mask

register_method(
    "attribute_control",
    "Continuous, Subject-Specific Attribute Control in T2I Models by Identifying Semantic Directions",
    "optimisation-free token-level attribute directions (prompt-pair differences) added to one subject's tokens",
    doc="docs/methods/attribute_control.md",
)(__name__)

__all__ = ["find_direction", "direction_intervention", "apply_direction"]


def _pair(p) -> tuple[str, str]:
    if isinstance(p, dict):
        return p["prompt_positive"], p["prompt_negative"]
    pos, neg = p
    return pos, neg


@torch.no_grad()
def find_direction(model, pairs: Sequence[tuple[str, str]], prefixes: Sequence[str] = ("",),
                   batch_size: int = 256, return_all: bool = False) -> torch.Tensor:
    """The naive-CLIP direction ``delta [D]``: the mean over ``prefixes x pairs`` of the difference between the
    per-token output at the last token of the positive phrase and that of the negative phrase (each phrase appended
    to the prefix with a space). ``pairs`` holds ``(positive, negative)`` tuples (or the official configs' dicts with
    ``prompt_positive`` / ``prompt_negative``). ``return_all`` gives the per-sample differences ``[P*Q, D]`` instead.
    """
    pairs = [_pair(p) for p in pairs]
    prefixes = list(prefixes)
    if not pairs or not prefixes:
        raise ValueError("need at least one pair and one prefix")
    texts, phrase_at = [], []
    for prefix, (pos, neg) in product(prefixes, pairs):
        for phrase in (pos, neg):
            phrase = phrase.strip()
            head = prefix.strip()
            text = f"{head} {phrase}" if head else phrase
            texts.append(text)
            phrase_at.append((len(text) - len(phrase), len(text)))
    reads = []
    for i in range(0, len(texts), batch_size):
        batch = model.tokenize(texts[i : i + batch_size])
        tokens = model.encode_text(batch, output="tokens").tokens
        for r in range(len(batch)):
            s, e = phrase_at[i + r]
            pos = batch.span_positions(r, s, e)
            if not pos:
                raise ValueError(f"no token of the phrase survives in {batch.texts[r]!r} (truncated?)")
            reads.append(tokens[r, pos[-1]])
    reads = torch.stack(reads)
    diffs = reads[0::2] - reads[1::2]
    return diffs if return_all else diffs.mean(0)


# --- applying it ----------------------------------------------------------------------------------------------------
def direction_intervention(batch: TokenizedBatch, subject: str | Sequence[str | None], delta: torch.Tensor,
                           alpha: float | Sequence[float] | torch.Tensor = 1.0, width: int | None = None,
                           occurrence: int | None = None) -> Intervention:
    """``Intervention("text.tokens", alpha*delta, positions=<subject mask>, mode="add")`` for ``batch``.

    ``alpha`` is one scale or one per row (a sweep in one batch). ``width`` must be the encoded sequence length:
    the default (longest row) matches ``encode_text(batch, ...)``; pass ``batch.ids.shape[1]`` with
    ``keep_padding=True``. Compose several edits with ``+`` and activate them with ``cliplab.tokens.intervene``."""
    mask = token_mask(batch, subject, width, occurrence=occurrence)
    delta = torch.as_tensor(delta)
    if delta.dim() != 1:
        raise ValueError(f"delta must be a vector [D], got shape {tuple(delta.shape)}")
    alpha_t = torch.as_tensor(alpha, dtype=delta.dtype)
    if alpha_t.dim() == 0:
        value = alpha_t * delta
    else:
        if alpha_t.shape != (len(batch),):
            raise ValueError(f"alpha must be a scalar or one value per row ({len(batch)}), got {tuple(alpha_t.shape)}")
        rows = mask.nonzero()[:, 0]  # row of every selected token, in the order x[mask] lists them
        value = alpha_t[rows, None] * delta
    return Intervention("text.tokens", value, positions=mask, mode="add")


def apply_direction(model, texts: str | Sequence[str] | TokenizedBatch, subject: str | Sequence[str | None],
                    delta: torch.Tensor, alpha: float | Sequence[float] | torch.Tensor = 1.0, *, output="tokens",
                    normalize: bool = False, occurrence: int | None = None) -> TowerOutput:
    """Encode ``texts`` with ``alpha * delta`` added to the output tokens of ``subject`` (see module docstring).

    Returns the :class:`TowerOutput` (``tokens`` = the edited conditioning sequence; ``pooled`` = the unedited EOT
    embedding, bit-identical to the plain encoding). Stacks on interventions already active on ``model``."""
    batch = as_batch(model, texts)
    iv = direction_intervention(batch, subject, delta, alpha, occurrence=occurrence)
    with intervene(model, iv):
        return model.encode_text(batch, normalize, output=output)
