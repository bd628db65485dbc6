"""Matmul FLOP counts of the two towers (2 x multiply-adds), for throughput -> utilisation figures.

Counted: patch embedding (or the convolutional stem and its 1x1 projection), q/k/v/out projections, attention scores
and weighted sums, the MLP, the output projection.
Not counted: LayerNorms, softmax, activations and additions (a few percent of the total at CLIP sizes). ViT-B/32 comes
to 8.82 GFLOPs per 224 px image, the figure usually quoted for it.
"""

from __future__ import annotations

from .config import ModelConfig

__all__ = ["image_flops", "text_flops"]


def _blocks(n: int, width: int, mlp_dim: int, layers: int, causal: bool = False) -> int:
    linear = 2 * n * width * (4 * width + 2 * mlp_dim)  # qkv (3W) + out (W) + fc1 and fc2
    scores = 2 * 2 * n * n * width  # q @ k^T and probs @ v
    if causal:
        scores //= 2  # kernels that skip the masked half are not assumed; kept as the useful work
    return layers * (linear + scores)


def image_flops(config: ModelConfig) -> int:
    """Matmul FLOPs to encode one image."""
    v = config.vision
    patches = v.grid_size**2
    embed = 2 * patches * 3 * v.patch_size**2 * v.width
    if v.stem_channels:
        embed, side, c_in = 2 * patches * v.stem_channels[-1] * v.width, v.image_size, 3
        for c_out in v.stem_channels:  # a 3x3 convolution at each stage's input resolution, then a 2x2 pool
            embed += 2 * side * side * c_in * c_out * 9
            side, c_in = side // 2, c_out
        if v.stem_max_skip:  # the max-skip's linear map of the pooled stem features
            embed += 2 * c_in * config.embed_dim
    return embed + _blocks(patches + 1, v.width, v.mlp_dim, v.layers) + 2 * v.width * config.embed_dim


def text_flops(config: ModelConfig, length: int) -> int:
    """Useful matmul FLOPs to encode one text of ``length`` tokens (SOT and EOT included); padding not counted."""
    t = config.text
    return _blocks(int(length), t.width, t.mlp_dim, t.layers, causal=True) + 2 * t.width * config.embed_dim
