"""The CLIP dual encoder with a uniform API: ``encode_image``, ``encode_text``, ``tokenize``, ``preprocess``."""

from __future__ import annotations

import json
import math
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .towers import TextTower, VisionTower

if TYPE_CHECKING:  # imported lazily at run time: the model works on tensors without them
    from .preprocess import Preprocessor
    from .tokenizer import CLIPTokenizer, TokenizedBatch

NATIVE_CONFIG_FILE = "cliplab.json"
NATIVE_WEIGHTS_FILE = "model.safetensors"
NATIVE_FORMAT_VERSION = 1


def _maybe_normalize(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    return F.normalize(x, dim=-1) if normalize else x


class CLIP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        eps = config.layer_norm_eps
        self.visual = VisionTower(config.vision, config.embed_dim, eps)
        self.text = TextTower(config.text, config.embed_dim, eps)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))

    @torch.no_grad()
    def init_weights(self) -> "CLIP":
        self.visual.init_weights()
        self.text.init_weights()
        self.logit_scale.fill_(self.config.init_logit_scale)
        return self

    # --- encoders ----------------------------------------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``[B, 3, S, S]`` preprocessed pixels -> ``[B, embed_dim]`` image features (unnormalised by default)."""
        return _maybe_normalize(self.visual(pixels), normalize)

    def encode_text(self, tokens: "torch.Tensor | TokenizedBatch", normalize: bool = False) -> torch.Tensor:
        """``[B, L]`` token ids (or a :class:`TokenizedBatch`) -> ``[B, embed_dim]`` text features."""
        ids = tokens if isinstance(tokens, torch.Tensor) else tokens.ids
        return _maybe_normalize(self.text(ids.to(self.device)), normalize)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, normalize: bool = False) -> torch.Tensor:
        """Tokenize and encode a list of strings in batches; rows come back in input order."""
        out = [self.encode_text(self.tokenize(list(texts[i : i + batch_size])), normalize)
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.config.embed_dim)

    @torch.no_grad()
    def encode_images(self, images: Iterable, batch_size: int = 64, normalize: bool = False) -> torch.Tensor:
        """Preprocess and encode PIL images or paths in batches."""
        images = list(images)
        out = [self.encode_image(self.preprocessor.batch(images[i : i + batch_size]).to(self.device), normalize)
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.config.embed_dim)

    def forward(self, pixels: torch.Tensor, tokens) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(logits_per_image, logits_per_text)`` like the reference implementations."""
        img = self.encode_image(pixels, normalize=True)
        txt = self.encode_text(tokens, normalize=True)
        logits = self.logit_scale.exp() * img @ txt.t()
        return logits, logits.t()

    # --- text and image front ends -----------------------------------------------------------------------------------
    @cached_property
    def tokenizer(self) -> "CLIPTokenizer":
        from .tokenizer import CLIPTokenizer

        return CLIPTokenizer(context_length=self.config.text.context_length)

    def tokenize(self, texts: str | Sequence[str], truncate: bool = True) -> "TokenizedBatch":
        """Tokenize to this model's context length; truncation is reported (warning + flags), or refused."""
        return self.tokenizer(texts, context_length=self.config.text.context_length, truncate=truncate)

    @cached_property
    def preprocessor(self) -> "Preprocessor":
        from .preprocess import PreprocessConfig, Preprocessor

        return Preprocessor(PreprocessConfig(**vars(self.config.preprocess)))

    def preprocess(self, image) -> torch.Tensor:
        """A PIL image (or path / bytes) -> ``[3, S, S]`` normalised pixels."""
        return self.preprocessor(image)

    # --- bookkeeping -------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text.proj.weight.dtype

    @property
    def temperature(self) -> float:
        return 1.0 / math.exp(float(self.logit_scale))

    def save(self, directory: str | Path) -> Path:
        """Write the native format: ``model.safetensors`` (fp32 as held) + ``cliplab.json`` (config, tokenizer,
        preprocessing). ``cliplab.load(directory)`` reads it back bit-exactly."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / NATIVE_WEIGHTS_FILE), metadata={"format": "cliplab"})
        meta = {"format": "cliplab", "format_version": NATIVE_FORMAT_VERSION, "config": self.config.to_dict()}
        (directory / NATIVE_CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return f"name={self.config.name!r}, params={n / 1e6:.1f}M"
