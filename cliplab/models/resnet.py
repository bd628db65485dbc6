"""OpenAI's ModifiedResNet image tower (RN50, RN101, RN50x4, RN50x16, RN50x64), in our own code.

The layout of OpenAI's ``clip/model.py``: a three-convolution stem (each with BatchNorm and ReLU) and a 2x2 average
pool; four stages of Bottleneck blocks whose strided downsampling is anti-aliased (a 2x2 average pool before the
1x1 convolution, in the main path and the shortcut alike); and an attention pool: the feature map's mean is prepended
as a query token, a positional table of ``1 + (image_size / 32) ** 2`` rows is added, and multi-head attention of the
mean token over all ``1 + HW`` tokens, projected to ``embed_dim``, is the image embedding.

BatchNorm always uses its stored statistics (OpenAI's inference behaviour), also in train mode: fine-tuning updates
its scale and shift, never the running mean and variance (batch statistics of small fine-tuning batches would
drift away from what the checkpoint learned with).

Token-level views (``forward_rich``):

* ``tokens`` ``[B, 1 + HW, D]``: row 0 is the pooled embedding (bit-identical to ``forward``); row ``1 + i`` is
  spatial position ``i`` (row-major) mapped into the joint space by the pool's value and output projections,
  ``out(v(x_i + pos_i))``: what the pool gives when a position attends only to itself (MaskCLIP / DenseCLIP);
* ``hidden``: five feature maps ``[B, C, H, W]``: after the stem, then after each of the four stages;
* ``attn``: one tensor ``[B, heads, 1, 1 + HW]``: the attention of the mean query (the only query the pool uses)
  over the mean token and the ``HW`` positions.

Only the ``tokens`` hook site applies; the transformer sites (``input``, ``pos``, ``layer[L].*``) belong to ViTs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .hooks import NO_HOOKS, Hooks, TowerOutput
from .hooks import attend as attend_recording
from .transformer import attention

#: Each stage doubles the planes; a block's output has ``EXPANSION`` times its planes.
EXPANSION = 4

#: Why the hook sites of a transformer do not exist in this tower (``CLIP.missing_sites`` reports them).
MISSING_SITES = {
    "input": "a ResNet image tower has no token embeddings: use the 'image.tokens' site, or edit the pixels",
    "pos": "a ResNet image tower's only positional table is its attention pool's; it is not a hook site",
    "resid": "a ResNet image tower has no transformer blocks (image.layer[L] sites exist only in ViTs)",
    "attn": "a ResNet image tower has no transformer blocks (image.layer[L] sites exist only in ViTs)",
    "attn_bias": "a ResNet image tower has no transformer blocks (image.layer[L] sites exist only in ViTs)",
}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics: ``(x - running_mean) / sqrt(running_var + eps) * weight + bias`` in train
    and eval mode alike (``nn.BatchNorm2d``'s eval arithmetic). No ``num_batches_tracked``: nothing is tracked."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    @torch.no_grad()
    def reset(self) -> None:
        self.weight.fill_(1.0)
        self.bias.zero_()
        self.running_mean.zero_()
        self.running_var.fill_(1.0)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> tuple[nn.Conv2d, FrozenBatchNorm2d]:
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False), FrozenBatchNorm2d(c_out)


class Stem(nn.Module):
    """Three 3x3 convolutions (the first strided) with BatchNorm and ReLU, then a 2x2 average pool: stride 4."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(3, width // 2, 3, stride=2)
        self.conv2, self.bn2 = _conv_bn(width // 2, width // 2, 3)
        self.conv3, self.bn3 = _conv_bn(width // 2, width, 3)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.pool(x)


class Shortcut(nn.Module):
    """The projection shortcut of a block that changes shape: average pool (when strided), 1x1 conv, BatchNorm."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv, self.bn = _conv_bn(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.pool(x)))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> (average pool when strided) -> 1x1 x4, plus the shortcut, then ReLU. Every convolution has
    stride 1: the stride is the average pool's (anti-aliased downsampling)."""

    def __init__(self, c_in: int, planes: int, stride: int = 1):
        super().__init__()
        c_out = planes * EXPANSION
        self.conv1, self.bn1 = _conv_bn(c_in, planes, 1)
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3)
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3, self.bn3 = _conv_bn(planes, c_out, 1)
        self.shortcut = Shortcut(c_in, c_out, stride) if stride > 1 or c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(self.pool(y)))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class AttentionPool(nn.Module):
    """Multi-head attention of the feature map's mean over itself and every position (OpenAI's AttentionPool2d)."""

    def __init__(self, grid: int, width: int, heads: int, out_dim: int):
        super().__init__()
        self.heads = heads
        self.pos_embed = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, out_dim)

    def sequence(self, fmap: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, 1 + HW, C]``: the mean, then the positions row-major, with positions added."""
        x = fmap.flatten(2).transpose(1, 2)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        return x + self.pos_embed.to(x.dtype)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def attend(self, x: torch.Tensor, record: bool = False):
        """The pooled output ``[B, D]`` of sequence ``x``, the values ``v(x)`` ``[B, 1 + HW, C]`` and (``record``)
        the mean query's attention ``[B, heads, 1, 1 + HW]``."""
        values = self.v(x)
        q, k, v = self._heads(self.q(x[:, :1])), self._heads(self.k(x)), self._heads(values)
        if record:
            y, probs = attend_recording(q, k, v, None, "image", 0, NO_HOOKS, record=True)
        else:
            y, probs = attention(q, k, v), None
        return self.out(y.transpose(1, 2).flatten(1)), values, probs

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.attend(self.sequence(fmap))[0]


class ResNetTower(nn.Module):
    """OpenAI's ModifiedResNet: ``[B, 3, S, S]`` pixels -> ``[B, embed_dim]`` image features (see the module doc).

    ``cfg.width`` is the stem's width (stage ``i`` has ``width * 2**i`` planes, ``width * 2**i * 4`` output
    channels, so the attention pool works at ``width * 32``); ``cfg.heads`` is the pool's head count."""

    missing_sites = MISSING_SITES

    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        if not cfg.is_resnet:
            raise ValueError("ResNetTower needs a vision config with resnet_layers (four block counts)")
        self.cfg = cfg
        self.stem = Stem(cfg.width)
        stages, c_in = [], cfg.width
        for i, blocks in enumerate(cfg.resnet_layers):
            planes = cfg.width * 2**i
            stage = [Bottleneck(c_in, planes, stride=1 if i == 0 else 2)]
            c_in = planes * EXPANSION
            stage += [Bottleneck(c_in, planes) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
        self.stages = nn.ModuleList(stages)
        self.pool = AttentionPool(cfg.grid_size, cfg.width * 32, cfg.heads, embed_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.stem.conv1.weight.dtype

    def features(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """The stem's feature map, then each stage's: five tensors ``[B, C, H, W]``."""
        if pixels.shape[-2:] != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(
                f"expected images of {self.cfg.image_size}x{self.cfg.image_size}, got {tuple(pixels.shape[-2:])}; "
                "use model.preprocess(...) to resize"
            )
        maps = [self.stem(pixels.to(self.dtype))]
        for stage in self.stages:
            maps.append(stage(maps[-1]))
        return maps

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(pixels)[-1])

    def forward_rich(self, pixels: torch.Tensor, *, hooks: Hooks = NO_HOOKS, want: frozenset = frozenset(),
                     keep: torch.Tensor | None = None, prompts: torch.Tensor | None = None) -> TowerOutput:
        """The forward pass with the token-level views of the module doc; the ``tokens`` hook site only."""
        if keep is not None:
            raise ValueError("keep= drops ViT patches; a ResNet image tower has none to drop (crop or mask the pixels)")
        if prompts is not None:
            raise ValueError("prompts= inserts tokens into a ViT; a ResNet image tower has no token sequence")
        maps = self.features(pixels)
        x = self.pool.sequence(maps[-1])
        pooled, values, probs = self.pool.attend(x, record="attn" in want)
        tokens = None
        if "tokens" in want or hooks.edits_tokens("image"):
            tokens = self.pool.out(values)
            tokens[:, 0] = pooled  # row 0 is the attention pool's output (row 0 of out(v(x)) is only its value)
            edited = hooks.tokens("image", tokens)
            if edited is not tokens:
                pooled, tokens = edited[:, 0], edited
        index = torch.zeros(pixels.shape[0], dtype=torch.long, device=pooled.device)
        g = self.cfg.grid_size
        extras = {"grid": (g, g), "n_prompts": 0, "keep": None}
        return TowerOutput(pooled, index, tokens if "tokens" in want else None,
                           maps if "hidden" in want else None, [probs] if "attn" in want else None, extras)

    @torch.no_grad()
    def init_weights(self) -> None:
        """OpenAI's ``initialize_parameters`` for the ResNet: PyTorch's default convolution and linear init, unit
        BatchNorm, the pool's projections at ``std = width**-0.5``, and each block's last BatchNorm scale at zero
        (every block starts as its shortcut)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.reset_parameters()
            elif isinstance(m, FrozenBatchNorm2d):
                m.reset()
        std = self.pool.q.in_features**-0.5
        nn.init.normal_(self.pool.pos_embed, std=std)
        for proj in (self.pool.q, self.pool.k, self.pool.v, self.pool.out):
            nn.init.normal_(proj.weight, std=std)
        for stage in self.stages:
            for block in stage:
                block.bn3.weight.zero_()


def resnet_vision_config(image_size: int, width: int, layers: tuple[int, ...], heads: int) -> VisionConfig:
    """The vision config of a ModifiedResNet, with the ViT-only fields at fixed values (``layers`` and ``mlp_dim``
    0) so that a config inferred from shapes equals the registered one (``configs/RN*.json``)."""
    return VisionConfig(image_size=image_size, patch_size=32, width=width, layers=0, heads=heads, mlp_dim=0,
                        resnet_layers=tuple(layers))
