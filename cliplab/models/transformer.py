"""Pre-LayerNorm transformer blocks shared by both CLIP towers, and SigLIP's attention-probe pooling head.

Tensors are batch-first ``[B, L, D]``. Attention keeps q, k and v in one fused projection (``qkv``, the layout of
OpenAI's ``in_proj_weight``) and runs through ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .hardware import short_attention_limit


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the activation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return x * torch.sigmoid(1.702 * x)
        return torch.sigmoid(1.702 * x).mul_(x)  # inference: the same bits, one buffer fewer


def make_activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":  # transformers' "gelu_pytorch_tanh" (SigLIP)
        return nn.GELU(approximate="tanh")
    raise ValueError(f"unknown activation {name!r}; expected 'quick_gelu', 'gelu' or 'gelu_tanh'")


def match_dtype(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """A float attention mask in the dtype of the queries (SDPA wants them equal; a hook's bias may come in fp32
    while the model runs in bf16)."""
    if mask is None or mask.dtype == torch.bool or mask.dtype == like.dtype:
        return mask
    return mask.to(like.dtype)


#: In low precision, sequences up to this length run attention as two plain matmuls and a softmax: measured 1.9x
#: faster than PyTorch's fused CPU kernel for ViT-B/32's 50 tokens and 20-token captions in bf16 (2 cores of an AMD
#: EPYC), while the fused kernel wins at 197 tokens; with AMX the fused kernel wins from about 50 tokens, so the
#: limit is 32 there (:func:`cliplab.models.hardware.short_attention_limit`). fp32 always uses the fused kernel (the
#: exact path).
SHORT_SEQUENCE = short_attention_limit()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention over ``[B, H, n, d]``; the kernel is chosen by dtype and length (see above)."""
    mask = match_dtype(mask, q)
    if q.dtype == torch.float32 or q.shape[-2] > SHORT_SEQUENCE or (causal and mask is None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores + mask
    return scores.softmax(-1) @ v


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, n, W]`` -> q, k, v each ``[B, heads, n, W/heads]``."""
        b, n, d = x.shape
        return self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        """Per-head outputs ``[B, heads, n, W/heads]`` -> the output projection ``[B, n, W]``."""
        b, _, n, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(b, n, -1))

    def forward(self, x: torch.Tensor, causal: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        return self.merge_heads(attention(q, k, v, attn_mask, causal))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = make_activation(act)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ResidualBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int, act: str, eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_dim, act)

    def forward(self, x: torch.Tensor, causal: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal, attn_mask=attn_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_dim: int, act: str, eps: float):
        super().__init__()
        self.width = width
        self.blocks = nn.ModuleList(ResidualBlock(width, heads, mlp_dim, act, eps) for _ in range(layers))

    def forward(self, x: torch.Tensor, causal: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, causal=causal, attn_mask=attn_mask)
        return x

    @torch.no_grad()
    def init_weights(self) -> None:
        """OpenAI CLIP's initialisation (``CLIP.initialize_parameters``)."""
        n_layers = len(self.blocks)
        proj_std = (self.width**-0.5) * ((2 * n_layers) ** -0.5)
        attn_std = self.width**-0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.out.weight, std=proj_std)
            nn.init.zeros_(block.attn.out.bias)
            nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)


class ProbeAttention(nn.Module):
    """Multi-head attention of learned queries over a sequence: ``nn.MultiheadAttention(query, x, x)`` with its
    packed ``in_proj`` (q, k, v stacked on dim 0, kept here as ``qkv``) and ``out_proj`` (``out``)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def project(self, query: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries ``[B, m, W]``, keys and values from ``x`` ``[B, n, W]`` -> q ``[B, H, m, d]``; k, v ``[B, H, n, d]``
        (``d = W / heads``)."""
        w = x.shape[-1]
        wq, wkv = self.qkv.weight.split([w, 2 * w])
        bq, bkv = self.qkv.bias.split([w, 2 * w])
        q = F.linear(query, wq, bq)
        k, v = F.linear(x, wkv, bkv).chunk(2, dim=-1)
        return tuple(t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))

    def merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        return self.out(y.transpose(1, 2).flatten(2))

    def value_path(self, x: torch.Tensor) -> torch.Tensor:
        """What the head gives for a token that attends only to itself: ``out(v(x))``, ``[B, n, W]``."""
        w = x.shape[-1]
        return self.out(F.linear(x, self.qkv.weight[2 * w:], self.qkv.bias[2 * w:]))

    def forward(self, query: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.merge_heads(attention(*self.project(query, x)))


class ProbeHead(nn.Module):
    """SigLIP's multihead attention pooling ("MAP") head: one learned probe attends over the tokens, then a
    pre-LayerNorm MLP is added residually: ``y = attn(probe, x, x); y + mlp(ln(y))`` -> ``[B, W]``."""

    def __init__(self, width: int, heads: int, mlp_dim: int, act: str, eps: float):
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, width))
        self.attn = ProbeAttention(width, heads)
        self.ln = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_dim, act)

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.mlp(self.ln(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probe = self.probe.to(x.dtype).expand(x.shape[0], -1, -1)
        return self.finish(self.attn(probe, x))[:, 0]

    @torch.no_grad()
    def init_weights(self) -> None:
        width = self.probe.shape[-1]
        nn.init.normal_(self.probe, std=width**-0.5)
        nn.init.normal_(self.attn.qkv.weight, std=width**-0.5)
        nn.init.zeros_(self.attn.qkv.bias)
        nn.init.normal_(self.attn.out.weight, std=width**-0.5)
        nn.init.zeros_(self.attn.out.bias)
        nn.init.normal_(self.mlp.fc1.weight, std=(2 * width) ** -0.5)
        nn.init.zeros_(self.mlp.fc1.bias)
        nn.init.normal_(self.mlp.fc2.weight, std=width**-0.5)
        nn.init.zeros_(self.mlp.fc2.bias)
