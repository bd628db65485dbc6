"""A Llama-style decoder LM (RMSNorm, rotary positions, grouped-query attention, SwiGLU), e.g. SmolLM2, with the
token-level views of the CLIP towers and a key-value cache for generation.

``LlamaDecoder.forward`` returns a :class:`~cliplab.models.hooks.TowerOutput`: ``tokens`` are the final states after
the last RMSNorm ``[B, n, W]`` (what embeddings pool, and what the LM head reads), ``pooled`` the state of each row's
last real token, and on request ``hidden`` (``layers + 1`` streams: the token embeddings, then each block's output
before the final norm) and ``attn``. Note ``transformers`` reports the *normed* state as its last hidden state; here
``hidden[-1]`` is the raw stream and ``tokens`` the normed one. Hook sites (tower ``"text"``): ``input``,
``attn_bias``, ``attn_probs``, ``resid``, ``tokens``; there is no ``positions`` site, since rotary positions have no
table to edit (pass ``positions=`` to move tokens instead).

Rows are padded on the right: under causal attention a real token never sees the padding after it, so no padding
mask is needed and a row's states do not depend on its batch. Weights load from a GGUF file
(:mod:`cliplab.models.lm.gguf`); q, k, v share one projection and gate, up another (fewer, larger matmuls).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import TOWER, TextTransformer
from ..hooks import Hooks, TowerOutput, attend



@dataclass
class LlamaConfig:
    vocab_size: int = 49152
    width: int = 576
    layers: int = 30
    heads: int = 9
    kv_heads: int = 3
    head_dim: int = 64
    mlp_dim: int = 1536
    eps: float = 1e-5
    rope_theta: float = 100000.0
    max_positions: int = 8192
    tie_embeddings: bool = True

    def validate(self) -> None:
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary positions")


class RMSNorm(nn.Module):
    """``w * x / sqrt(mean(x^2) + eps)``, computed in fp32 whatever the model's precision (as ``transformers``)."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin ``[..., n, head_dim]`` for integer ``positions`` (computed in fp32, then cast)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, n, d]`` by the angles (the half-split convention of ``transformers``' Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of the tokens seen so far, per layer ``[B, kv_heads, t, head_dim]``."""

    def __init__(self, n_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[-2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=-2)
            v = torch.cat([self.values[layer], v], dim=-2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.width, (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.out = nn.Linear(cfg.heads * cfg.head_dim, cfg.width, bias=False)

    def forward(self, x, cos, sin, layer: int, hooks: Hooks, record: bool, cache: KVCache | None,
                causal_mask: torch.Tensor | None):
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, self.heads + 2 * self.kv_heads, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        group = self.heads // self.kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        causal = causal_mask is None and n > 1
        y, probs = attend(q, k, v, causal_mask, TOWER, layer, hooks, record, causal=causal)
        return self.out(y.transpose(1, 2).reshape(b, n, -1)), probs


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.width, cfg.eps)
        self.attn = LlamaAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.width, cfg.eps)
        self.gate_up = nn.Linear(cfg.width, 2 * cfg.mlp_dim, bias=False)
        self.down = nn.Linear(cfg.mlp_dim, cfg.width, bias=False)

    def forward(self, x, *, cos, sin, layer, hooks, record, cache, causal_mask):
        a, probs = self.attn(self.attn_norm(x), cos, sin, layer, hooks, record, cache, causal_mask)
        x = x + a
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up), probs


class LlamaDecoder(TextTransformer):
    #: hook sites of the CLIP towers this model does not have, and why (hook sets refuse them by name)
    missing_sites = {"pos": "rotary positions have no positional table to edit; pass positions= to move tokens"}

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.blocks = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.width, cfg.eps)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.token_embed.weight

    def new_cache(self) -> KVCache:
        return KVCache(len(self.blocks))

    def forward(self, ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: KVCache | None = None, hooks: Hooks | None = None,
                output=False) -> TowerOutput:
        """Token ids ``[B, n]`` (or ``inputs_embeds`` ``[B, n, W]``) -> :class:`TowerOutput` (module docstring).

        ``positions`` ``[n]`` or ``[B, n]`` default to ``cache.length + arange(n)``; with ``cache`` the keys and
        values are appended to it (generation). ``pooled`` is the last position of each row; a padded batch should
        read ``tokens[rows, lengths - 1]`` instead."""
        x, hooks, want = self.begin(ids, inputs_embeds, hooks, output)
        b, n, _ = x.shape
        past = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(past, past + n, device=x.device)
        if int(positions.max()) >= self.cfg.max_positions:
            raise ValueError(f"position {int(positions.max())} beyond the model's {self.cfg.max_positions}")
        cos, sin = rotary_tables(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        if cos.dim() == 3:  # per-row positions [B, n, d] -> broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        causal_mask = None
        if past and n > 1:  # a chunk after cached tokens: query i sees keys up to past + i
            causal_mask = torch.full((n, past + n), float("-inf"), dtype=x.dtype, device=x.device).triu_(past + 1)
        x = hooks.input(TOWER, x)
        x, hidden, attn = self.run_blocks(x, hooks, want, cos=cos, sin=sin, cache=cache, causal_mask=causal_mask)
        tokens = self.norm(x)
        if hooks.edits_tokens(TOWER):
            tokens = hooks.tokens(TOWER, tokens)
        index = torch.full((b,), n - 1, dtype=torch.long, device=x.device)
        out = TowerOutput(tokens[:, -1], index, tokens, hidden, attn)
        if cache is not None:
            out.extras["cache"] = cache
        return out

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """Next-token logits from final (normed) states ``[..., W]``, in fp32."""
        return self.lm_head(states).float()
