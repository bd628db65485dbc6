"""Per-token text conditioning from a cliplab CLIP text tower, read where text-to-image models read it.

``space="final"`` is the sequence after the final LayerNorm, before the projection (Stable Diffusion 1.x);
``"penultimate"`` the stream after block ``L-2`` (SDXL); ``"joint"`` the projected tokens. Every position up to and
including EOT is kept (masked past it), as a UNet's cross-attention reads them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..tokens import as_batch, space_output, space_tokens
from .protocol import Conditioning

__all__ = ["TextConditioner"]


class TextConditioner:
    """``conditioner(texts) -> Conditioning`` from ``model``'s text tower (frozen, no gradients unless asked)."""

    def __init__(self, model, space: str = "final") -> None:
        self.model, self.space = model, space
        self._output = space_output(space)

    @property
    def dim(self) -> int:
        return self.model.config.embed_dim if self.space == "joint" else self.model.config.text.width

    def sequences(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens [B, n, D], lengths [B])`` for a tokenized batch, with gradients if enabled."""
        out = self.model.encode_text(batch, output=self._output)
        seq = space_tokens(out, self.space)
        return seq, batch.lengths.to(seq.device)

    def __call__(self, texts: str | Sequence[str], grad: bool = False) -> Conditioning:
        batch = as_batch(self.model, texts)
        with torch.set_grad_enabled(grad):
            seq, lengths = self.sequences(batch)
        mask = torch.arange(seq.shape[1], device=seq.device)[None] < lengths[:, None]
        return Conditioning(seq, mask)

    @classmethod
    def for_generator(cls, generator) -> "TextConditioner":
        """The conditioner a saved generator was trained with: the text model and space recorded in its ``info``
        (``text_model``, default shapes-tiny; ``space``, default final), loaded in fp32 eval mode."""
        from ..models import load

        info = getattr(generator, "info", {}) or {}
        return cls(load(info.get("text_model", "shapes-tiny")).float().eval(), space=info.get("space", "final"))

    def null(self, n: int = 1) -> Conditioning:
        """The empty prompt's conditioning (classifier-free guidance's unconditional branch), ``n`` rows."""
        return self([""] * n)
