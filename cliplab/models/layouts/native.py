"""cliplab's own layout: the names of :class:`cliplab.models.clip.CLIP`'s parameters, unchanged."""

from __future__ import annotations

import torch

from ..config import ModelConfig
from .base import Layout, Rule, register_layout


def native_keys(cfg: ModelConfig) -> list[str]:
    from ..clip import CLIP

    with torch.device("meta"):  # shapes only: no memory, no init cost
        return list(CLIP(cfg).state_dict())


@register_layout
class NativeLayout(Layout):
    name = "cliplab"
    has_conv_stem = True
    has_resnet = True

    def detect(self, state) -> bool:
        image = "visual.patch_embed.weight" in state or "visual.stem.conv1.weight" in state  # ViT or ResNet
        return image and "text.token_embed.weight" in state

    def rules(self, cfg: ModelConfig) -> list[Rule]:
        return [Rule(k, (k,)) for k in native_keys(cfg)]
