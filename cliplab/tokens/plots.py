"""PNG plots of token-level results (matplotlib, Agg backend; imported only when a plot is asked for)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:  # a clear message rather than a bare ImportError deep in a method
        raise ImportError("plots need matplotlib: pip install 'cliplab[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def token_bar_chart(labels: Sequence[str], scores: Sequence[float], path: str | Path, title: str = "") -> Path:
    """Bar chart of one score per token or word (negative red, positive blue), written to ``path`` as PNG."""
    plt = _pyplot()
    scores = np.asarray(scores, dtype=float)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(labels)), 3.0))
    ax.bar(range(len(scores)), scores, color=np.where(scores < 0, "#c0392b", "#2e86c1"))
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def similarity_overlay(image, sim_map, path: str | Path, title: str = "", alpha: float = 0.55) -> Path:
    """A patch-text similarity map (``[gh, gw]``) upsampled over the (preprocessed-size) image, as PNG."""
    plt = _pyplot()
    from PIL import Image

    img = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    sim = np.asarray(sim_map.detach().float().cpu() if hasattr(sim_map, "detach") else sim_map, dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.2))
    axes[0].imshow(img)
    axes[0].set_title("image")
    axes[1].imshow(img)
    h, w = img.shape[:2]  # pixel centres sit at integer coordinates: the extent must cover -0.5 .. size-0.5
    heat = axes[1].imshow(sim, cmap="inferno", alpha=alpha, extent=(-0.5, w - 0.5, h - 0.5, -0.5),
                          interpolation="bilinear")
    axes[1].set_title(title or "patch-text similarity")
    for ax in axes:
        ax.axis("off")
    fig.colorbar(heat, ax=axes[1], fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
