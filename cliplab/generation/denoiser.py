"""A small U-Net denoiser with cross-attention to a token sequence (the shape of Stable Diffusion's UNet, in
miniature): residual blocks with the timestep as a GroupNorm scale/shift, cross-attention at the two lower
resolutions, queries from image features, keys and values from the conditioning tokens (padding masked)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .protocol import Conditioning

__all__ = ["DenoiserConfig", "TokenDenoiser", "timestep_embedding"]


@dataclass
class DenoiserConfig:
    image_size: int = 32
    cond_dim: int = 128
    channels: tuple[int, ...] = (16, 32, 64)   # one level per entry; each level after the first halves the size
    attn_levels: tuple[int, ...] = (1, 2)       # levels with cross-attention
    heads: int = 4
    time_dim: int = 128
    groups: int = 8
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.attn_levels = tuple(int(a) for a in self.attn_levels)
        if self.image_size % (2 ** (len(self.channels) - 1)):
            raise ValueError(f"image_size {self.image_size} is not divisible by 2^{len(self.channels) - 1}")
        if any(c % self.groups for c in self.channels):
            raise ValueError(f"every channel count must be divisible by groups={self.groups}")

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[B, dim]`` of integer timesteps (cos first, as in diffusers' flip_sin_to_cos)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, time_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(time_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time(temb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class CrossAttention(nn.Module):
    """Image features attend to the conditioning tokens; the output projection starts at zero (an identity block)."""

    def __init__(self, channels: int, cond_dim: int, heads: int, groups: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels {channels} not divisible by heads {heads}")
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.cond_norm = nn.LayerNorm(cond_dim)
        self.q = nn.Linear(channels, channels, bias=False)
        self.kv = nn.Linear(cond_dim, 2 * channels, bias=False)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.last_attention: torch.Tensor | None = None  # [B, heads, HW, L] when record_attention is on
        self.record_attention = False

    def forward(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.q(self.norm(x).flatten(2).transpose(1, 2))                       # [B, HW, C]
        k, v = self.kv(self.cond_norm(cond.tokens)).chunk(2, dim=-1)               # [B, L, C]
        split = lambda z: z.view(b, z.shape[1], self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        logits = q @ k.transpose(-1, -2) / math.sqrt(c // self.heads)
        logits = logits.masked_fill(~cond.mask[:, None, None, :], float("-inf"))
        attn = logits.softmax(-1)
        if self.record_attention:
            self.last_attention = attn
        out = (attn @ v).transpose(1, 2).reshape(b, h * w, c)
        return x + self.out(out).transpose(1, 2).view(b, c, h, w)


class TokenDenoiser(nn.Module):
    """``forward(x_t, t, cond) -> eps``: a U-Net over ``[B, 3, S, S]`` images conditioned on ``cond`` tokens."""

    def __init__(self, config: DenoiserConfig | None = None) -> None:
        super().__init__()
        cfg = self.config = config or DenoiserConfig()
        ch, td, g = cfg.channels, cfg.time_dim, cfg.groups
        self.time_mlp = nn.Sequential(nn.Linear(td, td), nn.SiLU(), nn.Linear(td, td))
        self.stem = nn.Conv2d(3, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.down_attn = nn.ModuleList()
        self.pool = nn.ModuleList()
        prev = ch[0]
        for i, c in enumerate(ch):
            self.pool.append(nn.Identity() if i == 0 else nn.Conv2d(prev, prev, 3, stride=2, padding=1))
            self.down.append(ResBlock(prev, c, td, g))
            self.down_attn.append(CrossAttention(c, cfg.cond_dim, cfg.heads, g) if i in cfg.attn_levels
                                  else nn.Identity())
            prev = c
        self.mid = ResBlock(prev, prev, td, g)
        self.mid_attn = CrossAttention(prev, cfg.cond_dim, cfg.heads, g)
        self.up = nn.ModuleList()
        self.up_attn = nn.ModuleList()
        for i in reversed(range(len(ch))):
            self.up.append(ResBlock(prev + ch[i], ch[i], td, g))
            self.up_attn.append(CrossAttention(ch[i], cfg.cond_dim, cfg.heads, g) if i in cfg.attn_levels
                                else nn.Identity())
            prev = ch[i]
        self.out_norm = nn.GroupNorm(g, prev)
        self.out = nn.Conv2d(prev, 3, 3, padding=1)

    def cross_attentions(self) -> list[CrossAttention]:
        return [m for m in self.modules() if isinstance(m, CrossAttention)]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if cond.dim != self.config.cond_dim:
            raise ValueError(f"conditioning width {cond.dim} != the denoiser's cond_dim {self.config.cond_dim}")
        if len(cond) != x.shape[0]:
            raise ValueError(f"{len(cond)} conditioning rows for {x.shape[0]} images")
        temb = self.time_mlp(timestep_embedding(t, self.config.time_dim))
        h = self.stem(x)
        skips = []
        for pool, block, attn in zip(self.pool, self.down, self.down_attn):
            h = block(pool(h), temb)
            h = attn(h, cond) if isinstance(attn, CrossAttention) else h
            skips.append(h)
        h = self.mid_attn(self.mid(h, temb), cond)
        for block, attn in zip(self.up, self.up_attn):
            skip = skips.pop()
            if h.shape[-1] != skip.shape[-1]:
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], 1), temb)
            h = attn(h, cond) if isinstance(attn, CrossAttention) else h
        return self.out(F.silu(self.out_norm(h)))
