"""A small protocol for causal text transformers whose layers a method edits between blocks (Token Prepending, and
any method that rewrites the residual stream), with adapters for the CLIP text tower and the Llama decoder.

``embed(ids)`` gives token embeddings (before positions); ``run(embeds, layer_hooks)`` runs every block and returns
the ``n_layers + 1`` streams, where ``layer_hooks[l]`` maps the stream after block ``l`` to what block ``l + 1``
reads; ``readout(h, layer)`` turns the state ``h`` taken from ``hidden[layer]`` into the embedding. Both adapters are
built on ``cliplab.tokens`` interventions (``text.layer[l].resid``).
"""

from __future__ import annotations

from typing import Callable, Mapping, Protocol, runtime_checkable

import torch

from ..tokens import Intervention, InterventionSet

LayerHook = Callable[[torch.Tensor], torch.Tensor]


@runtime_checkable
class CausalTextModel(Protocol):
    """What layer-editing methods need from a causal text transformer."""

    n_layers: int

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, n]`` -> token embeddings ``[B, n, W]`` (before any positional information)."""

    def run(self, embeds: torch.Tensor, layer_hooks: Mapping[int, LayerHook]) -> list[torch.Tensor]:
        """Run every block on ``embeds``; returns ``n_layers + 1`` hidden states (the stream entering block 0, then
        after each block). ``layer_hooks[l]`` maps the stream after block ``l`` to the stream that block ``l + 1``
        reads (and that is reported as ``hidden[l + 1]``)."""

    def readout(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """A state ``[..., W]`` taken from ``hidden[layer]`` -> the embedding ``[..., D]``."""


def _resid_hooks(layer_hooks: Mapping[int, LayerHook]) -> InterventionSet:
    return InterventionSet([Intervention(f"text.layer[{layer}].resid", fn) for layer, fn in sorted(layer_hooks.items())])


class CLIPText:
    """:class:`CausalTextModel` for a :class:`~cliplab.models.CLIP` text tower. ``readout`` applies ``ln_final``
    and the text projection at every layer (an early exit lands in the joint space)."""

    def __init__(self, model):
        self.model = model
        self.n_layers = len(model.text.transformer.blocks)
        self.width = model.text.cfg.width

    @property
    def token_table(self) -> torch.Tensor:
        return self.model.text.token_embed.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.text.token_embed(ids.to(self.model.device))

    def run(self, embeds: torch.Tensor, layer_hooks: Mapping[int, LayerHook]) -> list[torch.Tensor]:
        zeros = torch.zeros(embeds.shape[0], dtype=torch.long, device=embeds.device)  # pooling is not used here
        out = self.model.encode_text(inputs_embeds=embeds, eot_index=zeros, output="hidden",
                                     hooks=_resid_hooks(layer_hooks))
        return out.hidden

    def readout(self, h: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        return self.model.text.proj(self.model.text.ln_final(h))


class DecoderText:
    """:class:`CausalTextModel` for a :class:`~cliplab.models.lm.LlamaDecoder`. ``readout`` follows the hidden
    states of ``transformers`` (which Token Prepending's code reads): the last layer through the final RMSNorm,
    intermediate layers as they are."""

    def __init__(self, model):
        self.model = model
        self.n_layers = len(model.blocks)
        self.width = model.cfg.width

    @property
    def token_table(self) -> torch.Tensor:
        return self.model.token_embed.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.token_embed(ids)

    def run(self, embeds: torch.Tensor, layer_hooks: Mapping[int, LayerHook]) -> list[torch.Tensor]:
        return self.model(inputs_embeds=embeds, output="hidden", hooks=_resid_hooks(layer_hooks)).hidden

    def readout(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return self.model.norm(h) if layer == self.n_layers else h
