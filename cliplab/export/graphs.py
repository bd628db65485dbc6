"""The two towers as plain ``nn.Module`` graphs with fixed tensor signatures, ready for an ONNX exporter.

The image graph is the vision tower's own forward pass. The text graph is the text tower's ``forward_padded``:
its eager ``forward`` cuts the batch to the longest EOT with ``int(eot.max())``, a data-dependent shape that an
exporter would freeze (TorchScript) or refuse (dynamo). The exported graph instead runs on whatever length it is
given, which is exact for any amount of zero padding after EOT (causal attention: nothing after a row's EOT can
reach it). Callers that want the compute saving cut the padding before calling (:mod:`.runtime` does).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models import CLIP
from ..models.config import ModelConfig

IMAGE_INPUT, IMAGE_OUTPUT = "pixel_values", "image_features"
TEXT_INPUT, TEXT_OUTPUT = "input_ids", "text_features"


class ImageGraph(nn.Module):
    """``pixel_values [B, 3, S, S]`` float32 -> ``image_features [B, embed_dim]`` (unnormalised)."""

    def __init__(self, model: CLIP):
        super().__init__()
        self.visual = model.visual

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual(pixel_values)


class TextGraph(nn.Module):
    """``input_ids [B, L]`` int64 (zeros after EOT) -> ``text_features [B, embed_dim]`` (unnormalised).

    Pools at the first ``eot_token_id`` of each row (rows without one: the largest id, as OpenAI's code does), with
    the causal mask built inside the graph for the given ``L`` (``TextTower.forward_padded``).
    """

    def __init__(self, model: CLIP):
        super().__init__()
        self.text = model.text

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text.forward_padded(input_ids)


def build_graph(model: CLIP, tower: str) -> nn.Module:
    """The export graph of ``tower`` (``"image"`` or ``"text"``), sharing ``model``'s parameters."""
    if tower == "image":
        return ImageGraph(model)
    if tower == "text":
        return TextGraph(model)
    raise ValueError(f"unknown tower {tower!r}; expected 'image' or 'text'")


def example_input(config: ModelConfig, tower: str) -> torch.Tensor:
    """A small example input for tracing. Batch 2 and a text length of 7 are sizes no weight dimension has, so the
    exporter cannot mistake a dynamic axis for a fixed one."""
    if tower == "image":
        s = config.vision.image_size
        return torch.zeros(2, 3, s, s)
    length = min(7, config.text.context_length)
    ids = torch.ones(2, length, dtype=torch.long)
    ids[:, -1] = config.text.eot_token_id
    return ids
