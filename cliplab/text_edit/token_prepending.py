"""Token Prepending (TP): let early tokens of a causal text transformer see the whole sentence, training-free.

Paper: *Token Prepending: A Training-Free Approach for Eliciting Better Sentence Embeddings from LLMs*, Yuchen Fu,
Zifeng Cheng, Zhiwei Jiang, Zhonghui Wang, Yafeng Yin, Zhengliang Li, Qing Gu (ACL 2025, arXiv 2412.11556).
Official code: ``fuyuchenIfyw/token_prepending`` (``senllm/modeling_llama.py``, ``plan == "tp"``).

The method: a placeholder token ``<PST>`` is placed before the sentence. Before every layer ``l`` in
``[start, exit)`` the hidden state at ``<PST>`` is overwritten with the hidden state at the sentence-embedding
position (the last token) of the previous layer's output, so that, under causal attention, the tokens after
``<PST>`` can attend to a summary of the whole sentence. Optionally the embedding is read at an intermediate layer
(*early exit*). No training, one extra token.

What is implemented:

* :class:`CausalTextModel`, a small protocol for any causal text transformer: ``embed(ids)`` (token embeddings,
  before positions), ``run(embeds, layer_hooks)`` (all hidden states; ``layer_hooks[l]`` edits the residual stream
  after block ``l``, i.e. before block ``l + 1``) and ``readout(h)`` (final norm + head). :func:`token_prepending` is
  written against it only, so a decoder LM can plug in later.
* :class:`CLIPText`, the protocol for CLIP's text tower, built on ``cliplab.tokens``: the slot enters through
  ``inputs_embeds`` and the overwrite is an ``Intervention`` at ``text.layer[l-1].resid`` for ``l`` in
  ``[start, exit)``; ``readout`` is ``ln_final`` + the text projection.
* :func:`encode_text_tp`, CLIP convenience: tokenize with one position left for the slot, insert ``<PST>`` right
  after SOT, summary position = EOT (shifted by one), pooled output = the projected EOT.

Choices (where the notes, the paper and this library differ):

* *The slot's input embedding.* The official code adds ``<PST>`` to the vocabulary (a new embedding row). Here it is a
  seeded random normal vector (:func:`pst_embedding`) scaled to the standard deviation of the model's token embedding
  table, passed through ``inputs_embeds``; pass ``slot=`` to use another vector. From ``start`` on it is overwritten,
  so it only affects layers ``< start``.
* *Layer convention.* As in the official loop: before block ``l`` (0-based) for ``start <= l < exit``, with the source
  being the current input of block ``l`` (the output of block ``l - 1``). ``start >= 1`` is required (before block 0
  there is no previous layer's sentence embedding). ``exit=None`` means every remaining block (the official default
  ``tp_exiting_index = 99``). ``start == exit`` is the vanilla forward with the slot present.
* *CLIP adaptation.* No PromptEOL prompt (CLIP is not a language model); ``<PST>`` follows SOT, and the summary
  position is EOT. Absolute positions shift by one after the slot (the official Llama setting shifts RoPE positions
  the same way, since ``<PST>`` is a real token of the prompt).
* *Early exit.* ``readout_layer=k`` reads the summary position of ``hidden[k]`` (the stream after ``k`` blocks;
  negative counts from the end) and applies ``readout`` (``ln_final`` + projection for CLIP), as the official code
  reads an intermediate layer's last-token state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch

from ..methods import register_method
from ..models.tokenizer import TokenizedBatch
from ..tokens import Intervention, InterventionSet

register_method(
    "token_prepending",
    "Token Prepending: A Training-Free Approach for Eliciting Better Sentence Embeddings from LLMs",
    "prepend a slot that carries the previous layer's sentence embedding (EOT) to causal text towers; early exit",
    doc="docs/methods/token_prepending.md",
)(__name__)

__all__ = ["CausalTextModel", "CLIPText", "TPOutput", "insert_slot", "token_prepending", "pst_embedding",
           "encode_text_tp"]

LayerHook = Callable[[torch.Tensor], torch.Tensor]


@runtime_checkable
class CausalTextModel(Protocol):
    """What Token Prepending needs from a causal text transformer."""

    n_layers: int

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, n]`` -> token embeddings ``[B, n, W]`` (before any positional information)."""

    def run(self, embeds: torch.Tensor, layer_hooks: Mapping[int, LayerHook]) -> list[torch.Tensor]:
        """Run every block on ``embeds`` ``[B, n, W]``; returns ``n_layers + 1`` hidden states (the stream entering
        block 0, then after each block). ``layer_hooks[l]`` maps the stream after block ``l`` to the stream that
        block ``l + 1`` reads (and that is reported as ``hidden[l + 1]``)."""

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """A hidden state ``[..., W]`` -> the embedding ``[..., D]`` (final norm and head / projection)."""


class CLIPText:
    """:class:`CausalTextModel` for a :class:`~cliplab.models.CLIP` text tower, via ``cliplab.tokens``."""

    def __init__(self, model):
        self.model = model
        self.n_layers = len(model.text.transformer.blocks)
        self.width = model.text.cfg.width

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.text.token_embed(ids.to(self.model.device))

    def run(self, embeds: torch.Tensor, layer_hooks: Mapping[int, LayerHook]) -> list[torch.Tensor]:
        ivs = [Intervention(f"text.layer[{layer}].resid", fn) for layer, fn in sorted(layer_hooks.items())]
        zeros = torch.zeros(embeds.shape[0], dtype=torch.long, device=embeds.device)  # pooling is not used here
        out = self.model.encode_text(inputs_embeds=embeds, eot_index=zeros, output="hidden",
                                     hooks=InterventionSet(ivs))
        return out.hidden

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.text.proj(self.model.text.ln_final(h))


@dataclass
class TPOutput:
    """``embedding`` ``[B, D]``: the readout of the summary position at ``readout_layer``; ``hidden``: the
    ``n_layers + 1`` streams ``[B, n + 1, W]`` (slot included); ``summary_index`` ``[B]`` and ``slot_index`` are
    positions in the sequence with the slot."""

    embedding: torch.Tensor
    hidden: list[torch.Tensor]
    summary_index: torch.Tensor
    slot_index: int
    readout_layer: int
    extras: dict = field(default_factory=dict)


def insert_slot(embeds: torch.Tensor, slot: torch.Tensor, slot_index: int = 1) -> torch.Tensor:
    """Insert the slot vector ``[W]`` (or ``[B, W]``) at ``slot_index`` of every row of ``embeds`` ``[B, n, W]``."""
    b, _, w = embeds.shape
    s = slot.to(device=embeds.device, dtype=embeds.dtype)
    s = s.expand(b, w) if s.dim() == 1 else s
    return torch.cat([embeds[:, :slot_index], s.unsqueeze(1), embeds[:, slot_index:]], dim=1)


def token_prepending(lm: CausalTextModel, embeds: torch.Tensor, summary_index: torch.Tensor, slot: torch.Tensor, *,
                     slot_index: int = 1, start: int = 1, exit: int | None = None,
                     readout_layer: int | None = None) -> TPOutput:
    """Token Prepending on any :class:`CausalTextModel`.

    ``embeds`` ``[B, n, W]``: token embeddings *without* the slot; ``summary_index`` ``[B]``: the sentence-embedding
    position in them (the last token; EOT for CLIP), at or after ``slot_index``. The slot is inserted at
    ``slot_index``; before block ``l`` for ``start <= l < exit`` its state is replaced by the summary position's.
    ``start == exit`` runs the vanilla forward with the slot present. ``readout_layer`` (default: the last) is the
    early-exit layer."""
    n_layers = lm.n_layers
    exit = n_layers if exit is None else exit
    if not 1 <= start <= exit <= n_layers:
        raise ValueError(f"need 1 <= start <= exit <= {n_layers} (blocks), got start={start}, exit={exit}")
    layer = n_layers if readout_layer is None else readout_layer
    layer = layer + n_layers + 1 if layer < 0 else layer
    if not 0 <= layer <= n_layers:
        raise ValueError(f"readout_layer {readout_layer} outside 0..{n_layers}")
    summary = summary_index.to(device=embeds.device, dtype=torch.long)
    if bool((summary < slot_index).any()):
        raise ValueError("the summary position must come at or after the slot")
    x = insert_slot(embeds, slot, slot_index)
    summary = summary + 1
    rows = torch.arange(x.shape[0], device=x.device)
    slot_pos = torch.tensor([slot_index], device=x.device)

    def overwrite(h: torch.Tensor) -> torch.Tensor:
        return h.index_copy(1, slot_pos, h[rows, summary].unsqueeze(1))

    hidden = lm.run(x, {l - 1: overwrite for l in range(start, exit)})
    embedding = lm.readout(hidden[layer][rows, summary])
    return TPOutput(embedding, hidden, summary, slot_index, layer)


def pst_embedding(model, seed: int = 0) -> torch.Tensor:
    """The ``<PST>`` input vector for a CLIP model: seeded normal, scaled to the token table's standard deviation."""
    table = model.text.token_embed.weight.detach()
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(table.shape[1], generator=g, dtype=torch.float32) * table.float().std()).to(table)


def encode_text_tp(model, texts: str | Sequence[str] | TokenizedBatch, *, start: int = 1, exit: int | None = None,
                   readout_layer: int | None = None, slot: torch.Tensor | None = None, seed: int = 0,
                   normalize: bool = False, output: bool = False):
    """CLIP text features with Token Prepending: ``[B, D]`` (normalised with ``normalize``), or the
    :class:`TPOutput` with ``output=True``. Texts are tokenized to ``context_length - 1`` (room for the slot)."""
    ctx = model.config.text.context_length
    if isinstance(texts, TokenizedBatch):
        batch = texts
    else:
        batch = model.tokenizer([texts] if isinstance(texts, str) else list(texts), context_length=ctx - 1)
    eot = batch.eot_index.to(model.device)
    if int(eot.max()) + 2 > ctx:
        raise ValueError(f"no room for the slot: a text uses {int(eot.max()) + 1} of {ctx} positions; tokenize to "
                         f"context_length={ctx - 1}")
    ids = batch.ids[:, : int(eot.max()) + 1].to(model.device)
    lm = CLIPText(model)
    slot = pst_embedding(model, seed) if slot is None else slot
    out = token_prepending(lm, lm.embed(ids), eot, slot, slot_index=1, start=start, exit=exit,
                           readout_layer=readout_layer)
    out.extras["batch"] = batch
    if normalize:
        out.embedding = torch.nn.functional.normalize(out.embedding, dim=-1)
    return out if output else out.embedding
