"""The CLIP dual encoder with a uniform API: ``encode_image``, ``encode_text``, ``tokenize``, ``preprocess``."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .hooks import NO_HOOKS, Hooks, parse_output
from .towers import TextTower, VisionTower

if TYPE_CHECKING:  # imported lazily at run time: the model works on tensors without them
    from .preprocess import Preprocessor
    from .tokenizer import CLIPTokenizer, TokenizedBatch

NATIVE_CONFIG_FILE = "cliplab.json"
NATIVE_WEIGHTS_FILE = "model.safetensors"
NATIVE_FORMAT_VERSION = 1
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _maybe_normalize(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    return F.normalize(x, dim=-1) if normalize else x


def encode_in_length_order(encoder, texts: Sequence[str], batch_size: int, normalize: bool,
                           stacklevel: int = 4) -> torch.Tensor:
    """``encoder.encode_texts`` for any backend with ``tokenizer``, ``config`` and ``encode_text(ids, normalize)``:
    tokenize, sort by token length, encode in batches (each padded only to its own longest text), restore the
    input order. Exact: causal attention and EOT pooling make padding irrelevant to the result. ``stacklevel`` makes
    a truncation warning point at the code that called ``encode_texts``."""
    if not texts:
        return torch.empty(0, encoder.config.embed_dim)
    batch = encoder.tokenizer(list(texts), context_length=encoder.config.text.context_length,
                              stacklevel=stacklevel)
    order = torch.argsort(batch.lengths, stable=True)
    out = torch.empty(len(texts), encoder.config.embed_dim)
    for i in range(0, len(texts), batch_size):
        rows = order[i : i + batch_size]
        out[rows] = encoder.encode_text(batch.ids[rows], normalize).float().cpu()
    return out


class CLIP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        eps = config.layer_norm_eps
        if config.vision.is_resnet:
            from .resnet import ResNetTower

            self.visual = ResNetTower(config.vision, config.embed_dim)
        else:
            self.visual = VisionTower(config.vision, config.embed_dim, eps)
        self.text = TextTower(config.text, config.embed_dim, eps)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        # SigLIP's learned bias on the pairwise logits; CLIP's softmax models have none.
        bias = config.init_logit_bias
        self.logit_bias = None if bias is None else nn.Parameter(torch.tensor(float(bias)))

    @torch.no_grad()
    def init_weights(self) -> "CLIP":
        self.visual.init_weights()
        self.text.init_weights()
        self.logit_scale.fill_(self.config.init_logit_scale)
        if self.logit_bias is not None:
            self.logit_bias.fill_(self.config.init_logit_bias)
        return self

    # --- encoders ----------------------------------------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor, normalize: bool = False, *, output=False, hooks: Hooks | None = None,
                     keep: torch.Tensor | None = None, prompts: torch.Tensor | None = None):
        """``[B, 3, S, S]`` preprocessed pixels -> ``[B, embed_dim]`` image features (unnormalised by default).

        With ``output`` (``True`` or names from ``"tokens"``, ``"hidden"``, ``"attn"``), ``hooks``, ``keep`` (patch
        indices to keep) or ``prompts`` (extra tokens after CLS), returns a :class:`TowerOutput` instead: the
        token-level view (see :mod:`cliplab.models.hooks`). Asking for nothing extra runs the plain path.
        """
        hooks = hooks if hooks is not None else self.active_hooks
        want = parse_output(output)
        if not want and hooks is None and keep is None and prompts is None:
            return _maybe_normalize(self._plain("image", pixels).float(), normalize)  # fp32 features in fast mode
        out = self.visual.forward_rich(pixels, hooks=(hooks or NO_HOOKS).bind(self), want=want, keep=keep,
                                       prompts=prompts)
        if normalize:
            out.pooled = F.normalize(out.pooled, dim=-1)
        return out

    def encode_text(self, tokens: "torch.Tensor | TokenizedBatch | None" = None, normalize: bool = False, *,
                    output=False, hooks: Hooks | None = None, inputs_embeds: torch.Tensor | None = None,
                    eot_index: torch.Tensor | None = None, keep_padding: bool = False):
        """``[B, L]`` token ids (or a :class:`TokenizedBatch`) -> ``[B, embed_dim]`` text features.

        With ``output``, ``hooks``, ``inputs_embeds`` (token embeddings ``[B, n, W]`` before positions, with
        ``eot_index``) or ``keep_padding``, returns a :class:`TowerOutput` (token-level view); when given a
        ``TokenizedBatch`` its ``extras["batch"]`` holds it (character spans of every token).
        """
        hooks = hooks if hooks is not None else self.active_hooks
        want = parse_output(output)
        ids = None if tokens is None else (tokens if isinstance(tokens, torch.Tensor) else tokens.ids).to(self.device)
        if not want and hooks is None and inputs_embeds is None and not keep_padding:
            if ids is None:
                raise ValueError("encode_text needs token ids (or inputs_embeds)")
            return _maybe_normalize(self._plain("text", ids).float(), normalize)
        out = self.text.forward_rich(ids, inputs_embeds=inputs_embeds, eot_index=eot_index,
                                     hooks=(hooks or NO_HOOKS).bind(self),
                                     want=want, keep_padding=keep_padding)
        if normalize:
            out.pooled = F.normalize(out.pooled, dim=-1)
        if tokens is not None and not isinstance(tokens, torch.Tensor):
            out.extras["batch"] = tokens
        return out

    def _plain(self, tower: str, x: torch.Tensor) -> torch.Tensor:
        """A tower's plain forward: compiled when :meth:`set_compiled` asked for it and no gradients are wanted."""
        compiled = self.__dict__.get("_compiled", {}).get(tower)
        if compiled is None or torch.is_grad_enabled():
            return (self.visual if tower == "image" else self.text)(x)
        return compiled(x) if tower == "image" else self.text(x, padded=compiled)  # the text cut stays eager

    def set_compiled(self, enabled: bool = True, *, freeze: bool = True, mode: str | None = None) -> "CLIP":
        """Run the plain ``encode_image`` / ``encode_text`` paths through ``torch.compile`` (inductor's fused C++
        kernels on CPU; ``freeze`` also pre-packs the weights) when no gradients are wanted; ``mode`` is
        torch.compile's (e.g. ``"max-autotune"``). Opt-in: compiling takes minutes on the first call of each tower
        (``compile_report()`` says how long), then ViT-B/32 runs 1.4x (images) and 1.26x (texts) faster than eager
        in fp32 at the same features (docs/fast_path.md). The token-level API and training stay eager; changed
        weights are noticed and recompiled (:mod:`cliplab.models.compiled`). Returns the model."""
        self.__dict__.pop("_compiled", None)
        if enabled:
            from .compiled import InductorTower

            self.__dict__["_compiled"] = {"image": InductorTower(self.visual, freeze=freeze, mode=mode),
                                          "text": InductorTower(self.text, "forward_padded", freeze=freeze,
                                                                       mode=mode)}
        return self

    @property
    def compiled(self) -> bool:
        """Whether :meth:`set_compiled` is on."""
        return bool(self.__dict__.get("_compiled"))

    def compile_report(self) -> dict[str, float | None]:
        """Seconds each compiled tower's first call took (compilation included; ``None``: not called yet)."""
        return {tower: c.warmup_s for tower, c in self.__dict__.get("_compiled", {}).items()}

    def tower_layers(self) -> dict[str, int]:
        """Blocks per tower, for hook sets (``cliplab.tokens.InterventionSet.bind``)."""
        image = () if self.config.vision.is_resnet else self.visual.transformer.blocks  # a ResNet has no blocks
        return {"text": len(self.text.transformer.blocks), "image": len(image)}

    @property
    def missing_sites(self) -> dict[str, str]:
        """``"tower.place"`` -> why that hook site does not exist in this model (a ResNet image tower has only
        ``tokens``); ``cliplab.tokens`` refuses interventions there with the reason."""
        return {f"image.{place}": why for place, why in getattr(self.visual, "missing_sites", {}).items()}

    # --- hooks made active for every call (``cliplab.tokens.intervene`` manages this) -------------------------------
    active_hooks: Hooks | None = None

    @contextmanager
    def using_hooks(self, hooks: Hooks | None):
        """Within the block, every ``encode_*`` call on this model runs the rich path with ``hooks``."""
        previous = self.__dict__.get("active_hooks")
        self.active_hooks = hooks
        try:
            yield self
        finally:
            if previous is None:
                self.__dict__.pop("active_hooks", None)
            else:
                self.active_hooks = previous

    def set_context_length(self, table: torch.Tensor) -> None:
        """Install a new text positional table ``[n, width]``; context length and tokenizer follow."""
        self.text.resize_positions(table)
        self.__dict__.pop("tokenizer", None)  # rebuilt lazily at the new context length

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, normalize: bool = False) -> torch.Tensor:
        """Tokenize and encode a list of strings; rows come back in input order.

        Texts are sorted by token length before batching, so each batch is padded only to its own longest text (an
        exact saving: causal attention and EOT pooling make padding irrelevant to the result)."""
        return encode_in_length_order(self, texts, batch_size, normalize, stacklevel=5)  # + torch.no_grad's frame

    @torch.no_grad()
    def encode_images(self, images: Iterable, batch_size: int = 64, normalize: bool = False) -> torch.Tensor:
        """Preprocess and encode PIL images or paths in batches."""
        images = list(images)
        out = [self.encode_image(self.preprocessor.batch(images[i : i + batch_size]).to(self.device), normalize)
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.config.embed_dim)

    def forward(self, pixels: torch.Tensor, tokens) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(logits_per_image, logits_per_text)`` like the reference implementations (SigLIP's include its
        learned bias)."""
        img = self.encode_image(pixels, normalize=True)
        txt = self.encode_text(tokens, normalize=True)
        logits = self.logit_scale.exp() * img @ txt.t()
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return logits, logits.t()

    # --- text and image front ends -----------------------------------------------------------------------------------
    #: the tokenizer its checkpoint shipped (``tokenizer.json``, :mod:`.hf_tokenizer`); None: OpenAI's BPE
    checkpoint_tokenizer = None

    @cached_property
    def tokenizer(self) -> "CLIPTokenizer":
        if self.checkpoint_tokenizer is not None:  # at the current context length (set_context_length drops this)
            return self.checkpoint_tokenizer.with_context_length(self.config.text.context_length)
        from .tokenizer import CLIPTokenizer

        if self.config.text.vocab_size < CLIPTokenizer.vocab_size:  # its ids would index past the embedding table
            raise ValueError(f"{self.config.name}: the text tower embeds {self.config.text.vocab_size} tokens, not "
                             f"OpenAI's BPE ({CLIPTokenizer.vocab_size}), and no tokenizer came with the weights: load "
                             "it from a directory that ships its tokenizer.json, or call "
                             "model.set_tokenizer('tokenizer.json')")
        return CLIPTokenizer(context_length=self.config.text.context_length)

    def set_tokenizer(self, path: str | Path) -> "CLIP":
        """Tokenize with ``path`` (a ``tokenizer.json``, or a directory holding one, e.g. a SigLIP checkpoint's),
        checked against the text tower as loading checks it; ``save`` writes it along. Returns the model."""
        from .hf_tokenizer import TOKENIZER_FILE, attach_checkpoint_tokenizer

        path = Path(path)
        directory = path if path.is_dir() else path.parent
        if path.is_file() and path.name != TOKENIZER_FILE:
            raise ValueError(f"{path}: name the tokenizer file {TOKENIZER_FILE} (its side files are read beside it)")
        if not (directory / TOKENIZER_FILE).is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} at {directory}")
        before = self.config.tokenizer
        self.config.tokenizer = "openai-clip-bpe"  # look for tokenizer.json itself, not a previously recorded file
        try:
            attach_checkpoint_tokenizer(self, directory)
        except Exception:
            self.config.tokenizer = before  # a refused tokenizer leaves the model as it was
            raise
        return self

    @property
    def tokenizer_id(self) -> str:
        """Which tokenizer this model uses: ``config.tokenizer`` (OpenAI's BPE), or the shipped tokenizer's
        fingerprint (caches and embedding jobs key on it)."""
        tok = self.checkpoint_tokenizer
        return self.config.tokenizer if tok is None else tok.fingerprint

    def tokenize(self, texts: str | Sequence[str], truncate: bool = True) -> "TokenizedBatch":
        """Tokenize to this model's context length; truncation is reported (warning + flags), or refused."""
        return self.tokenizer(texts, context_length=self.config.text.context_length, truncate=truncate, stacklevel=3)

    @cached_property
    def preprocessor(self) -> "Preprocessor":
        from .preprocess import PreprocessConfig, Preprocessor

        return Preprocessor(PreprocessConfig(**vars(self.config.preprocess)), fast=self.precision != "fp32")

    def preprocess(self, image) -> torch.Tensor:
        """A PIL image (or path / bytes) -> ``[3, S, S]`` normalised pixels."""
        return self.preprocessor(image)

    # --- precision ---------------------------------------------------------------------------------------------------
    def set_precision(self, precision: str) -> "CLIP":
        """``"fp32"`` (exact) or the fast mode ``"bf16"`` (``"fp16"``): all weights, and so all compute, in that type;
        ``encode_image`` / ``encode_text`` still return fp32 features. Compared with keeping the residual stream
        and LayerNorms in fp32 (autocast's numerics) on ViT-B/32: cosine to fp32 on real captions and photos is
        within 1e-4 of it (min 0.99987 vs 0.99992), and texts/s is 3-8% higher, because converting activations
        between bf16 and fp32 costs about as much as the additions and LayerNorms it would protect. The fast mode's
        preprocessor also decodes large JPEGs at reduced size (draft mode). Returns the model; ``"fp32"`` after a
        low precision does not restore lost bits."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        if precision != "fp32":
            from .hardware import warn_if_slow_bf16

            warn_if_slow_bf16()
        self.__dict__.pop("preprocessor", None)  # rebuilt lazily: the fast mode also decodes JPEGs at reduced size
        compiled = self.__dict__.get("_compiled")
        self.to(PRECISIONS[precision])
        if compiled:  # compiled again for the new dtype (no stale-weights warning: the cast is asked for)
            first = next(iter(compiled.values()))
            if first.freeze:
                torch._dynamo.reset()
            self.set_compiled(True, freeze=first.freeze, mode=first.mode)
        return self

    @property
    def precision(self) -> str:
        """``"fp32"``, ``"bf16"`` or ``"fp16"`` (see :meth:`set_precision`)."""
        return {v: k for k, v in PRECISIONS.items()}.get(self.dtype, str(self.dtype))

    # --- bookkeeping -------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights and compute (bf16 in fast mode; the encoders' features are fp32 either way)."""
        return self.text.proj.weight.dtype

    @property
    def temperature(self) -> float:
        return 1.0 / math.exp(self.logit_scale.item())

    def save(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write the native format: ``model.safetensors`` + ``cliplab.json`` (config, tokenizer, preprocessing).
        ``cliplab.load(directory)`` reads it back bit-exactly. ``dtype`` (e.g. ``torch.float16``) stores floating
        tensors in a smaller type (loading always gives fp32 weights unless asked otherwise)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
                 for k, v in self.state_dict().items()}
        save_file(state, str(directory / NATIVE_WEIGHTS_FILE), metadata={"format": "cliplab"})
        meta = {"format": "cliplab", "format_version": NATIVE_FORMAT_VERSION, "config": self.config.to_dict()}
        (directory / NATIVE_CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if self.checkpoint_tokenizer is not None:  # its files, which config.tokenizer names
            self.checkpoint_tokenizer.save(directory)
        return directory

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return f"name={self.config.name!r}, params={n / 1e6:.1f}M"
