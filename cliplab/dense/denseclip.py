"""DenseCLIP: pixel-text score maps with context-aware prompting, for semantic segmentation.

Paper: *DenseCLIP: Language-Guided Dense Prediction with Context-Aware Prompting*, Yongming Rao, Wenliang Zhao,
Guangyi Chen, Yansong Tang, Zheng Zhu, Guan Huang, Jie Zhou, Jiwen Lu (CVPR 2022); official code
``raoyongming/DenseCLIP`` (``segmentation/denseclip``), read to understand it.

The method, as implemented here (shapes are ``B`` images, ``K`` classes, ``N = gh * gw`` positions, ``D`` the joint
embedding width):

* **Dense visual embeddings** ``z`` ``[B, N, D]`` and a global one ``[B, D]``: the image tower's token-level view
  ``encode_image(pixels, output="tokens")`` (:mod:`cliplab.models.hooks`): row 0 is the pooled embedding, rows
  ``1..N`` every position in the joint space. For a ViT that is every patch token after ``ln_post`` and ``proj``
  (plus the max-skip stem feature of its own cell in ``shapes-tiny``); for an OpenAI ResNet, the attention pool's
  value path per position, ``out(v(x_i + pos_i))``.
* **Text with learnable context** (CoOp-style): each class prompt is ``[SOT] ctx_1 .. ctx_n [class name tokens]
  [EOT]``: ``n_ctx`` trainable vectors of the text tower's width inserted right after SOT through the tower's
  ``inputs_embeds`` path (:meth:`cliplab.models.CLIP.encode_text`), so they sit at positions ``1..n_ctx`` and the EOT
  (the pooled position) moves ``n_ctx`` places to the right. The text tower is frozen (the paper's lr multiplier 0);
  gradients reach only the context vectors. ``t`` ``[K, D]``.
* **Post-model context-aware prompting**: ``t' = t + gamma * ContextDecoder(t, [global; z])``, per image: a
  transformer decoder (text as queries, the ``1 + N`` visual tokens as memory; pre-norm self-attention, cross
  attention, MLP; ``LayerNorm + Linear`` in and out projections), ``gamma`` ``[D]`` learnable, initialised to
  ``1e-4``.
* **Score maps** ``s[b, k, h, w] = <z_bhw / |z_bhw|, t'_bk / |t'_bk|>`` (a plain cosine, no temperature).
* **Auxiliary loss**: cross-entropy of ``s / tau`` (``tau = 0.07``), bilinearly upsampled to the label size, against
  the ground-truth segmentation, weight ``0.4``; added to the head's cross-entropy.

Choices that differ from the paper / official code, and why:

* **Head.** The paper concatenates the score maps to the last ResNet stage (2048 + K channels) and feeds all four
  stages to a semantic FPN. Here the score maps are concatenated to the dense embeddings ``z`` themselves
  (``D + K`` channels at the token grid) and a light conv head (3x3 conv, GroupNorm, ReLU, 3x3 conv, GroupNorm,
  ReLU, 1x1 conv to ``K``) predicts at the grid; the logits are bilinearly upsampled to the image. The same head
  serves a ViT and a ResNet (whose only token-level view is the pool's), and with 64 px images the grid is 8x8 (ViT
  ``shapes-tiny``) or 2x2 (``test-tiny-resnet``), too small for a feature pyramid.
* **ResNet dense features.** The official code runs the attention pool with *every* position as a query (full
  self-attention over ``[mean; positions]``); the repository's ResNet token view is the value path alone (each
  position attending only to itself, MaskCLIP's reading), which is what is used here.
* **Backbone.** The paper fine-tunes the image encoder at 0.1x the learning rate for 80k iterations. On 2 CPU cores
  the default here is a **frozen** image encoder (``backbone_lr_mult=0``), which lets :func:`fit_denseclip` encode
  the training images once; ``backbone_lr_mult > 0`` fine-tunes it (slow on CPU: every step runs the image tower).
* **Sizes.** Context decoder width 64 (paper 256), 4 heads, 3 layers, dropout 0.1 (paper's); 8 context tokens;
  AdamW, lr 1e-3 (paper 1e-4, for a run 100x shorter), weight decay 1e-4.
* **Context initialisation.** Normal, std 0.02 (CoOp's initialisation, the scale of the tower's token embeddings);
  the official code uses ``trunc_normal_`` with its default std 1 (``ctx_init_std=1.0`` reproduces that).
* **Class texts.** The class name alone after the context (the paper's), ``template="{}"``; the background class is
  the word "background". The fixed-prompt control is ``n_ctx=0, context_decoder=False, template="a photo of a {}."``.

Public API: :class:`DenseCLIPConfig`, :class:`ContextDecoder`, :class:`DenseCLIPSegmenter` (``forward``,
``predict``, ``segment``, ``segmentation_result``, ``save``/``load``), :func:`score_map`, :func:`encode_segmentation`,
:func:`fit_denseclip`, :func:`evaluate_segmenter`. Command line: ``cliplab segment IMAGES --method denseclip
--checkpoint DIR`` with a directory written by :meth:`DenseCLIPSegmenter.save`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..methods import register_method
from .data import IGNORE
from .metrics import SegmentationMeter

__all__ = ["DenseCLIPConfig", "ContextDecoder", "DenseCLIPOutput", "DenseCLIPSegmenter", "score_map",
           "fit_denseclip", "evaluate_segmenter", "dense_features", "encode_segmentation",
           "EncodedSegmentation"]

register_method(
    "denseclip",
    "DenseCLIP: Language-Guided Dense Prediction with Context-Aware Prompting",
    "pixel-text score maps from dense CLIP embeddings, learnable context tokens + a vision-to-language context "
    "decoder (t' = t + gamma * dec(t, [g; z])), score-map auxiliary loss; a fitted, saveable segmenter",
    doc="docs/methods/denseclip.md",
)(__name__)

CONFIG_FILE = "denseclip.json"
WEIGHTS_FILE = "denseclip.safetensors"
CLIP_DIR = "clip"
FORMAT = "cliplab-denseclip"


@dataclass
class DenseCLIPConfig:
    """Everything that shapes a :class:`DenseCLIPSegmenter` (saved with it). See the module docstring."""

    classes: tuple[str, ...]
    template: str = "{}"
    n_ctx: int = 8
    ctx_init_std: float = 0.02
    context_decoder: bool = True
    decoder_width: int = 64
    decoder_heads: int = 4
    decoder_layers: int = 3
    decoder_dropout: float = 0.1
    gamma_init: float = 1e-4
    score_concat: bool = True   # feed the score maps to the head (False: the head sees z only)
    head_width: int = 64
    tau: float = 0.07
    aux_weight: float = 0.4     # 0: no score-map loss
    source: str = ""            # the CLIP model it was built from (informational)

    def __post_init__(self):
        self.classes = tuple(self.classes)
        if len(self.classes) < 2:
            raise ValueError(f"DenseCLIP needs at least two classes (background and one more), got {self.classes}")
        if "{}" not in self.template:
            raise ValueError(f"template must contain '{{}}' where the class name goes, got {self.template!r}")
        if self.n_ctx < 0 or self.decoder_layers < 1 or self.head_width < 1 or self.tau <= 0 or self.aux_weight < 0:
            raise ValueError("n_ctx >= 0, decoder_layers >= 1, head_width >= 1, tau > 0 and aux_weight >= 0 are needed")
        if self.decoder_width % self.decoder_heads:
            raise ValueError(f"decoder_width {self.decoder_width} must be a multiple of decoder_heads "
                             f"{self.decoder_heads}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["classes"] = list(self.classes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DenseCLIPConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DenseCLIP config keys {unknown}; known: {sorted(known)}")
        return cls(**d)


# --- context decoder ------------------------------------------------------------------------------------------------
class _Attention(nn.Module):
    """Multi-head attention without q/k/v biases (the official decoder's), dropout on the output projection."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(width, width, bias=False) for _ in range(3))
        self.out = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape

        def split(t):
            return t.view(b, t.shape[1], self.heads, c // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(memory)), split(self.v(memory)))
        return self.drop(self.out(y.transpose(1, 2).reshape(b, n, c)))


class _DecoderLayer(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.self_attn = _Attention(width, heads, dropout)
        self.cross_attn = _Attention(width, heads, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q = self.norm1(x)
        x = x + self.self_attn(q, q)
        x = x + self.cross_attn(self.norm2(x), memory)
        return x + self.drop(self.mlp(self.norm3(x)))


class ContextDecoder(nn.Module):
    """Text ``[B, K, D]`` attends to visual context ``[B, M, D]``; returns an update ``[B, K, D]`` (DenseCLIP's
    vision-to-language decoder: LayerNorm + Linear into ``width``, ``layers`` pre-norm decoder layers, LayerNorm +
    Linear back to ``D``)."""

    def __init__(self, dim: int, width: int = 64, heads: int = 4, layers: int = 3, dropout: float = 0.1):
        super().__init__()
        self.memory_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width), nn.LayerNorm(width))
        self.text_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width))
        self.layers = nn.ModuleList(_DecoderLayer(width, heads, dropout) for _ in range(layers))
        self.out_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:  # the official decoder's: truncated normal 0.02 weights, zero biases
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        memory = self.memory_proj(visual)
        x = self.text_proj(text)
        for layer in self.layers:
            x = layer(x, memory)
        return self.out_proj(x)


# --- pieces ---------------------------------------------------------------------------------------------------------
def score_map(z: torch.Tensor, text: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Cosine of every position's embedding with every class text: ``z`` ``[B, N, D]``, ``text`` ``[B, K, D]`` (or
    ``[K, D]``) -> ``[B, K, gh, gw]``."""
    if text.dim() == 2:
        text = text.expand(z.shape[0], -1, -1)
    s = torch.einsum("bnd,bkd->bkn", F.normalize(z, dim=-1), F.normalize(text, dim=-1))
    return s.reshape(z.shape[0], text.shape[1], *grid)


def dense_features(clip, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """``(global [B, D], z [B, N, D], (gh, gw))`` from the image tower's token view (fp32)."""
    out = clip.encode_image(pixels.to(clip.device), output="tokens")
    tokens = out.tokens.float()
    return tokens[:, 0], tokens[:, 1:], tuple(out.extras["grid"])


@dataclass
class DenseCLIPOutput:
    """``logits`` ``[B, K, gh, gw]`` (the head's), ``score`` ``[B, K, gh, gw]`` (the score maps), ``text``
    ``[B, K, D]`` (``t'``)."""

    logits: torch.Tensor
    score: torch.Tensor
    text: torch.Tensor


class DenseCLIPSegmenter(nn.Module):
    """A CLIP model with DenseCLIP's prompting, score maps and a segmentation head (see the module docstring).

    ``clip`` is used as given (its text tower is frozen here; the image tower is trained only when
    :func:`fit_denseclip` is asked to)."""

    def __init__(self, clip, config: DenseCLIPConfig):
        super().__init__()
        self.clip = clip
        self.config = config
        for p in clip.text.parameters():
            p.requires_grad_(False)
        k, dim = len(config.classes), clip.config.embed_dim
        ids = clip.tokenize([config.template.format(c) for c in config.classes]).ids
        eot = clip.text.eot_index(ids)
        ids = ids[:, : int(eot.max()) + 1]  # causal + EOT pooling: nothing after the longest EOT matters
        if ids.shape[1] + config.n_ctx > clip.config.text.context_length:
            raise ValueError(f"class prompts of {ids.shape[1]} tokens + {config.n_ctx} context tokens exceed the text "
                             f"context length {clip.config.text.context_length}; use fewer context tokens")
        self.register_buffer("prompt_ids", ids, persistent=False)
        self.ctx = nn.Parameter(torch.empty(config.n_ctx, clip.config.text.width))
        nn.init.trunc_normal_(self.ctx, std=config.ctx_init_std, a=-2 * config.ctx_init_std,
                              b=2 * config.ctx_init_std)
        self.decoder = (ContextDecoder(dim, config.decoder_width, config.decoder_heads, config.decoder_layers,
                                       config.decoder_dropout) if config.context_decoder else None)
        self.gamma = nn.Parameter(torch.full((dim,), float(config.gamma_init))) if config.context_decoder else None
        c_in = dim + (k if config.score_concat else 0)
        w = config.head_width
        groups = math.gcd(w, 8)
        self.head = nn.Sequential(nn.Conv2d(c_in, w, 3, padding=1), nn.GroupNorm(groups, w), nn.ReLU(),
                                  nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(groups, w), nn.ReLU(),
                                  nn.Conv2d(w, k, 1))
        self._fixed_text = None  # cached t when nothing in it trains (n_ctx == 0)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.config.classes

    # --- text -------------------------------------------------------------------------------------------------------
    def prompt_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeds [K, L + n_ctx, W], eot [K])``: SOT, the context vectors at positions ``1..n_ctx``, then the
        class prompt's tokens; the EOT index shifted by ``n_ctx``."""
        tok = self.clip.text.token_embed(self.prompt_ids)
        ctx = self.ctx.to(tok.dtype).expand(tok.shape[0], -1, -1)
        embeds = torch.cat([tok[:, :1], ctx, tok[:, 1:]], dim=1)
        return embeds, self.clip.text.eot_index(self.prompt_ids) + self.config.n_ctx

    def text_embeddings(self) -> torch.Tensor:
        """``t`` ``[K, D]``: the class prompts through the frozen text tower (with the context tokens, if any)."""
        if self.config.n_ctx == 0:
            if self._fixed_text is None or self._fixed_text.device != self.prompt_ids.device:
                with torch.no_grad():
                    self._fixed_text = self.clip.encode_text(self.prompt_ids).float()
            return self._fixed_text
        embeds, eot = self.prompt_embeddings()
        return self.clip.encode_text(inputs_embeds=embeds, eot_index=eot).pooled.float()

    def contextual_text(self, text: torch.Tensor, global_feat: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``t' = t + gamma * ContextDecoder(t, [global; z])`` ``[B, K, D]`` (``t`` repeated per image without a
        decoder)."""
        text = text.expand(z.shape[0], -1, -1)
        if self.decoder is None:
            return text
        visual = torch.cat([global_feat[:, None], z], dim=1)
        return text + self.gamma * self.decoder(text, visual)

    # --- forward ----------------------------------------------------------------------------------------------------
    def forward_features(self, global_feat: torch.Tensor, z: torch.Tensor, grid: tuple[int, int]) -> DenseCLIPOutput:
        """The method on precomputed dense features (see :func:`dense_features`)."""
        text = self.contextual_text(self.text_embeddings(), global_feat, z)
        score = score_map(z, text, grid)
        fmap = z.transpose(1, 2).reshape(z.shape[0], z.shape[2], *grid)
        inputs = torch.cat([fmap, score], dim=1) if self.config.score_concat else fmap
        return DenseCLIPOutput(self.head(inputs), score, text)

    def forward(self, pixels: torch.Tensor) -> DenseCLIPOutput:
        """Preprocessed ``pixels`` ``[B, 3, S, S]`` -> :class:`DenseCLIPOutput` at the token grid."""
        return self.forward_features(*dense_features(self.clip, pixels))

    def loss(self, out: DenseCLIPOutput, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Head cross-entropy + ``aux_weight`` x cross-entropy of ``score / tau``, both upsampled to ``labels``
        ``[B, H, W]`` (``IGNORE`` pixels skipped)."""
        size = labels.shape[-2:]
        head = F.cross_entropy(_upsample(out.logits, size), labels, ignore_index=IGNORE)
        parts = {"head": float(head.detach())}
        total = head
        if self.config.aux_weight > 0:
            aux = F.cross_entropy(_upsample(out.score / self.config.tau, size), labels, ignore_index=IGNORE)
            total = total + self.config.aux_weight * aux
            parts["aux"] = float(aux.detach())
        parts["loss"] = float(total.detach())
        return total, parts

    @torch.no_grad()
    def predict(self, pixels: torch.Tensor, size: tuple[int, int] | None = None, use: str = "head") -> torch.Tensor:
        """``[B, H, W]`` class indices: the head's logits (``use="head"``) or the score maps (``use="score"``),
        bilinearly upsampled to ``size`` (default: the pixels' size)."""
        if use not in ("head", "score"):
            raise ValueError(f"use must be 'head' or 'score', got {use!r}")
        out = self(pixels)
        maps = out.logits if use == "head" else out.score
        return _upsample(maps, size or tuple(pixels.shape[-2:])).argmax(1)

    @torch.no_grad()
    def _image_maps(self, images: Sequence, batch_size: int, use: str):
        """Per image (PIL or path): its ``(head logits, score maps)`` ``[K, gh, gw]`` and its ``(H, W)``. Images are
        resized to the model's square input without cropping (as :func:`cliplab.dense.segment.segment` does), so
        the maps cover the whole image."""
        from .segment import prepare_images

        if use not in ("head", "score"):
            raise ValueError(f"use must be 'head' or 'score', got {use!r}")
        was = self.training
        self.eval()
        try:
            for i in range(0, len(images), batch_size):
                pixels, sizes = prepare_images(self.clip, list(images[i : i + batch_size]))
                out = self(pixels.to(self.clip.device))
                yield from zip(out.logits, out.score, sizes)
        finally:
            self.train(was)

    @torch.no_grad()
    def segment(self, images: Sequence, size: tuple[int, int] | None = None, batch_size: int = 32,
                use: str = "head") -> list[np.ndarray]:
        """PIL images (or paths) -> one ``int64 [H, W]`` label map each (``0`` background, ``k`` ->
        ``classes[k]``), at ``size`` or each image's own size: the head's logits (``use="head"``) or the score maps
        (``use="score"``) upsampled bilinearly, then the argmax."""
        out = []
        for logits, score, own in self._image_maps(images, batch_size, use):
            maps = logits if use == "head" else score
            out.append(_upsample(maps[None], size or own)[0].argmax(0).cpu().numpy().astype(np.int64))
        return out

    @torch.no_grad()
    def segmentation_result(self, images: Sequence, batch_size: int = 32):
        """:func:`segment`'s output as a :class:`cliplab.dense.segment.SegmentationResult` (what ``cliplab segment``
        saves): the head's masks at each image's size, and the score maps (cosines) as ``maps``."""
        from .segment import SegmentationResult

        masks, maps = [], []
        for logits, score, own in self._image_maps(images, batch_size, "head"):
            masks.append(_upsample(logits[None], own)[0].argmax(0).cpu())
            maps.append(_upsample(score[None], own)[0].float().cpu())
        return SegmentationResult(masks, maps, self.classes, method="denseclip", background="class")

    # --- saving -----------------------------------------------------------------------------------------------------
    def own_state(self) -> dict[str, torch.Tensor]:
        """The method's tensors (context, decoder, gamma, head), without the CLIP model's."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("clip.")}

    def save(self, directory: str | Path) -> Path:
        """``directory/clip`` (the CLIP model, native format), ``denseclip.json`` and ``denseclip.safetensors``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.clip.save(directory / CLIP_DIR)
        save_file({k: v.detach().float().contiguous().cpu() for k, v in self.own_state().items()},
                  str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
        meta = {"format": FORMAT, "format_version": 1, "config": self.config.to_dict()}
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device | None = None) -> "DenseCLIPSegmenter":
        """A segmenter saved with :meth:`save` (safetensors only; nothing is unpickled)."""
        from safetensors.torch import load_file

        from ..models import CheckpointError
        from ..models.loading import load as load_clip

        directory = Path(directory)
        path = directory / CONFIG_FILE
        if not path.is_file():
            raise CheckpointError(f"{directory}: no {CONFIG_FILE} (not a saved DenseCLIP segmenter; save one with "
                                  "DenseCLIPSegmenter.save)")
        meta = json.loads(path.read_text())
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        clip = load_clip(str(directory / CLIP_DIR))
        seg = cls(clip, DenseCLIPConfig.from_dict(meta["config"]))
        state = load_file(str(directory / WEIGHTS_FILE))
        own = seg.own_state()
        if set(state) != set(own):
            raise CheckpointError(f"{directory / WEIGHTS_FILE}: tensors {sorted(set(state) ^ set(own))} do not match "
                                  "the config")
        seg.load_state_dict({**seg.clip.state_dict(prefix="clip."), **state}, strict=True)
        seg.eval()
        return seg.to(device) if device is not None else seg


def load_for_cli(directory, labels: Sequence[str] | None = None, precision: str = "fp32") -> DenseCLIPSegmenter:
    """What ``cliplab segment --method denseclip --checkpoint DIR`` runs: the saved segmenter; ``labels``, when
    given, must be its classes after the background (a trained head cannot take new ones)."""
    seg = DenseCLIPSegmenter.load(directory)
    if labels is not None and [s.lower() for s in labels] != [c.lower() for c in seg.classes[1:]]:
        raise ValueError(f"{directory} was trained on {', '.join(seg.classes[1:])} (after {seg.classes[0]!r}); "
                         "leave --labels out, or pass exactly those")
    if precision != "fp32":
        seg.clip.set_precision(precision)
    return seg


def _upsample(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


# --- training -------------------------------------------------------------------------------------------------------
def _labels(samples) -> torch.Tensor:
    return torch.from_numpy(np.stack([s.label for s in samples])).long()


@dataclass
class EncodedSegmentation:
    """A segmentation dataset as tensors: preprocessed ``pixels`` ``[n, 3, S, S]``, ``labels`` ``[n, H, W]`` and,
    for a frozen image tower, its dense ``features`` ``(global [n, D], z [n, N, D], grid)``
    (:func:`encode_segmentation`); lets several fits share one encoding of the images."""

    pixels: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    features: tuple | None = None


@torch.no_grad()
def encode_segmentation(clip, dataset, features: bool = True, batch_size: int = 64) -> EncodedSegmentation:
    """Preprocess every sample of ``dataset`` and (``features``) run the image tower once on them."""
    samples = [dataset[i] for i in range(len(dataset))]
    pixels = clip.preprocessor.batch([s.image for s in samples])
    feats = None
    if features:
        parts = [dense_features(clip, pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
        feats = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), parts[0][2])
    return EncodedSegmentation(pixels, _labels(samples), tuple(dataset.classes), feats)


def fit_denseclip(clip, dataset, config: DenseCLIPConfig | None = None, *, steps: int = 200, batch_size: int = 16,
                  lr: float = 1e-3, weight_decay: float = 1e-4, backbone_lr_mult: float = 0.0, seed: int = 0,
                  progress: bool = False, encoded: EncodedSegmentation | None = None,
                  **overrides) -> DenseCLIPSegmenter:
    """Fit a :class:`DenseCLIPSegmenter` on ``dataset`` (segmentation samples: ``.image``, ``.label``, ``.classes``).

    ``config`` defaults to ``DenseCLIPConfig(classes=dataset.classes)``; keyword ``overrides`` replace its fields
    (``n_ctx=0``, ``aux_weight=0``, ...). AdamW on the context, decoder, ``gamma`` and head at ``lr``; the image tower
    at ``lr * backbone_lr_mult`` (``0``, the default: frozen, and its features are computed once); the text tower is
    frozen. ``steps`` batches of ``batch_size`` samples drawn with a generator seeded by ``seed``, which also seeds
    the new parameters' initialisation. ``encoded``: the dataset already through :func:`encode_segmentation` with
    this ``clip`` (its features are reused when the image tower is frozen). The result has ``history`` (one record
    per step) and ``fit_settings``. The image tower's ``requires_grad`` flags are set (off when frozen).
    """
    if steps < 1 or batch_size < 1 or lr < 0 or backbone_lr_mult < 0:
        raise ValueError("steps >= 1, batch_size >= 1, lr >= 0 and backbone_lr_mult >= 0 are needed")
    classes = tuple(dataset.classes)
    config = dataclasses.replace(config, **overrides) if config is not None else DenseCLIPConfig(classes, **overrides)
    if tuple(config.classes) != classes:
        raise ValueError(f"config classes {config.classes} differ from the dataset's {classes}")
    if not config.source:
        config.source = clip.config.name
    frozen = backbone_lr_mult == 0
    for p in clip.visual.parameters():
        p.requires_grad_(not frozen)
    if encoded is not None and (encoded.classes != classes or len(encoded.labels) != len(dataset)):
        raise ValueError("encoded= must be encode_segmentation(clip, dataset) of this dataset")
    if encoded is None or (frozen and encoded.features is None):
        encoded = encode_segmentation(clip, dataset, features=frozen)
    data = encoded
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        seg = DenseCLIPSegmenter(clip, config).to(clip.device)
    own = [p for n, p in seg.named_parameters() if not n.startswith("clip.")]
    groups = [{"params": own, "lr": lr}]
    if not frozen:
        groups.append({"params": list(clip.visual.parameters()), "lr": lr * backbone_lr_mult})
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    seg.train()
    clip.text.eval()
    if frozen:
        clip.visual.eval()
    history = []
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)  # dropout
        for step in range(steps):
            idx = torch.randint(len(data.labels), (min(batch_size, len(data.labels)),), generator=gen)
            labels = data.labels[idx].to(clip.device)
            if frozen:
                g, z, grid = data.features
                out = seg.forward_features(g[idx].to(clip.device), z[idx].to(clip.device), grid)
            else:
                out = seg(data.pixels[idx])
            loss, parts = seg.loss(out, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append({"step": step + 1, "batch": len(idx), **parts})
            if progress and ((step + 1) % max(1, steps // 10) == 0 or step + 1 == steps):
                print(f"denseclip step {step + 1}/{steps} loss {parts['loss']:.4f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    seg.eval()
    seg.history = history
    seg.fit_settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                        "backbone_lr_mult": backbone_lr_mult, "seed": seed, "n_train": len(dataset),
                        "seconds": round(time.perf_counter() - t0, 1)}
    return seg


@torch.no_grad()
def evaluate_segmenter(predict, dataset, batch_size: int = 64, include_background: bool = True,
                       use: str = "head") -> dict:
    """mIoU / pixel accuracy (:mod:`cliplab.dense.metrics`) over ``dataset``.

    ``predict``: a :class:`DenseCLIPSegmenter` (its head, or its score maps with ``use="score"``), or any
    ``predict(samples) -> [B, H, W]`` class indices. ``dataset``: segmentation samples, or an
    :class:`EncodedSegmentation` with features (then a segmenter is evaluated on those, without the image tower)."""
    if use not in ("head", "score"):
        raise ValueError(f"use must be 'head' or 'score', got {use!r}")
    encoded = dataset if isinstance(dataset, EncodedSegmentation) else None
    meter = SegmentationMeter(tuple(dataset.classes), include_background=include_background)
    if encoded is not None:
        if not isinstance(predict, DenseCLIPSegmenter) or encoded.features is None:
            raise ValueError("an EncodedSegmentation is evaluated with a DenseCLIPSegmenter on its features "
                             "(encode_segmentation(..., features=True))")
        g, z, grid = encoded.features
        was = predict.training
        predict.eval()
        for i in range(0, len(encoded.labels), batch_size):
            out = predict.forward_features(g[i : i + batch_size].to(predict.clip.device),
                                           z[i : i + batch_size].to(predict.clip.device), grid)
            labels = encoded.labels[i : i + batch_size]
            maps = out.logits if use == "head" else out.score
            meter.update(_upsample(maps, labels.shape[-2:]).argmax(1), labels)
        predict.train(was)
        return meter.result()
    if isinstance(predict, DenseCLIPSegmenter):
        seg = predict

        def predict(samples):
            return torch.from_numpy(np.stack(seg.segment([s.image for s in samples], use=use)))
    for i in range(0, len(dataset), batch_size):
        samples = [dataset[j] for j in range(i, min(i + batch_size, len(dataset)))]
        meter.update(predict(samples), _labels(samples))
    return meter.result()
