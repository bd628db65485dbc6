"""Dense patch-text similarity maps from a CLIP image tower, training-free.

:func:`similarity_maps` gives the cosine between every patch and every text as maps ``[B, K, H, W]``, upsampled
(bilinear) to the image. Three ways to get the per-patch features (``method``):

* ``"naive"``: the last layer's patch tokens, ``encode_image(..., output="tokens").tokens[:, 1:]`` (every token
  through ``ln_post`` and ``proj``, as CLS is read). CLIP never trained these to match text, and they are noisy: in
  the last block each patch attends mostly to a few global tokens.
* ``"maskclip"`` (Zhou et al. 2022, "Extract Free Dense Labels from CLIP"): the last block's attention is replaced by
  the value path, i.e. every token attends only to itself: ``x + out(v(ln_1(x)))`` for the stream ``x`` entering
  the last block. The paper describes it as removing the query and key embeddings; its official code
  (``return_qkv`` in its ViT backbone) keeps the block's residual and then the block's MLP
  (``v += x; v = ffn(norm2(v), identity=v)``) before ``ln_post`` and the projection. We follow the code: residual
  and MLP kept.
* ``"sclip"`` (Wang et al. 2023, "SCLIP: Rethinking Self-Attention for Dense Vision-Language Inference"): the last
  block's attention probabilities become the *correlative self-attention*
  ``softmax(q q^T / sqrt(d)) + softmax(k k^T / sqrt(d))`` (per head, with the block's own q/k projections), applied to
  the values; the official code keeps the residual and the MLP of that block, and so do we. SCLIP's test-time extras
  (sliding windows over a larger input, PAMR refinement) are not part of it here.

Both variants run the rest of the tower unchanged (:func:`rerun_last_block`). The readout after the last block is
the tokens view's: ``ln_post``, then (SigLIP) the probe head's value path and MLP, then ``proj``.

Other architectures:

* **ResNet** (family ``"resnet"``): the tokens view already *is* the MaskCLIP readout for ResNets (each position
  through the attention pool's value and output projections, no attention mixing; MaskCLIP's ResNet variant), so
  ``naive`` and ``maskclip`` give the same maps. ``sclip`` is defined for a ViT's last block and is refused.
* **Conv stem with max-skip** (the shipped ``shapes-tiny``): the tokens view adds each patch's own stem feature
  through the max-skip's linear map (``stem_skip``); every method here keeps that per-patch term, so the maps read
  the same joint space as the pooled embedding (which adds the max over patches of the same term).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["METHODS", "similarity_maps", "patch_features", "rerun_last_block", "correlative_attention",
           "value_only", "upsample_maps", "joint_space", "stem_skip_term"]

METHODS = ("naive", "maskclip", "sclip")

#: ``mix(q, k, v) -> y``: per-head attention outputs ``[B, H, n, d]`` from ``q, k, v`` ``[B, H, n, d]``
Mixing = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def correlative_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SCLIP's correlative self-attention over ``[B, H, n, d]``:
    ``(softmax(q q^T / sqrt(d)) + softmax(k k^T / sqrt(d))) @ v`` (the two maps are added, not averaged, as in the
    paper's Eq. and code; each row of the sum adds up to 2)."""
    scale = q.shape[-1] ** -0.5
    probs = ((q @ q.transpose(-2, -1)) * scale).softmax(-1) + ((k @ k.transpose(-2, -1)) * scale).softmax(-1)
    return probs @ v


def value_only(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """MaskCLIP's mixing: none; every token attends only to itself (the output is its own value)."""
    return v


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, K, h, w]`` -> ``[B, K, H, W]`` by bilinear interpolation (``align_corners=False``: a constant map stays
    constant, and the patch grid's cells are centred on their pixels)."""
    size = (int(size[0]), int(size[1]))
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def joint_space(visual, x: torch.Tensor) -> torch.Tensor:
    """The tokens view's readout of the last block's output ``[B, n, W]`` -> patch rows ``[B, N, D]`` (before the
    max-skip term): ``ln_post``, the probe head's value path + MLP for SigLIP, ``proj``."""
    y = visual.ln_post(x)
    if visual.head is not None:
        y = visual.head.finish(visual.head.attn.value_path(y))
    if visual.proj is not None:
        y = visual.proj(y)
    return y[:, visual.n_prefix:]


def stem_skip_term(visual, pixels: torch.Tensor) -> torch.Tensor | None:
    """Each patch's max-skip term ``stem_skip(stem(pixels))`` ``[B, N, D]``, or None without a max-skip."""
    if getattr(visual, "stem_skip", None) is None:
        return None
    features = visual.stem(pixels.to(visual.patch_embed.weight.dtype))
    return visual.stem_skip(features.flatten(2).transpose(1, 2))


def rerun_last_block(model, pixels: torch.Tensor, mix: Mixing) -> tuple[torch.Tensor, tuple[int, int]]:
    """A ViT's patch features ``[B, N, D]`` (and the grid) with the last block's attention replaced by ``mix``.

    The stream entering the last block comes from ``encode_image(pixels, output="hidden")`` (so active hooks apply
    to the blocks before it); then ``x + out(mix(q, k, v))`` with the block's own ``ln_1``/q/k/v/out, the block's
    MLP with its residual, and the tokens view's readout (plus the max-skip's per-patch term)."""
    if model.config.vision.is_resnet:
        raise ValueError("rerun_last_block needs a ViT image tower; a ResNet has no transformer blocks")
    visual = model.visual
    out = model.encode_image(pixels, output="hidden")
    x = out.hidden[-2]
    block = visual.transformer.blocks[-1]
    q, k, v = block.attn.split_heads(block.ln_1(x))
    x = x + block.attn.merge_heads(mix(q, k, v))
    x = x + block.mlp(block.ln_2(x))
    patches = joint_space(visual, x)
    skip = stem_skip_term(visual, pixels)
    return (patches if skip is None else patches + skip), out.extras["grid"]


def patch_features(model, pixels: torch.Tensor, method: str = "naive") -> tuple[torch.Tensor, tuple[int, int]]:
    """Per-patch features in the joint space ``[B, N, D]`` (row-major over the grid) and the grid ``(gh, gw)``,
    by ``method`` (see the module docstring). Differentiable; wrap in ``torch.no_grad()`` for inference."""
    if method not in METHODS:
        raise ValueError(f"unknown dense method {method!r}; choose from {', '.join(METHODS)}")
    resnet = model.config.vision.is_resnet
    if method == "sclip" and resnet:
        raise ValueError("sclip replaces a ViT's last attention block; this model's image tower is a ResNet (use "
                         "maskclip, which for a ResNet is its attention pool's value path)")
    if method == "naive" or resnet:  # a ResNet's tokens view is already MaskCLIP's value path
        out = model.encode_image(pixels, output="tokens")
        return out.tokens[:, 1:], out.extras["grid"]
    return rerun_last_block(model, pixels, value_only if method == "maskclip" else correlative_attention)


def similarity_maps(model, pixels: torch.Tensor, text_features: torch.Tensor, method: str = "naive",
                    size: tuple[int, int] | None = None) -> torch.Tensor:
    """Cosine similarity of every patch with every text, as maps ``[B, K, H, W]`` upsampled (bilinear) to ``size``
    (default: the pixels' own ``H, W``).

    ``pixels``: preprocessed ``[B, 3, S, S]`` on the model's device; ``text_features``: ``[K, D]`` (normalised
    here). ``method``: ``"naive"``, ``"maskclip"`` or ``"sclip"``. Maps are float32."""
    if text_features.dim() != 2 or text_features.shape[1] != model.config.embed_dim:
        raise ValueError(f"text_features must be [K, {model.config.embed_dim}] (one row per text), got "
                         f"{tuple(text_features.shape)}")
    patches, (gh, gw) = patch_features(model, pixels, method)
    texts = F.normalize(text_features.float().to(patches.device), dim=-1)
    sims = F.normalize(patches.float(), dim=-1) @ texts.t()  # [B, N, K]
    maps = sims.transpose(1, 2).reshape(sims.shape[0], -1, gh, gw)
    return upsample_maps(maps, size if size is not None else pixels.shape[-2:])
