"""Matmul FLOP counts of the two towers (2 x multiply-adds), for throughput -> utilisation figures.

Counted: patch embedding (or the convolutional stem and its 1x1 projection), q/k/v/out projections, attention scores
and weighted sums, the MLP, the output projection.
Not counted: LayerNorms, softmax, activations and additions (a few percent of the total at CLIP sizes). ViT-B/32 comes
to 8.82 GFLOPs per 224 px image, the figure usually quoted for it.

The ViT image tower and the causal text tower are counted by formula; the other image towers (SigLIP's probe-pooled
ViT, OpenAI's ModifiedResNet) by PyTorch's ``FlopCounterMode`` on a shapes-only (meta-device) forward pass, which
counts the same kinds of work (convolutions, matmuls, attention) and allocates nothing.
"""

from __future__ import annotations

from .config import ModelConfig

__all__ = ["block_flops", "image_flops", "text_flops"]


def _blocks(n: int, width: int, mlp_dim: int, layers: int, causal: bool = False) -> int:
    linear = 2 * n * width * (4 * width + 2 * mlp_dim)  # qkv (3W) + out (W) + fc1 and fc2
    scores = 2 * 2 * n * n * width  # q @ k^T and probs @ v
    if causal:
        scores //= 2  # kernels that skip the masked half are not assumed; kept as the useful work
    return layers * (linear + scores)


def block_flops(n: int, width: int, mlp_dim: int, layers: int = 1, causal: bool = False) -> int:
    """Matmul FLOPs of ``layers`` transformer blocks over ``n`` tokens (the towers' formula, for reduced-token counts)."""
    return _blocks(n, width, mlp_dim, layers, causal)


def _counted_image_flops(config: ModelConfig) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .clip import CLIP

    with torch.device("meta"):
        model = CLIP(config).requires_grad_(False)  # FlopCounterMode's module tracker trips on leaf inputs otherwise
        pixels = torch.empty(1, 3, config.vision.image_size, config.vision.image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.visual(pixels)
    return int(counter.get_total_flops())


def image_flops(config: ModelConfig) -> int:
    """Matmul FLOPs to encode one image."""
    if config.family != "vit":
        return _counted_image_flops(config)
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
    """Useful matmul FLOPs to encode one text of ``length`` tokens (SOT and EOT included); padding not counted. A
    bidirectional tower (SigLIP) attends over every position it is given: pass its fixed context length."""
    t = config.text
    return _blocks(int(length), t.width, t.mlp_dim, t.layers, causal=t.causal) + 2 * t.width * config.embed_dim
