"""What the language models share: one tower named ``"text"`` for hook sets, their dtype, and their initialisation."""

from __future__ import annotations

import torch
from torch import nn

from ..hooks import NO_HOOKS, loop_blocks, parse_output

TOWER = "text"


class TextTransformer(nn.Module):
    """Base of :class:`~cliplab.models.lm.BertEncoder` and :class:`~cliplab.models.lm.LlamaDecoder` (each has
    ``blocks`` and ``token_embed``)."""

    blocks: nn.ModuleList
    token_embed: nn.Embedding

    def tower_layers(self) -> dict[str, int]:
        """Blocks per tower, for hook sets (``cliplab.tokens.InterventionSet.bind``)."""
        return {TOWER: len(self.blocks)}

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embed.weight.dtype

    def begin(self, ids, inputs_embeds, hooks, output):
        """The start of every forward pass: token embeddings (or the given ``inputs_embeds``), the bound hook set,
        and the parsed ``output`` request."""
        if inputs_embeds is None:
            if ids is None:
                raise ValueError("pass token ids or inputs_embeds")
            x = self.token_embed(ids)
        else:
            x = inputs_embeds.to(self.dtype)
        return x, (hooks or NO_HOOKS).bind(self), parse_output(output)

    def run_blocks(self, x: torch.Tensor, hooks, want: frozenset, **block_kw):
        """All blocks with their hook sites; returns ``(x, hidden, attn)`` (see :func:`~cliplab.models.hooks.loop_blocks`)."""

        def step(block, x, layer, record):
            return block(x, layer=layer, hooks=hooks, record=record, **block_kw)

        return loop_blocks(self.blocks, x, TOWER, hooks, want, step)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """BERT's and Llama's initialisation: weights normal with std 0.02, biases zero, norms at identity."""
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
        return self
