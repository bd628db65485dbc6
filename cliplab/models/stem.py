"""A convolutional stem for the ViT image tower (a "hybrid" ViT).

The standard CLIP ViT cuts the image into patches with one linear map (a stride-``patch`` convolution). A ViT trained
from scratch on little data learns *shape* slowly that way: on the synthetic scene world a 3-layer CNN classified the
shape of single objects at 88% after 19,200 labelled scenes, the plain ViT at 22% (``experiments/
shape_learnability.py``, results in ``docs/training.md``). Dosovitskiy et al. (2021) already offered the hybrid ViT,
whose tokens come from a CNN's feature map, and Xiao et al. ("Early Convolutions Help Transformers See Better", 2021)
showed a small convolutional stem makes ViTs train faster and more robustly.

This stem has ``log2(patch_size)`` stages of ``3x3 conv -> ReLU -> 2x2 max-pool``, so the token grid is the one the
patch stem gives (``image_size / patch_size`` per side) and everything after it (positions, CLS, blocks, token-level
access) keeps its shape. The vision tower's ``patch_embed`` becomes a 1x1 convolution from the last stage's channels
to the tower's width. What a token *sees* does change: with three stages each token's receptive field is 22 px wide
(centred on its 8 px cell), so dropping a token (``keep=``) or reading a token map no longer isolates one patch's
pixels. Max pooling (rather than strided convolutions) makes each stage commute exactly with shifts by its stride,
the CNN's translation bias. The stem alone gains little: 27% vs 22% in the supervised experiment, and 26.8% vs 19.5%
zero-shot shape with the first contrastive recipe (architecture ``shapes-tiny-stem``, see ``docs/training.md``). No
normalisation layers: nothing depends on batch statistics, and train and eval compute the same function.

The *max-skip* (``vision.stem_max_skip``, built by :class:`~cliplab.models.towers.VisionTower`) adds a linear map of
this stem's feature map, max-pooled over the patches, to the pooled image output. In the supervised experiment it
took the stem ViT from 27% to 85% (the CNN with a global max pool: 88%): a global max over local detectors is what
makes a small CNN learn shape fast, and CLS pooling after attention does not give it. The shipped ``shapes-tiny``
has a stem and the max-skip.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvStem"]


class ConvStem(nn.Module):
    """``[B, 3, H, W] -> [B, channels[-1], H / 2**n, W / 2**n]`` for ``n = len(channels)`` stages."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        stages, c_in = [], 3
        for c_out in channels:
            stages.append(nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.out_channels = c_in

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.stages(pixels)

    @torch.no_grad()
    def init_weights(self) -> None:
        # He init, zero biases. PyTorch's default convolution init (smaller, with random biases) learned shape faster
        # in a supervised scratch run (0.48 vs 0.27 after 19,200 scenes) but the contrastive shapes-tiny run from it
        # stalled (zero-shot colour 19.8%, shape 16.3% after 600 steps, against 99.0% / 26.8%).
        for stage in self.stages:
            nn.init.kaiming_normal_(stage[0].weight, nonlinearity="relu")
            nn.init.zeros_(stage[0].bias)
