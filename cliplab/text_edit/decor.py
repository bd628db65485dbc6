"""DECOR: project text embeddings onto the orthogonal complement of unwanted concept vectors.

Paper: *DECOR: Decomposition and Projection of Text Embeddings for Text-to-Image Customization*, Geonhui Jang,
Jin-Hwa Kim, Yong-Hyun Park, Junho Kim, Gayoung Lee, Yonghyun Jeong (NAVER AI Lab / Korea Univ. / SNU;
arXiv 2412.09169). No official code was available to check; the formula is the paper's:

    X' = X - alpha * X P,    P = V V^T,   V = top-r right singular vectors of the unwanted embeddings X~

with ``X`` the text-encoder output (per-token sequence ``[L, d]``, or here also pooled ``[B, d]``), ``alpha`` in
``[0, 1]`` (1 = the full orthogonal projection) and ``X~`` the encoder's embedding of the undesired token(s).

What is implemented:

* :func:`concept_basis` / :func:`projector`: ``V`` (orthonormal columns ``[d, r]``) and ``P = V V^T`` from the rows of
  ``X~`` (SVD, no centring, as in the paper).
* :func:`decor_project` (pure): ``X' = X - alpha X P`` for any ``[..., d]`` tensor, computed in float64 and cast back.
* :func:`decor_intervention`: the same edit as an ``Intervention`` at a conditioning site of ``cliplab.tokens``
  (``text.tokens`` by default), so it composes with other interventions and the pooled output is read from the edited
  sequence (at ``text.tokens`` the pooled embedding is the EOT row of the per-token outputs, and the projection acts
  row by row, so projecting the sequence and reading the EOT row equals projecting the pooled embedding).
* :func:`concept_vectors` and :func:`remove_concepts`: encode the concepts, build ``V``, encode the texts with the
  projection applied; pooled features by default, the per-token sequence with ``output="tokens"``.

Choices (where the notes, the paper and this library differ):

* *Space* (``space=``; see :data:`cliplab.tokens.CONDITIONING_SPACES`). The paper edits the T2I conditioning
  sequence: SD 1.x's is the text encoder's last hidden states after the final LayerNorm, before the projection, 77
  rows including PAD (``space="final"``, the ``text.final`` site); SDXL's the penultimate layer's states without the
  final LayerNorm (``space="penultimate"``, ``text.layer[-2].resid``). The unwanted vectors are read in the same
  space as the edit. The default ``space="joint"`` acts on cliplab's per-token outputs after the text projection and
  on the pooled embedding: what cliplab's own consumers read, not what a T2I model reads; the orthogonal projection
  does not commute with the (non-orthogonal) text projection, so the spaces give different edits. At ``final`` the
  pooled output is the projection of the edited EOT state; at ``penultimate`` the edit goes on through the last block
  into every later state and the pooled output. ``keep_padding=True`` gives all context rows as in the paper.
* *The unwanted vectors X~.* ``source="pooled"``: one vector per concept, its pooled (EOT) embedding, the default for
  pooled outputs. ``source="tokens"``: the per-token outputs of the concept's content tokens (SOT, EOT and padding
  excluded), the default for ``output="tokens"``: the SOT output is the same for every text (causal attention), so
  projecting it out would damage every prompt. ``rank=None`` keeps every direction of ``X~`` above numerical noise.
* *Rank larger than X~ has.* Directions with (numerically) zero singular value are never used: they are arbitrary.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..methods import register_method
from ..models.tokenizer import TokenizedBatch
from ..tokens import Intervention, InterventionSet, as_batch, space_output, space_site, space_tokens

register_method(
    "decor",
    "DECOR: Decomposition and Projection of Text Embeddings for Text-to-Image Customization",
    "project text embeddings (pooled or per-token) onto the orthogonal complement of unwanted concept vectors",
    doc="docs/methods/decor.md",
)(__name__)

__all__ = ["concept_basis", "projector", "decor_project", "decor_intervention", "concept_vectors",
           "remove_concepts"]


def _as_rows(unwanted: torch.Tensor) -> torch.Tensor:
    if unwanted.dim() == 1:
        return unwanted.unsqueeze(0)
    if unwanted.dim() != 2:
        raise ValueError(f"unwanted vectors must be [k, d] (or [d]), got shape {tuple(unwanted.shape)}")
    return unwanted


def concept_basis(unwanted: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """Orthonormal basis ``V`` ``[d, r]`` (float64): the top-``rank`` right singular vectors of ``unwanted`` ``[k, d]``.

    ``rank=None`` keeps every direction whose singular value is above numerical noise
    (``s > s_max * max(k, d) * eps`` of the input dtype); a larger ``rank`` is capped there."""
    rows = _as_rows(unwanted).detach()
    if rank is not None and rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    _, s, vh = torch.linalg.svd(rows.double(), full_matrices=False)
    eps = torch.finfo(rows.dtype).eps if rows.dtype.is_floating_point else torch.finfo(torch.float32).eps
    tol = (s.max() if s.numel() else 0.0) * max(rows.shape) * eps
    r = int((s > tol).sum())
    if rank is not None:
        r = min(r, rank)
    return vh[:r].T.contiguous()


def projector(unwanted: torch.Tensor, rank: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``P = V V^T`` ``[d, d]``: the orthogonal projector onto the span of the unwanted vectors (top-``rank``)."""
    v = concept_basis(unwanted, rank)
    return (v @ v.T).to(dtype or torch.float64)


def decor_project(x: torch.Tensor, unwanted: torch.Tensor | None = None, alpha: float = 1.0,
                  rank: int | None = None, *, basis: torch.Tensor | None = None) -> torch.Tensor:
    """``X' = X - alpha X V V^T`` for ``x`` ``[..., d]`` (per-token ``[L, d]`` / ``[B, L, d]`` or pooled ``[B, d]``).

    ``unwanted`` ``[k, d]``: the undesired embeddings (or pass a precomputed orthonormal ``basis`` ``[d, r]``).
    ``alpha=1`` removes the span completely (``X' V = 0``), ``alpha=0`` is the identity. Differentiable in ``x``."""
    if basis is None:
        if unwanted is None:
            raise ValueError("pass the unwanted vectors (or a basis)")
        basis = concept_basis(unwanted, rank)
    v = basis.to(device=x.device, dtype=torch.float64)
    if x.shape[-1] != v.shape[0]:
        raise ValueError(f"x has dimension {x.shape[-1]}, the unwanted vectors {v.shape[0]}")
    xd = x.double()
    return (xd - alpha * ((xd @ v) @ v.T)).to(x.dtype)


def decor_intervention(unwanted: torch.Tensor | None = None, alpha: float = 1.0, rank: int | None = None, *,
                       basis: torch.Tensor | None = None, space: str = "joint") -> Intervention:
    """DECOR as an intervention on the text tower's per-token states in ``space`` (site ``text.tokens``,
    ``text.final`` or ``text.penultimate``; the basis must be of that space): the pooled embedding is read from the
    projected sequence. Use with ``cliplab.tokens.intervene(model, ...)`` or ``hooks=``."""
    v = basis if basis is not None else concept_basis(unwanted, rank)
    return Intervention(space_site(space), lambda t: decor_project(t, alpha=alpha, basis=v))


def concept_vectors(model, concepts: str | Sequence[str], source: str = "pooled", space: str = "joint") -> torch.Tensor:
    """Embeddings of the unwanted concepts ``[k, dim]`` in ``space``: pooled (the EOT row, one per concept; for
    ``"joint"`` the pooled embedding) or the content tokens' states."""
    concepts = [concepts] if isinstance(concepts, str) else list(concepts)
    if source not in ("pooled", "tokens"):
        raise ValueError(f"source must be 'pooled' or 'tokens', got {source!r}")
    batch = model.tokenize(concepts)
    if source == "pooled" and space == "joint":
        return model.encode_text(batch)
    out = model.encode_text(batch, output=space_output(space))
    seq = space_tokens(out, space)
    if source == "pooled":
        return seq[torch.arange(len(concepts)), out.pool_index]
    rows = [seq[i, 1: int(out.pool_index[i])] for i in range(len(concepts))]
    if any(r.shape[0] == 0 for r in rows):
        raise ValueError(f"a concept has no content tokens: {concepts}")
    return torch.cat(rows)


def remove_concepts(model, texts: str | Sequence[str] | TokenizedBatch, concepts: str | Sequence[str],
                    alpha: float = 1.0, rank: int | None = None, *, output: str | None = None,
                    source: str | None = None, normalize: bool = False, keep_padding: bool = False,
                    space: str = "joint"):
    """Encode ``texts`` with the unwanted ``concepts`` projected out (DECOR) of the per-token states in ``space``
    (``"joint"``, ``"final"``, ``"penultimate"``; the concepts are read in the same space).

    Returns pooled features ``[B, D]`` (the joint embedding computed from the edited states, normalised after the
    projection with ``normalize``), or with ``output="tokens"`` a :class:`~cliplab.models.hooks.TowerOutput` whose
    sequence of the space (``cliplab.tokens.space_tokens(out, space)``: ``tokens`` for ``"joint"``, ``final``,
    ``penultimate``) is the projected one and ``pooled`` the edited EOT embedding; ``extras["decor_basis"]`` holds
    ``V``, ``extras["space"]`` the space. ``source`` picks the unwanted vectors (see the module docstring; default
    ``"pooled"`` for pooled output, ``"tokens"`` for ``output="tokens"``)."""
    if output not in (None, "tokens"):
        raise ValueError(f"output must be None or 'tokens', got {output!r}")
    source = source or ("pooled" if output is None else "tokens")
    basis = concept_basis(concept_vectors(model, concepts, source, space=space), rank)
    batch = as_batch(model, texts)
    hooks = InterventionSet([decor_intervention(alpha=alpha, basis=basis, space=space)])
    want = False if output is None else ("tokens", space_output(space))
    out = model.encode_text(batch, normalize=normalize, output=want, hooks=hooks, keep_padding=keep_padding)
    if output is None:
        return out.pooled
    out.extras.update(decor_basis=basis, space=space)
    return out
