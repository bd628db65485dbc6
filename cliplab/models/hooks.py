"""Hook points of the token-level ("rich") forward pass, and its structured outputs.

The plain ``encode_text`` / ``encode_image`` path never touches this module. When a caller asks for per-token
outputs, hidden states or attention maps, or passes :class:`Hooks`, the towers run :func:`run_blocks` instead, which
calls the hooks at named sites. ``cliplab.tokens`` builds interventions on this protocol; the base class is a no-op,
and a no-op hook set reproduces the plain forward pass bit-exactly.

Sites (``tower`` is ``"text"`` or ``"image"``, ``layer`` counts blocks from 0):

========================  =====================================================================================
``input(tower, x)``        token embeddings before positions are added: text ``[B, L, W]``; image ``[B, 1+N, W]``
                           (CLS first, patch embeddings after)
``positions(tower, p)``    the positional table about to be added ``[L, W]``
``attn_bias(tower, l, n)`` an additive attention bias for layer ``l`` (broadcastable to ``[B, H, n, n]``) or None
``attn_probs(tower, l, a)``attention probabilities ``[B, H, n, n]`` of layer ``l``; called only where
                           ``edits_attn(tower, l)`` is true
``resid(tower, l, x)``     the residual stream after block ``l`` ``[B, n, W]``
``final(tower, x)``        text tower only: every token after the final LayerNorm, before the projection
                           ``[B, n, W]`` (the projection and pooling read these); called only where
                           ``edits_final(tower)`` is true
``tokens(tower, x)``       final per-token outputs in the joint space ``[B, n, D]`` (pooling reads these); called
                           only where ``edits_tokens(tower)`` is true
========================  =====================================================================================

Conditioning sites. Text-to-image models read the text tower's per-token states *before* the projection: Stable
Diffusion 1.x the ``final`` site (``ln_final``'s output), SDXL the penultimate stream (``resid`` after block
``L-2``, Hugging Face's ``hidden_states[-2]``, without the final LayerNorm). ``output="final"`` records the first
(:attr:`TowerOutput.final`), ``output="penultimate"`` the hidden states, of which :attr:`TowerOutput.penultimate`
is the second-to-last.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .transformer import attention, match_dtype


class Hooks:
    """No-op hook set. Subclasses override the sites they act on."""

    def bind(self, model) -> "Hooks":
        """Called with the model before a forward pass (e.g. to learn the number of blocks)."""
        return self

    def input(self, tower: str, x: torch.Tensor) -> torch.Tensor:
        return x

    def positions(self, tower: str, pos: torch.Tensor) -> torch.Tensor:
        return pos

    def attn_bias(self, tower: str, layer: int, n: int) -> torch.Tensor | None:
        return None

    def edits_attn(self, tower: str, layer: int) -> bool:
        return False

    def attn_probs(self, tower: str, layer: int, probs: torch.Tensor) -> torch.Tensor:
        return probs

    def resid(self, tower: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def edits_final(self, tower: str) -> bool:
        return False

    def final(self, tower: str, x: torch.Tensor) -> torch.Tensor:
        return x

    def edits_tokens(self, tower: str) -> bool:
        return False

    def tokens(self, tower: str, x: torch.Tensor) -> torch.Tensor:
        return x


NO_HOOKS = Hooks()

OUTPUT_FIELDS = frozenset({"tokens", "hidden", "attn", "final", "penultimate"})


def parse_output(output) -> frozenset[str]:
    """``True`` -> everything; a string or iterable of names from ``tokens``, ``hidden``, ``attn``, ``final``
    (text tower) and ``penultimate`` (records ``hidden``, of which it is the second-to-last)."""
    if output is True:
        return OUTPUT_FIELDS
    if not output:
        return frozenset()
    names = frozenset([output] if isinstance(output, str) else output)
    unknown = names - OUTPUT_FIELDS
    if unknown:
        raise ValueError(f"unknown output fields {sorted(unknown)}; choose from {sorted(OUTPUT_FIELDS)}")
    return names | {"hidden"} if "penultimate" in names else names


@dataclass
class TowerOutput:
    """What a tower computed for a batch.

    * ``pooled`` ``[B, D]``: the embedding ``encode_*`` returns (EOT token for text, CLS for images), projected;
    * ``tokens`` ``[B, n, D]``: every token through the final LayerNorm and projection (joint space);
    * ``hidden``: ``layers + 1`` tensors ``[B, n, W]``, the stream entering block 0, then after each block;
    * ``attn``: ``layers`` tensors ``[B, H, n, n]`` of attention probabilities (in the autograd graph when
      gradients are enabled, so ``torch.autograd.grad(score, out.attn)`` works);
    * ``pool_index`` ``[B]``: the pooled position (EOT for text, 0 for images);
    * ``final`` ``[B, n, W]`` (text tower, ``output="final"``): every token after the final LayerNorm, before the
      projection (Stable Diffusion 1.x's conditioning); ``tokens`` is its projection;
    * :attr:`penultimate` ``[B, n, W]`` (``output="penultimate"``): ``hidden[-2]``, the stream after block ``L-2``
      without the final LayerNorm (SDXL's conditioning).
    """

    pooled: torch.Tensor
    pool_index: torch.Tensor
    tokens: torch.Tensor | None = None
    hidden: list[torch.Tensor] | None = None
    attn: list[torch.Tensor] | None = None
    extras: dict = field(default_factory=dict)
    final: torch.Tensor | None = None

    @property
    def penultimate(self) -> torch.Tensor | None:
        """The stream after block ``L-2`` (``hidden[-2]``), or None when the hidden states were not recorded."""
        return None if self.hidden is None else self.hidden[-2]

    def normalized(self) -> torch.Tensor:
        return F.normalize(self.pooled, dim=-1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, tower: str, layer: int,
           hooks: Hooks, record: bool, causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of one layer with its hook sites: ``q, k, v`` ``[B, H, n, d]`` -> (output ``[B, H, n, d]``,
    probabilities ``[B, H, n, m]`` or None). Shared by every architecture's rich path (CLIP towers, BERT, Llama).

    ``causal`` without a mask asks for a causal mask; it is made explicit only when the probabilities are needed or
    a bias is added, so the plain case keeps the fused kernel."""
    bias = hooks.attn_bias(tower, layer, q.shape[-2])
    if bias is not None and k.shape[-2] != q.shape[-2]:
        raise ValueError(f"{tower}.layer[{layer}].attn_bias: an attention bias needs the whole sequence in one pass, "
                         "not queries against a key-value cache")
    edits = hooks.edits_attn(tower, layer)
    if causal and mask is None and (bias is not None or record or edits):
        n, m = q.shape[-2], k.shape[-2]
        mask = torch.full((n, m), float("-inf"), dtype=q.dtype, device=q.device).triu_(m - n + 1)
        causal = False
    if bias is not None:
        mask = bias if mask is None else mask + bias
    mask = match_dtype(mask, q)
    if not (record or edits):
        return attention(q, k, v, mask, causal), None
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores + mask
    probs = scores.softmax(-1)
    new = hooks.attn_probs(tower, layer, probs) if edits else probs
    if new is probs and not torch.is_grad_enabled():
        # reading only: the fused kernel gives the output, so it stays bit-identical to the plain path
        y = attention(q, k, v, mask)
    else:
        y = new @ v  # the probabilities are in the graph: gradients w.r.t. attention maps flow
    return y, new


def _attend(block_attn, x: torch.Tensor, mask: torch.Tensor | None, tower: str, layer: int, hooks: Hooks,
            record: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    y, probs = attend(*block_attn.split_heads(x), mask, tower, layer, hooks, record)
    return block_attn.merge_heads(y), probs


def loop_blocks(blocks, x: torch.Tensor, tower: str, hooks: Hooks, want: frozenset[str],
                step) -> tuple[torch.Tensor, list | None, list | None]:
    """The rich path's block loop, for any architecture: ``step(block, x, layer, record) -> (x, probs)`` runs one
    block; the ``resid`` hook follows each. Returns ``(x, hidden, attn)``, the lists only when ``want`` asks."""
    hidden = [x] if "hidden" in want else None
    attn = [] if "attn" in want else None
    for layer, block in enumerate(blocks):
        x, probs = step(block, x, layer, attn is not None)
        x = hooks.resid(tower, layer, x)
        if hidden is not None:
            hidden.append(x)
        if attn is not None:
            attn.append(probs)
    return x, hidden, attn


def run_blocks(transformer, x: torch.Tensor, mask: torch.Tensor | None, tower: str, hooks: Hooks,
               want: frozenset[str]) -> tuple[torch.Tensor, list | None, list | None]:
    """The CLIP towers' block loop: the same arithmetic as ``Transformer.forward`` plus hook calls."""

    def step(block, x, layer, record):
        a, probs = _attend(block.attn, block.ln_1(x), mask, tower, layer, hooks, record)
        x = x + a
        return x + block.mlp(block.ln_2(x)), probs

    return loop_blocks(transformer.blocks, x, tower, hooks, want, step)
