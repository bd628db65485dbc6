"""The :class:`TextEmbedder` interface, and the embedders of cliplab's text models: BERT-style encoders, Llama-style
decoders and the CLIP text tower all satisfy it.

``encode(texts, pooling=..., normalize=...)`` tokenizes, orders the texts by token length, runs them in batches (each
padded only to its own longest row, and cut into slices of about :data:`SLICE_TOKENS` tokens), pools the final token
states with a registered :mod:`~cliplab.text.pooling` and returns ``[N, D]`` fp32 rows in the input order. Exact: a
row's states do not depend on its batch (padding is masked in bidirectional models, and lies after the last real
token in causal ones). ``set_precision("bf16")`` is the fast mode (weights and compute in bf16, fp32 output).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F

from ..models.hardware import warn_if_slow_bf16
from ..models.hooks import TowerOutput, parse_output
from ..models.lm.tokenizer import TextBatch
from ..models.tokenizer import TruncationWarning
from .pooling import Pooling, get_pooling, shorten_to_fit
from .saving import load_model_state, read_saved, register_embedder_kind, save_embedder

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}

#: Rows of one forward pass are capped so that ``rows x length`` stays near this many tokens: a smaller working set
#: stays in cache (the CLIP towers size theirs by the CPU's L2 cache, ``cliplab.models.towers.SLICE_TOKENS``; these
#: models keep 512 until measured otherwise).
SLICE_TOKENS = 512


@runtime_checkable
class TextEmbedder(Protocol):
    """Anything that turns texts into sentence embeddings."""

    name: str
    default_pooling: str

    @property
    def dim(self) -> int: ...

    def encode(self, texts: Sequence[str], pooling: str | Pooling | None = None, normalize: bool = False,
               batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """``[N, dim]`` fp32 embeddings of ``texts``, in order; ``progress`` shows a bar."""


class SequenceEmbedder:
    """A transformer and its tokenizer as a :class:`TextEmbedder`. Subclasses say how to run the model
    (:meth:`token_states`) and may tokenize differently (:meth:`tokenize`)."""

    causal = False

    def __init__(self, name: str, model: torch.nn.Module, tokenizer, default_pooling: str):
        self.name = name
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.default_pooling = get_pooling(default_pooling).name

    # --- what subclasses provide ---------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.model.cfg.width

    def tokenize(self, texts: Sequence[str], stacklevel: int = 2) -> TextBatch:
        return self.tokenizer(list(texts), stacklevel=stacklevel + 1)

    @property
    def max_tokens(self) -> int:
        """The most tokens a text may have (special tokens included); longer ones are cut."""
        return self.tokenizer.max_length

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` as the model reads it (special tokens included), before any cut."""
        return len(self.tokenizer.encode(text))

    def token_states(self, batch: TextBatch, **kw) -> TowerOutput:
        """Run the model on a batch; ``kw`` passes ``output=`` / ``hooks=`` through."""
        raise NotImplementedError

    def prepare_texts(self, texts: Sequence[str], pool: Pooling, stacklevel: int = 2) -> list[str]:
        """The texts as the model reads them: inside the pooling's prompt, if it has one. A text too long for the
        prompt is shortened, not the prompt (the prompt's end is what the last token summarises); a
        ``TruncationWarning`` counts them."""
        if pool.template is None:
            return list(texts)
        fitted = [shorten_to_fit(t, pool.wrap, self.count_tokens, self.max_tokens) for t in texts]
        shortened = sum(cut for _, cut in fitted)
        if shortened:
            warnings.warn(f"{shortened} of {len(texts)} text(s) were shortened to fit the {pool.name} prompt in "
                          f"{self.max_tokens} tokens ({self.name})", TruncationWarning, stacklevel=stacklevel + 1)
        return [t for t, _ in fitted]

    # --- the interface -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, texts: Sequence[str], pooling: str | Pooling | None = None, normalize: bool = False,
               batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """``[N, dim]`` fp32 embeddings of ``texts`` in order (see the module docstring). ``batch_size`` caps the rows
        of a forward pass; :data:`SLICE_TOKENS` caps its tokens too, so short texts run in fewer rows."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts; wrap a single text in a list")
        pool = get_pooling(pooling or self.default_pooling)
        if not texts:
            return torch.empty(0, self.dim)
        batch = self.tokenize(self.prepare_texts(texts, pool, stacklevel=3), stacklevel=3)
        out = torch.empty(len(batch), self.dim)
        for rows, sub in self.iter_batches(batch, batch_size, progress):
            states = self.token_states(sub).tokens
            out[rows] = pool(states, sub.mask).cpu()  # pooled in fp32 (see Pooling.__call__)
        return F.normalize(out, dim=-1) if normalize else out

    def iter_batches(self, batch: TextBatch, batch_size: int, progress: bool = False):
        """``(rows, sub_batch)`` in token-length order: each sub-batch holds at most ``batch_size`` rows and about
        :data:`SLICE_TOKENS` tokens, cut to its own longest row."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = torch.argsort(batch.lengths, stable=True)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(order), desc=f"encoding ({self.name})", unit="text")
        i = 0
        while i < len(order):
            longest = int(batch.lengths[order[min(i + batch_size, len(order)) - 1]])
            step = max(1, min(batch_size, SLICE_TOKENS // max(1, longest)))
            rows = order[i : i + step]
            yield rows, batch.select(rows)
            i += len(rows)
            if bar is not None:
                bar.update(len(rows))
        if bar is not None:
            bar.close()

    def save(self, directory, **kw):
        """Write this embedder to ``directory`` (``cliplab.text.saving.save_embedder``); ``load_embedder(directory)``
        and ``cliplab eval sts -m DIRECTORY`` read it back."""
        return save_embedder(self, directory, **kw)

    # --- precision -----------------------------------------------------------------------------------------------
    def set_precision(self, precision: str) -> "SequenceEmbedder":
        """``"fp32"`` (exact) or ``"bf16"`` (fast mode: bf16 weights and compute, fp32 embeddings)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        if precision != "fp32":
            warn_if_slow_bf16()
        self.model.to(PRECISIONS[precision])
        return self

    @property
    def precision(self) -> str:
        dtype = next(self.model.parameters()).dtype
        return {v: k for k, v in PRECISIONS.items()}.get(dtype, str(dtype))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, pooling={self.default_pooling!r}, "
                f"precision={self.precision!r})")


class EncoderEmbedder(SequenceEmbedder):
    """A bidirectional encoder (:class:`~cliplab.models.lm.BertEncoder`); padding is masked in attention."""

    def token_states(self, batch: TextBatch, **kw) -> TowerOutput:
        device = self.model.token_embed.weight.device
        return self.model(batch.ids.to(device), batch.mask.to(device), **kw)


class DecoderEmbedder(SequenceEmbedder):
    """A causal decoder (:class:`~cliplab.models.lm.LlamaDecoder`); right padding needs no mask."""

    causal = True

    @classmethod
    def from_lm(cls, lm, default_pooling: str = "prompteol") -> "DecoderEmbedder":
        """The embedder of a loaded :class:`~cliplab.text.CausalLM` (the same weights, not a copy)."""
        emb = cls(lm.name, lm.model, lm.tokenizer, default_pooling)
        emb.lm = lm
        return emb

    def token_states(self, batch: TextBatch, **kw) -> TowerOutput:
        return self.model(batch.ids.to(self.model.token_embed.weight.device), **kw)


class CLIPTextEmbedder(SequenceEmbedder):
    """The text tower of a :class:`~cliplab.models.CLIP` model. Token states are the per-token outputs in the joint
    space (final LayerNorm and projection); ``last`` pooling is the EOT token, i.e. exactly ``encode_text``."""

    causal = True

    def __init__(self, name: str, model, default_pooling: str = "last"):
        super().__init__(name, model, model.tokenizer, default_pooling)

    @property
    def dim(self) -> int:
        return self.model.config.embed_dim

    @property
    def max_tokens(self) -> int:
        return self.model.config.text.context_length

    def count_tokens(self, text: str) -> int:
        return len(self.model.tokenizer.encode(text)) + 2  # SOT and EOT

    def tokenize(self, texts: Sequence[str], stacklevel: int = 2) -> TextBatch:
        tb = self.model.tokenizer(list(texts), context_length=self.model.config.text.context_length,
                                  stacklevel=stacklevel + 1)
        n = int(tb.lengths.max()) if len(tb) else 0
        mask = torch.arange(n) < tb.lengths[:, None]
        return TextBatch(tb.ids[:, :n], mask, tb.lengths.clone(), tb.truncated.clone(), tb.texts, tb.spans)

    def token_states(self, batch: TextBatch, *, output=False, hooks=None) -> TowerOutput:
        want = parse_output(output) | {"tokens"}  # per-token outputs are what pooling reads
        return self.model.encode_text(batch.ids, keep_padding=True, output=want, hooks=hooks)

    def set_precision(self, precision: str) -> "CLIPTextEmbedder":
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.model.set_precision(precision)
        return self


# --- saved embedders of these two kinds load back through cliplab.text.load_embedder ----------------------------
@register_embedder_kind("encoder")
def _load_encoder(directory: Path, meta: dict):
    meta, state, tok = read_saved(directory)
    return EncoderEmbedder(meta["name"], load_model_state(meta, state), tok, meta["default_pooling"])


@register_embedder_kind("decoder")
def _load_decoder(directory: Path, meta: dict):
    meta, state, tok = read_saved(directory)
    return DecoderEmbedder(meta["name"], load_model_state(meta, state), tok, meta["default_pooling"])
