"""Matmul FLOPs of a reduced ViT forward: the plain count with each block costed at the tokens it really sees."""

from __future__ import annotations

from collections.abc import Sequence

from ..models.config import ModelConfig
from ..models.flops import block_flops, image_flops


def reduced_image_flops(config: ModelConfig, tokens_per_layer: Sequence[int]) -> int:
    """Matmul FLOPs to encode one image when block ``l`` runs on ``tokens_per_layer[l]`` tokens (prefix included;
    ``encode_image_reduced`` reports them in ``extras["tokens_per_layer"]``). The embedding and the head cost what
    :func:`~cliplab.models.flops.image_flops` counts; a reducer's own work (e.g. ToMe's similarity matmul) is not
    included. ViT (CLIP-style) image towers only."""
    if config.family != "vit":
        raise ValueError(f"reduced FLOPs are counted by formula for ViT CLIP towers only, not family "
                         f"{config.family!r}")
    v = config.vision
    if len(tokens_per_layer) != v.layers:
        raise ValueError(f"tokens_per_layer needs one count per block ({v.layers}), got {len(tokens_per_layer)}")
    full = v.grid_size**2 + int(v.class_token)
    blocks = sum(block_flops(int(n), v.width, v.mlp_dim) for n in tokens_per_layer)
    return image_flops(config) - block_flops(full, v.width, v.mlp_dim, v.layers) + blocks
