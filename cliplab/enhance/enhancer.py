"""A small image-enhancement network and a differentiable path from its pixels into a CLIP image tower.

Shared by CLIP-guided enhancement methods (RAVE: :mod:`cliplab.enhance.rave`); nothing here is paper-specific.

* :class:`LightMapEnhancer`: predicts a one-channel illumination map ``L`` from the image and returns
  ``clamp(x / L, 0, 1)``, the Retinex-style output of the U-Net in CLIP-LIT / RAVE (``enhanced = clamp(img /
  light_map)``). Here ``L = exp(-g)`` with ``g`` the last convolution's output, so ``L > 0`` without the official
  ``relu(...) + 1e-9`` (which can divide by ~0), and the last convolution starts at zero: the network is exactly
  the identity at initialisation (the official code instead trains 1000 reconstruction-only iterations to get there).
  Much smaller than the official U-Net: two 3x3 conv layers, a global-context branch (the image-mean feature, a
  one-bin stand-in for the official pyramid pooling) and a 3x3 head.
* :func:`clip_pixels`: ``[B, 3, H, W]`` images in ``[0, 1]`` -> the tower's normalised input, differentiably (bicubic
  resize of the short side, centre crop, per-channel mean/std): the same numbers as ``model.preprocess`` on a PIL
  image of the tower's size, and a gradient path back to the enhancer.
* :func:`image_embeddings` (unit-norm joint-space features, with gradients) and :func:`tower_hidden` (the ViT's hidden
  states, for a feature-space reconstruction loss).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LightMapEnhancer", "clip_pixels", "image_embeddings", "tower_hidden", "to_tensor01", "to_pil"]


class LightMapEnhancer(nn.Module):
    """``out = clamp(x * exp(g(x)), 0, 1)``: ``exp(-g)`` is the illumination map; identity at initialisation."""

    def __init__(self, width: int = 16, max_log_gain: float = 3.0):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.max_log_gain = float(max_log_gain)  # bounds the gain to exp(+-3): no runaway map early in training
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, padding_mode="reflect")
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, padding_mode="reflect")
        self.context = nn.Linear(width, width)  # global context: how dark the whole image is
        self.head = nn.Conv2d(width, 1, 3, padding=1, padding_mode="reflect")
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def log_gain(self, x: torch.Tensor) -> torch.Tensor:
        """``g`` ``[B, 1, H, W]``: the per-pixel log gain (``-log L``)."""
        h = F.leaky_relu(self.conv1(x), 0.2)
        h = F.leaky_relu(self.conv2(h), 0.2)
        h = h + self.context(h.mean((2, 3)))[:, :, None, None]
        return self.max_log_gain * torch.tanh(self.head(h) / self.max_log_gain)

    def light_map(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self.log_gain(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got {tuple(x.shape)}")
        return (x * torch.exp(self.log_gain(x))).clamp(0, 1)


def clip_pixels(model, images: torch.Tensor) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in ``[0, 1]`` -> ``[B, 3, S, S]`` normalised tower input, differentiably.

    Short side to ``S`` (bicubic, antialiased), centre crop (the OpenAI rounding), then ``(x - mean) / std``. At
    ``H = W = S`` no resampling happens, so the result equals ``model.preprocess`` of the same image."""
    cfg = model.config.preprocess
    s = int(cfg.image_size)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if (h, w) != (s, s):
        scale = s / min(h, w)
        size = (s, int(w * scale)) if h <= w else (int(h * scale), s)
        images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = int(round((size[0] - s) / 2.0)), int(round((size[1] - s) / 2.0))
        images = images[..., top:top + s, left:left + s]
    mean = torch.tensor(cfg.mean, dtype=images.dtype, device=images.device)[:, None, None]
    std = torch.tensor(cfg.std, dtype=images.dtype, device=images.device)[:, None, None]
    return (images - mean) / std


def image_embeddings(model, images: torch.Tensor) -> torch.Tensor:
    """Unit-norm joint-space image embeddings ``[B, D]`` (after ``ln_post`` and ``proj``) of ``[0, 1]`` images, with
    gradients to the pixels (wrap in ``torch.no_grad()`` when none are needed)."""
    return F.normalize(model.encode_image(clip_pixels(model, images)).float(), dim=-1)


def tower_hidden(model, images: torch.Tensor) -> list[torch.Tensor]:
    """The image tower's hidden states (``layers + 1`` tensors ``[B, n, W]``: the stream entering block 0, then after
    each block; before ``ln_post``) of ``[0, 1]`` images, with gradients."""
    return model.encode_image(clip_pixels(model, images), output="hidden").hidden


def to_tensor01(images) -> torch.Tensor:
    """PIL images (or one) -> ``[B, 3, H, W]`` float in ``[0, 1]`` (all the same size)."""
    images = [images] if not isinstance(images, (list, tuple)) else list(images)
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    if len({a.shape for a in arrays}) > 1:
        raise ValueError("images must share one size; resize them first")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def to_pil(images: torch.Tensor) -> list:
    """``[B, 3, H, W]`` in ``[0, 1]`` -> PIL images (rounded to uint8)."""
    from PIL import Image

    arr = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
