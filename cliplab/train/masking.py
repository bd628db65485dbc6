"""Token masking for training: which image patches a masked encoder keeps, and which text tokens get masked.

Shared by the seed papers' objectives (A-CLIP's attentive patch removal, GA-DMS's dual text masking), so each piece
lives here once:

* :func:`cls_attention_over_layers`: the attention the class token pays every patch, averaged over all layers and
  heads (A-CLIP's score, from its EMA encoder).
* :func:`attentive_block_keep` / :func:`random_block_keep`: keep the top-scoring (or random) ``block x block`` cells
  of a patch grid, as patch indices ready for ``model.encode_image(pixels, keep=...)``.
* :func:`crop_score_map`: a score map over a whole image resampled to a crop of it (a view's coordinates).
* :func:`sigmoid_mask_probability` and :func:`bert_mask`: per-token masking probabilities from a score and BERT's
  80/10/10 replacement.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["cls_attention_over_layers", "block_scores", "blocks_to_patches", "attentive_block_keep",
           "random_block_keep", "kept_count", "crop_score_map", "sigmoid_mask_probability", "bert_mask"]


def cls_attention_over_layers(attn: Sequence[torch.Tensor], n_patches: int) -> torch.Tensor:
    """Per-layer attention probabilities ``[B, H, n, n]`` -> ``[B, n_patches]`` float32: row 0 (the class token)
    over the last ``n_patches`` columns, averaged over every layer and head."""
    if not attn:
        raise ValueError("no attention maps: encode with output='attn' on a ViT with a class token")
    stacked = torch.stack([a[:, :, 0, a.shape[-1] - n_patches:].float() for a in attn])  # [L, B, H, N]
    if stacked.shape[-1] != n_patches or attn[0].shape[-1] == n_patches:
        raise ValueError("CLS attention needs a class token before the patches")
    return stacked.mean(dim=(0, 2))


def _grid(n: int) -> int:
    g = int(round(n ** 0.5))
    if g * g != n:
        raise ValueError(f"{n} patches do not form a square grid")
    return g


def block_scores(scores: torch.Tensor, block: int) -> torch.Tensor:
    """Patch scores ``[B, g*g]`` -> block scores ``[B, (g/block)**2]``: bilinear downsampling by ``block``
    (``align_corners=False``, A-CLIP's ``interpolate``), which for an integer factor of 2 is the mean of each
    ``2 x 2`` cell."""
    b, n = scores.shape
    g = _grid(n)
    if block < 1 or g % block:
        raise ValueError(f"block {block} must divide the patch grid side {g}")
    if block == 1:
        return scores.float()
    small = F.interpolate(scores.float().view(b, 1, g, g), size=(g // block, g // block), mode="bilinear",
                          align_corners=False)
    return small.view(b, -1)


def blocks_to_patches(kept_blocks: torch.Tensor, grid: int, block: int) -> torch.Tensor:
    """Block indices ``[B, K]`` on the ``grid/block`` grid -> sorted patch indices ``[B, K * block**2]`` (each block
    expands to its ``block x block`` patches)."""
    nb = grid // block
    rows, cols = kept_blocks // nb, kept_blocks % nb
    dy, dx = torch.meshgrid(torch.arange(block), torch.arange(block), indexing="ij")
    dy, dx = dy.reshape(-1).to(kept_blocks.device), dx.reshape(-1).to(kept_blocks.device)
    patches = (rows[..., None] * block + dy) * grid + cols[..., None] * block + dx  # [B, K, block**2]
    return patches.flatten(1).sort(dim=1).values


def kept_count(n_blocks: int, ratio: float) -> int:
    """A-CLIP's count: ``int(n_blocks * ratio) + 1`` blocks kept (25 of 49 at ratio 0.5), capped at ``n_blocks``."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"keep ratio must be in (0, 1], got {ratio}")
    return min(n_blocks, int(n_blocks * ratio) + 1)


def attentive_block_keep(scores: torch.Tensor, ratio: float = 0.5, block: int = 2) -> torch.Tensor:
    """Patch indices ``[B, K]`` (sorted) of the top ``kept_count`` blocks by downsampled score (A-CLIP's attentive
    mask). Ties go to the lower index (a stable sort)."""
    small = block_scores(scores, block)
    k = kept_count(small.shape[1], ratio)
    top = torch.argsort(small, dim=1, descending=True, stable=True)[:, :k]
    return blocks_to_patches(top, _grid(scores.shape[1]), block)


def random_block_keep(batch: int, n_patches: int, ratio: float = 0.5, block: int = 2,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """The control: as many blocks as :func:`attentive_block_keep` keeps, chosen uniformly at random per row."""
    g = _grid(n_patches)
    if block < 1 or g % block:
        raise ValueError(f"block {block} must divide the patch grid side {g}")
    nb = (g // block) ** 2
    k = kept_count(nb, ratio)
    top = torch.rand(batch, nb, generator=generator).argsort(dim=1)[:, :k]
    return blocks_to_patches(top, g, block)


def crop_score_map(scores: torch.Tensor, boxes: torch.Tensor, image_size: int) -> torch.Tensor:
    """Scores over a whole image's patch grid ``[B, g*g]`` -> the same scores seen from a crop of it, ``[B, g*g]``.

    ``boxes`` ``[B, 4]`` are ``(top, left, height, width)`` in pixels of the full image. As A-CLIP maps its EMA
    view's attention to each crop: upsample the map bilinearly to the full image's pixels, cut the box, resample
    the box to the patch grid."""
    b, n = scores.shape
    g = _grid(n)
    full = F.interpolate(scores.float().view(b, 1, g, g), size=(image_size, image_size), mode="bilinear",
                         align_corners=False)
    out = []
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        crop = full[i: i + 1, :, int(top): int(top) + int(h), int(left): int(left) + int(w)]
        out.append(F.interpolate(crop, size=(g, g), mode="bilinear", align_corners=False))
    return torch.cat(out).view(b, n)


def sigmoid_mask_probability(x: torch.Tensor, max_prob: float, k: float = 20.0, threshold: float = 0.5
                             ) -> torch.Tensor:
    """``max_prob / (1 + exp(-k (x - threshold)))``: GA-DMS's masking schedule for a per-token variable ``x``."""
    if not 0.0 <= max_prob <= 1.0:
        raise ValueError(f"max_prob must be in [0, 1], got {max_prob}")
    return max_prob * torch.sigmoid(k * (x - threshold))


def bert_mask(ids: torch.Tensor, prob: torch.Tensor, maskable: torch.Tensor, mask_id: int, vocab_size: int,
              generator: torch.Generator | None = None, replace: Sequence[float] = (0.8, 0.1, 0.1),
              random_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking: each ``maskable`` position is chosen with probability ``prob`` (same shape as ``ids``);
    a chosen token becomes ``mask_id`` (80%), a random token (10%, from ``random_ids`` when given, else the whole
    vocabulary) or stays (10%). Returns ``(new_ids, chosen)``; positions that are not ``maskable`` never change."""
    if ids.shape != prob.shape or ids.shape != maskable.shape:
        raise ValueError(f"ids, prob and maskable must share a shape, got {tuple(ids.shape)}, "
                         f"{tuple(prob.shape)}, {tuple(maskable.shape)}")
    p_mask, p_random, _ = replace
    draw = torch.rand(ids.shape, generator=generator)
    chosen = (draw < prob.float()) & maskable
    kind = torch.rand(ids.shape, generator=generator)
    new = ids.clone()
    to_mask = chosen & (kind < p_mask)
    to_random = chosen & (kind >= p_mask) & (kind < p_mask + p_random)
    new[to_mask] = mask_id
    if bool(to_random.any()):
        if random_ids is None:
            rnd = torch.randint(0, vocab_size, ids.shape, generator=generator)
        else:
            rnd = random_ids[torch.randint(0, len(random_ids), ids.shape, generator=generator)]
        new[to_random] = rnd[to_random]
    return new, chosen
