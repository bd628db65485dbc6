"""Continuous, subject-specific attribute control with token-level directions in the text encoder's per-token states.

Paper: *Continuous, Subject-Specific Attribute Control in T2I Models by Identifying Semantic Directions*,
S. A. Baumann, F. Krause, M. Neumayr, N. Stracke, M. Sevi, V. T. Hu, B. Ommer (CompVis, LMU Munich), arXiv 2403.17064
(CVPR 2025). Official code: ``CompVis/attribute-control`` (``learn_delta_naive_clip.py``, ``prompt_utils.py``).

What is implemented: the paper's optimisation-free ("naive CLIP") direction (Eq. 2) and its application.

* **Direction.** For every prefix and every pair ``(positive, negative)`` (e.g. ``("old man", "young man")``) the
  prompts ``f"{prefix} {positive}"`` and ``f"{prefix} {negative}"`` are encoded to per-token outputs
  (``encode_text(..., output="tokens")``), the output of the *last token of the phrase* (the subject noun) is read in
  each, and ``delta = mean over (prefix, pair) [E(prefix+pos)[last pos token] - E(prefix+neg)[last neg token]]``.
* **Application.** ``tokens'[i] = tokens[i] + alpha * delta`` for every token ``i`` whose character span overlaps the
  subject, as an ``Intervention(<site of the space>, ..., mode="add")`` with a bool position mask. SOT and EOT (empty
  spans) are never selected; at the ``joint`` and ``final`` sites the **pooled (EOT) embedding is bit-identical** to
  the unedited one and every other token is untouched: the edit changes only what a token-consuming model (the T2I
  model's cross-attention) reads at the subject's tokens. ``alpha`` is continuous; several (subject, delta, alpha)
  edits compose with ``+``.

Choices (where the notes, the paper and this library differ):

* *Space* (``space=``, read and edited at the same site, see :data:`cliplab.tokens.CONDITIONING_SPACES`). The paper
  works on the T2I conditioning sequence: SD 1.x reads the text encoder's states after the final LayerNorm, before
  the projection (``space="final"``, the ``text.final`` site); SDXL the penultimate layer's states without the final
  LayerNorm (``space="penultimate"``, ``text.layer[-2].resid``; one delta per encoder there, one tower here). The
  default ``space="joint"`` reads and edits cliplab's per-token outputs *after* the text projection (what cliplab's
  own token-level consumers read, not what a T2I model reads). The projection is linear, so ``joint`` and ``final``
  agree: the joint delta is the projection of the final-space delta (``W delta``), and adding it equals projecting
  the final-space edit. The penultimate site is inside the residual stream: the edit there goes on through the last
  block, so it also moves the later tokens' states and the pooled embedding (causal attention: the tokens after the
  subject and EOT read it), whereas SDXL's pipeline reads its pooled vector separately.
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
* The learned variant (delta optimised through a generator's noise prediction) is
  :mod:`cliplab.text_edit.attribute_control_learned`, against :mod:`cliplab.generation` (same doc page, section
  "Learned directions").
"""

from __future__ import annotations

from itertools import product
from typing import Sequence

import torch

from ..methods import register_method
from ..models.hooks import TowerOutput
from ..models.tokenizer import TokenizedBatch
from ..tokens import Intervention, as_batch, intervene, space_output, space_site, space_tokens, token_mask

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
                   batch_size: int = 256, return_all: bool = False, space: str = "joint") -> torch.Tensor:
    """The naive-CLIP direction ``delta``: the mean over ``prefixes x pairs`` of the difference between the
    per-token state at the last token of the positive phrase and that of the negative phrase (each phrase appended
    to the prefix with a space), read in ``space`` (``"joint"`` ``[D]``, ``"final"`` or ``"penultimate"`` ``[W]``).
    ``pairs`` holds ``(positive, negative)`` tuples (or the official configs' dicts with ``prompt_positive`` /
    ``prompt_negative``). ``return_all`` gives the per-sample differences ``[P*Q, dim]`` instead.
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
        tokens = space_tokens(model.encode_text(batch, output=space_output(space)), space)
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
                           occurrence: int | None = None, space: str = "joint") -> Intervention:
    """``Intervention(space_site(space), alpha*delta, positions=<subject mask>, mode="add")`` for ``batch``: the
    site is ``text.tokens`` (``"joint"``), ``text.final`` or ``text.penultimate``; ``delta`` must be of that space.

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
    return Intervention(space_site(space), value, positions=mask, mode="add")


def apply_direction(model, texts: str | Sequence[str] | TokenizedBatch, subject: str | Sequence[str | None],
                    delta: torch.Tensor, alpha: float | Sequence[float] | torch.Tensor = 1.0, *, output=None,
                    normalize: bool = False, occurrence: int | None = None, space: str = "joint") -> TowerOutput:
    """Encode ``texts`` with ``alpha * delta`` added to the states of ``subject``'s tokens in ``space`` (see the
    module docstring).

    Returns the :class:`TowerOutput`: the edited sequence of the space is ``cliplab.tokens.space_tokens(out, space)``
    (``tokens`` for ``"joint"``, ``final``, ``penultimate``), recorded by default (``output=None``) with the joint
    ``tokens``; ``extras["space"]`` names it. ``pooled`` is the unedited EOT embedding, bit-identical to the plain
    encoding, for ``"joint"`` and ``"final"``. Stacks on interventions already active on ``model``."""
    batch = as_batch(model, texts)
    iv = direction_intervention(batch, subject, delta, alpha, occurrence=occurrence, space=space)
    if output is None:
        output = ("tokens", space_output(space))
    with intervene(model, iv):
        out = model.encode_text(batch, normalize, output=output)
    out.extras["space"] = space
    return out
