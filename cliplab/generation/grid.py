"""Image grids for generated samples (figures, the CLI): ``save_grid(images, path, columns)``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["image_grid", "save_grid"]


def image_grid(images: torch.Tensor, columns: int, scale: int = 4, pad: int = 2) -> Image.Image:
    """Images ``[N, 3, S, S]`` in [0, 1] tiled row-major in ``columns`` columns, each upscaled ``scale`` times
    (nearest, so pixels stay visible), on a white background."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [N, 3, S, S], got {tuple(images.shape)}")
    n, _, h, w = images.shape
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    H, W = h * scale, w * scale
    canvas = Image.new("RGB", (columns * (W + pad) + pad, rows * (H + pad) + pad), "white")
    arr = (images.detach().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    for i, a in enumerate(arr):
        tile = Image.fromarray(a).resize((W, H), Image.NEAREST)
        canvas.paste(tile, (pad + (i % columns) * (W + pad), pad + (i // columns) * (H + pad)))
    return canvas


def save_grid(images: torch.Tensor, path: str | Path, columns: int, scale: int = 4) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, columns, scale).save(p)
    return p
