"""A CLIP model whose text tower is a frozen LLM embedder followed by a trainable adapter (shared by ``llm2clip`` and
``proclip``).

    from cliplab.longtext.llm_tower import LLMTextCLIP, TextAdapter
    model = LLMTextCLIP(cliplab.load("shapes-tiny"), cliplab.text.load_embedder("all-MiniLM-L6-v2"))
    model.cache_texts(captions)                   # the LLM runs once per distinct text; training reads the cache
    t = model.encode_texts(captions, normalize=True)   # [N, embed_dim]; no 77-token cut
    i = model.encode_images(images, normalize=True)    # the CLIP image tower, unchanged

Where it acts: the embedder's pooled final token states (after its final norm, before any projection: an LLM has
none) go through :class:`TextAdapter` into the CLIP joint space, i.e. the adapter output plays the role of CLIP's
``text_projection`` output. The CLIP model's own text tower is kept (unused by ``encode_texts``) so that the model
saves and loads as an ordinary checkpoint plus an adapter.

Exact: the LLM never receives gradients (its pooled embeddings are computed under ``no_grad`` and cached, and its
weights are not among the model's parameters); the adapter's residual blocks are the identity at initialisation (their
second linear layer starts at zero), so at step 0 the text feature is ``Linear(LN(e))`` of the LLM embedding ``e``.
Texts of any length within the embedder's context (``embedder.max_tokens``: 256 for MiniLM, 2048 here for SmolLM2)
are read whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TextAdapter", "LLMTextCLIP", "load_llm_clip", "LLM_CLIP_CONFIG"]

LLM_CLIP_CONFIG = "cliplab-llm-clip.json"


class TextAdapter(nn.Module):
    """LLM2CLIP's ``TextProj``: ``blocks`` pre-LN residual MLP blocks (hidden width ``expansion * in_dim``), then
    LayerNorm and a linear map to ``out_dim``. The residual branches start at zero (identity blocks).
    ``normalize_input`` L2-normalises the LLM embedding first (ProCLIP's adapter: 1 block of expansion 8)."""

    def __init__(self, in_dim: int, out_dim: int, blocks: int = 4, expansion: int = 2,
                 normalize_input: bool = False):
        super().__init__()
        if blocks < 0 or expansion < 1:
            raise ValueError(f"blocks must be >= 0 and expansion >= 1, got {blocks}, {expansion}")
        self.in_dim, self.out_dim, self.expansion = in_dim, out_dim, expansion
        self.normalize_input = normalize_input
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, expansion * in_dim), nn.GELU(),
                          nn.Linear(expansion * in_dim, in_dim)) for _ in range(blocks))
        for b in self.blocks:  # identity at initialisation: the residual branch adds exactly zero
            nn.init.zeros_(b[-1].weight)
            nn.init.zeros_(b[-1].bias)
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, out_dim)

    def config(self) -> dict:
        return {"in_dim": self.in_dim, "out_dim": self.out_dim, "blocks": len(self.blocks),
                "expansion": self.expansion, "normalize_input": self.normalize_input}

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The residual blocks only (identity at initialisation; after the L2 norm with ``normalize_input``)."""
        if self.normalize_input:
            x = F.normalize(x, dim=-1)
        for b in self.blocks:
            x = x + b(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(self.trunk(x)))


class LLMTextCLIP(nn.Module):
    """``clip``'s image tower with ``embedder`` (frozen) + :class:`TextAdapter` as its text tower (module docstring).

    ``pooling`` is the embedder pooling used (``None``: the embedder's default). Embeddings of texts seen by
    :meth:`cache_texts` (or encoded before, with ``cache=True``) are read from memory, not recomputed."""

    def __init__(self, clip, embedder, adapter: TextAdapter | None = None, pooling: str | None = None,
                 adapter_blocks: int = 4, embedder_name: str | None = None):
        super().__init__()
        self.clip = clip
        # a TextEmbedder, not a submodule: its weights are not this model's parameters (an optimizer built on
        # model.parameters() never sees them), and it only runs under no_grad
        self.embedder = embedder
        self.pooling = pooling or embedder.default_pooling
        self.embedder_name = embedder_name or embedder.name
        self.adapter = adapter if adapter is not None else TextAdapter(embedder.dim, clip.config.embed_dim,
                                                                       blocks=adapter_blocks)
        if self.adapter.in_dim != embedder.dim or self.adapter.out_dim != clip.config.embed_dim:
            raise ValueError(f"adapter maps {self.adapter.in_dim}->{self.adapter.out_dim}, the towers need "
                             f"{embedder.dim}->{clip.config.embed_dim}")
        self.cache: dict[str, torch.Tensor] = {}

    # --- the text side -----------------------------------------------------------------------------------------
    @property
    def max_tokens(self) -> int:
        return self.embedder.max_tokens

    @torch.no_grad()
    def cache_texts(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> int:
        """Run the frozen LLM once on the texts not yet cached; returns how many were new."""
        new = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if new:
            vecs = self.embedder.encode(new, pooling=self.pooling, batch_size=batch_size, progress=progress)
            self.cache.update(zip(new, vecs.float()))
        return len(new)

    @torch.no_grad()
    def llm_embeddings(self, texts: Sequence[str], cache: bool = True) -> torch.Tensor:
        """``[N, embedder.dim]`` pooled LLM embeddings (no gradient ever reaches the LLM)."""
        if isinstance(texts, str):
            raise TypeError("pass a list of texts; wrap a single text in a list")
        if cache:
            self.cache_texts(texts)
            return torch.stack([self.cache[t] for t in texts]) if texts else torch.empty(0, self.embedder.dim)
        return self.embedder.encode(list(texts), pooling=self.pooling).float()

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, normalize: bool = False,
                     cache: bool = True) -> torch.Tensor:
        """``[N, embed_dim]`` text features in the joint space (gradients flow into the adapter only)."""
        x = self.llm_embeddings(texts, cache=cache).to(self.adapter.proj.weight)
        out = self.adapter(x)
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(self, texts: Sequence[str], normalize: bool = False) -> torch.Tensor:
        """Same as :meth:`encode_texts` (the LLM tower reads raw texts, not CLIP token ids)."""
        if isinstance(texts, torch.Tensor) or hasattr(texts, "ids"):
            raise TypeError("the LLM text tower reads texts: pass a list of strings, not CLIP token ids")
        return self.encode_texts(texts, normalize=normalize)

    # --- the image side (the CLIP model's) ---------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.clip.encode_image(pixels, normalize=normalize)

    def encode_images(self, images: Iterable, batch_size: int = 64, normalize: bool = False) -> torch.Tensor:
        return self.clip.encode_images(images, batch_size=batch_size, normalize=normalize)

    @property
    def preprocessor(self):
        return self.clip.preprocessor

    def preprocess(self, image) -> torch.Tensor:
        return self.clip.preprocess(image)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    @property
    def config(self):
        return self.clip.config

    def describe(self) -> str:
        """One line naming the text tower (what ``cliplab info`` should print)."""
        return (f"text tower: {self.embedder_name} ({self.pooling} pooling, {self.embedder.dim}-d, up to "
                f"{self.max_tokens} tokens) + adapter ({len(self.adapter.blocks)} residual blocks) -> "
                f"{self.adapter.out_dim}-d")

    # --- saving ------------------------------------------------------------------------------------------------
    def save(self, directory, embedder_ref: str | None = None) -> Path:
        """``directory/clip`` (the CLIP checkpoint, ``clip.save``), ``adapter.safetensors`` and
        :data:`LLM_CLIP_CONFIG`. The embedder is stored by reference (``embedder_ref``, default its name: a
        registered name or a saved-embedder directory that ``cliplab.text.load_embedder`` reads)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.clip.save(directory / "clip")
        save_file({k: v.detach().float().contiguous() for k, v in self.adapter.state_dict().items()},
                  str(directory / "adapter.safetensors"))
        meta = {"format": "cliplab-llm-clip", "format_version": 1, "embedder": embedder_ref or self.embedder_name,
                "pooling": self.pooling, "adapter": self.adapter.config()}
        (directory / LLM_CLIP_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        return directory


def load_llm_clip(directory, embedder=None) -> LLMTextCLIP:
    """Read back :meth:`LLMTextCLIP.save`; ``embedder`` (a loaded one) skips loading it by reference."""
    from safetensors.torch import load_file

    from ..models import load
    from ..text import load_embedder

    directory = Path(directory)
    path = directory / LLM_CLIP_CONFIG
    if not path.is_file():
        raise ValueError(f"{directory}: no {LLM_CLIP_CONFIG}; save the model with LLMTextCLIP.save(directory)")
    meta = json.loads(path.read_text())
    emb = embedder if embedder is not None else load_embedder(meta["embedder"])
    adapter = TextAdapter(**meta["adapter"])
    adapter.load_state_dict(load_file(str(directory / "adapter.safetensors")))
    return LLMTextCLIP(load(str(directory / "clip")), emb, adapter, pooling=meta["pooling"],
                       embedder_name=meta["embedder"]).eval()
