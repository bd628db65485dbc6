"""Build a config from the tensor shapes of a checkpoint (the way OpenAI's ``build_model`` does)."""

from __future__ import annotations

import math

from ..config import ModelConfig, PreprocessSettings, TextConfig, VisionConfig

HEAD_DIM = 64  # every released CLIP ViT uses 64-wide heads; the head count is not recorded in the weights


def config_from_shapes(
    *,
    embed_dim: int,
    patch_size: int,
    vision_width: int,
    vision_layers: int,
    vision_positions: int,
    vision_mlp: int,
    vocab_size: int,
    context_length: int,
    text_width: int,
    text_layers: int,
    text_mlp: int,
    act: str,
) -> ModelConfig:
    grid = math.isqrt(vision_positions - 1)
    if grid * grid != vision_positions - 1:
        raise ValueError(f"vision position table of {vision_positions} rows is not 1 + a square grid")
    image_size = grid * patch_size
    return ModelConfig(
        name="inferred",
        embed_dim=embed_dim,
        vision=VisionConfig(image_size=image_size, patch_size=patch_size, width=vision_width, layers=vision_layers,
                            heads=max(1, vision_width // HEAD_DIM), mlp_dim=vision_mlp, act=act),
        text=TextConfig(context_length=context_length, vocab_size=vocab_size, width=text_width, layers=text_layers,
                        heads=max(1, text_width // HEAD_DIM), mlp_dim=text_mlp, act=act),
        preprocess=PreprocessSettings(image_size=image_size),  # crop convention: set by the layout
    )
