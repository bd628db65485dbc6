"""The two CLIP towers: a ViT image encoder (CLS pooling) and a causal text transformer (EOT pooling)."""

from __future__ import annotations

import torch
from torch import nn

from .config import TextConfig, VisionConfig
from .transformer import Transformer


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int, eps: float):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.patch_embed = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(w))
        self.pos_embed = nn.Parameter(torch.empty(cfg.num_positions, w))
        self.ln_pre = nn.LayerNorm(w, eps=eps)
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.act, eps)
        self.ln_post = nn.LayerNorm(w, eps=eps)
        self.proj = nn.Linear(w, embed_dim, bias=False)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` -> token sequence ``[B, 1 + grid**2, width]`` (CLS first, positions added)."""
        if pixels.shape[-2:] != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(
                f"expected images of {self.cfg.image_size}x{self.cfg.image_size}, got {tuple(pixels.shape[-2:])}; "
                "use model.preprocess(...) to resize"
            )
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed.to(x.dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.transformer(self.ln_pre(self.embed(pixels)))
        return self.proj(self.ln_post(x[:, 0]))

    @torch.no_grad()
    def init_weights(self) -> None:
        scale = self.cfg.width**-0.5
        nn.init.normal_(self.patch_embed.weight, std=0.02)
        nn.init.normal_(self.class_embedding, std=scale)
        nn.init.normal_(self.pos_embed, std=scale)
        nn.init.normal_(self.proj.weight, std=scale)
        self.transformer.init_weights()


class TextTower(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int, eps: float):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.token_embed = nn.Embedding(cfg.vocab_size, w)
        self.pos_embed = nn.Parameter(torch.empty(cfg.context_length, w))
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.act, eps)
        self.ln_final = nn.LayerNorm(w, eps=eps)
        self.proj = nn.Linear(w, embed_dim, bias=False)

    def eot_index(self, ids: torch.Tensor) -> torch.Tensor:
        """Position of the first end-of-text token in each row (the pooled position).

        Rows without one fall back to the position of the largest id, which is what OpenAI's code does for every row.
        """
        is_eot = ids == self.cfg.eot_token_id
        return torch.where(is_eot.any(-1), is_eot.int().argmax(-1), ids.argmax(-1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[-1] > self.cfg.context_length:
            raise ValueError(f"token ids have length {ids.shape[-1]} > context length {self.cfg.context_length}")
        eot = self.eot_index(ids)
        # Causal attention means nothing after the EOT token can change the pooled output: cut the batch to its
        # longest real sequence (an exact saving; padding to 77 wastes most of the compute on short captions).
        ids = ids[:, : int(eot.max()) + 1]
        x = self.token_embed(ids) + self.pos_embed[: ids.shape[1]]
        x = self.ln_final(self.transformer(x, causal=True))
        return self.proj(x[torch.arange(x.shape[0], device=x.device), eot])

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        nn.init.normal_(self.proj.weight, std=self.cfg.width**-0.5)
        self.transformer.init_weights()
