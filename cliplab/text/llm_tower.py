"""A CLIP model whose text tower is a frozen LLM embedder followed by a trainable adapter (shared by ``llm2clip`` and
``proclip``).

    from cliplab.text.llm_tower import LLMTextCLIP, TextAdapter
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

A normal model for the services: :meth:`LLMTextCLIP.tokenize` returns an :class:`LLMTextBatch` (the texts, their
token counts, truncation flags), which ``encode_text`` reads, so ``cliplab embed`` / ``index`` / ``search`` /
``eval`` / ``classify`` run on it unchanged; ``config`` is the CLIP config with the LLM's context
(``text.context_length = embedder.max_tokens``) and the embedder named in ``tokenizer``, so fingerprints and
embedding caches tell it from the plain CLIP model. A saved directory (:func:`is_llm_clip_dir`) is accepted
wherever a model path is (``cliplab.pipeline.resolve_model``, ``cliplab info``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TextAdapter", "LLMTextCLIP", "LLMTextBatch", "load_llm_clip", "is_llm_clip_dir", "LLM_CLIP_CONFIG"]

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


@dataclass
class LLMTextBatch:
    """What :meth:`LLMTextCLIP.tokenize` returns: the LLM tower's stand-in for CLIP's ``TokenizedBatch``.

    ``lengths`` are the tokens each text takes as the LLM reads it (inside the pooling's prompt, special tokens
    included); ``truncated`` / ``n_dropped`` flag texts longer than ``embedder.max_tokens`` (the embedder
    shortens those). ``ids`` is the batch itself, so a service's ``model.encode_text(tokens.ids[rows])`` selects
    texts by row as it selects token ids of a CLIP batch."""

    texts: list[str]
    lengths: torch.Tensor
    truncated: torch.Tensor
    n_dropped: torch.Tensor

    @property
    def ids(self) -> "LLMTextBatch":
        return self

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, rows) -> "LLMTextBatch":
        idx = torch.as_tensor(rows, dtype=torch.long).reshape(-1) if not isinstance(rows, slice) \
            else torch.arange(len(self.texts))[rows]
        return LLMTextBatch([self.texts[int(i)] for i in idx], self.lengths[idx], self.truncated[idx],
                            self.n_dropped[idx])

    def to(self, device) -> "LLMTextBatch":  # texts live on no device; the embedder places its own tensors
        return self

    @property
    def num_truncated(self) -> int:
        return int(self.truncated.sum().item())


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
        out = self.adapter(x).float()  # fp32 features in the fast mode too, as CLIP's encoders
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(self, texts: "Sequence[str] | LLMTextBatch", normalize: bool = False) -> torch.Tensor:
        """:meth:`encode_texts` for a list of texts or an :class:`LLMTextBatch` (what :meth:`tokenize` gives the
        services). Nothing is added to the cache: an embedding job's texts would fill memory."""
        if isinstance(texts, torch.Tensor) or (hasattr(texts, "ids") and not isinstance(texts, LLMTextBatch)):
            raise TypeError("the LLM text tower reads texts: pass a list of strings or model.tokenize(texts), "
                            "not CLIP token ids")
        rows = texts.texts if isinstance(texts, LLMTextBatch) else texts
        return self.encode_texts(list(rows), normalize=normalize, cache=False)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` as the LLM reads it (inside the pooling's prompt), before any cut; 0 if the
        embedder cannot count."""
        from .pooling import get_pooling

        count = getattr(self.embedder, "count_tokens", None)
        return 0 if count is None else int(count(get_pooling(self.pooling).wrap(text)))

    def tokenize(self, texts: "str | Sequence[str]", truncate: bool = True) -> LLMTextBatch:
        """An :class:`LLMTextBatch` of ``texts``. Texts past ``max_tokens`` are flagged and warned about
        (``TruncationWarning``, as CLIP's tokenizer does) or, with ``truncate=False``, refused
        (``TruncationError``)."""
        from ..models.tokenizer import TruncationError, TruncationWarning

        texts = [texts] if isinstance(texts, str) else list(texts)
        counts = torch.tensor([self.count_tokens(t) for t in texts], dtype=torch.long)
        dropped = (counts - self.max_tokens).clamp(min=0)
        too_long = [i for i in range(len(texts)) if dropped[i] > 0]
        if too_long and not truncate:
            raise TruncationError(f"{len(too_long)} of {len(texts)} text(s) exceed the {self.max_tokens}-token "
                                  f"context of {self.embedder_name} (row {too_long[0]}: {int(counts[too_long[0]])} "
                                  "tokens)")
        if too_long:
            warnings.warn(f"{len(too_long)} of {len(texts)} text(s) are longer than the {self.max_tokens}-token "
                          f"context of {self.embedder_name} and are shortened ({int(dropped.sum())} tokens)",
                          TruncationWarning, stacklevel=2)
        return LLMTextBatch(texts, counts.clamp(max=self.max_tokens), dropped > 0, dropped)

    @property
    def tokenizer(self):
        """The embedder's tokenizer (the services only warm it up; :meth:`tokenize` is what they call)."""
        return getattr(self.embedder, "tokenizer", None)

    @property
    def tokenizer_id(self) -> str:
        """What text embeddings depend on besides the weights: the embedder, its pooling and its context."""
        return f"llm:{self.embedder_name}:{self.pooling}:{self.max_tokens}"

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
        """The CLIP config with this text tower's facts: ``text.context_length`` is the LLM's context,
        ``tokenizer`` names the embedder and ``name`` is ``<clip>+<embedder>`` (fingerprints, embedding caches and
        manifests see a different model than the plain CLIP one)."""
        cfg = self.clip.config
        short = re.sub(r"[^A-Za-z0-9._+-]", "_", Path(str(self.embedder_name)).name)
        return dataclasses.replace(cfg, name=f"{cfg.name}+{short}", tokenizer=self.tokenizer_id,
                                   text=dataclasses.replace(cfg.text, context_length=int(self.max_tokens)))

    # --- the bookkeeping the services read ---------------------------------------------------------------------
    def external_state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen embedder's weights (``embedder.*``): not this module's parameters, so not in ``state_dict``
        and not saved with it (the embedder is stored by reference); ``cliplab.pipeline.modelref.fingerprint``
        hashes them too, so a model whose embedder folder was re-tuned in place gets a new fingerprint."""
        lm = getattr(self.embedder, "model", None)
        return {} if lm is None else {f"embedder.{k}": v for k, v in lm.state_dict().items()}

    @property
    def device(self) -> torch.device:
        return self.clip.device

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.dtype

    @property
    def precision(self) -> str:
        return self.clip.precision

    def set_precision(self, precision: str) -> "LLMTextCLIP":
        """The CLIP image tower and the adapter in ``precision`` (the frozen embedder keeps its own; features
        come back in fp32). Returns the model."""
        self.clip.set_precision(precision)
        self.adapter.to(self.clip.dtype)
        return self

    def text_tower(self) -> dict:
        """What the text tower is (``cliplab info`` shows it): the embedder, its pooling, width and context, and
        the adapter that maps it into the joint space."""
        return {"kind": "llm-embedder", "embedder": self.embedder_name, "pooling": self.pooling,
                "embedder_dim": int(self.embedder.dim), "max_tokens": int(self.max_tokens),
                "adapter": self.adapter.config(), "embed_dim": int(self.adapter.out_dim)}

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


def is_llm_clip_dir(path) -> bool:
    """Whether ``path`` is a directory :meth:`LLMTextCLIP.save` wrote."""
    try:
        return (Path(path) / LLM_CLIP_CONFIG).is_file()
    except (TypeError, OSError):
        return False


def load_llm_clip(directory, embedder=None) -> LLMTextCLIP:
    """Read back :meth:`LLMTextCLIP.save`; ``embedder`` (a loaded one) skips loading it by reference."""
    from safetensors.torch import load_file

    from ..models import load
    from . import load_embedder

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
