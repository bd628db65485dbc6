"""Token Prepending (TP): let early tokens of a causal text transformer see the whole sentence, training-free.

Paper: *Token Prepending: A Training-Free Approach for Eliciting Better Sentence Embeddings from LLMs*, Yuchen Fu,
Zifeng Cheng, Zhiwei Jiang, Zhonghui Wang, Yafeng Yin, Zhengliang Li, Qing Gu (ACL 2025, arXiv 2412.11556).
Official code: ``fuyuchenIfyw/token_prepending`` (``senllm/modeling_llama.py``, ``plan == "tp"``; ``evaluate.py``).

The method: a placeholder token ``<PST>`` is placed before the sentence. Before every layer ``l`` in
``[start, exit)`` the hidden state at ``<PST>`` is overwritten with the hidden state at the sentence-embedding
position (the last token) of the previous layer's output, so that, under causal attention, the tokens after
``<PST>`` can attend to a summary of the whole sentence. Optionally the embedding is read at an intermediate layer
(*early exit*). No training, one extra token.

What is implemented:

* :func:`token_prepending`, written against the :class:`~cliplab.text.causal.CausalTextModel` protocol only
  (``embed``, ``run`` with per-layer hooks, ``readout``). The protocol and its two adapters live in
  ``cliplab.text.causal``: :class:`CLIPText` (CLIP's text tower) and :class:`DecoderText` (the Llama decoder, e.g.
  the real SmolLM2-135M, the kind of model the paper targets). Both enter the slot through ``inputs_embeds`` and
  overwrite it with an ``Intervention`` at ``text.layer[l-1].resid``.
* :func:`encode_text_tp`, CLIP convenience: tokenize with one position left for the slot, insert ``<PST>`` right
  after SOT, summary position = EOT (shifted by one), pooled output = the projected EOT.
* :class:`TokenPrependingEmbedder`, TP around any decoder or CLIP :class:`~cliplab.text.TextEmbedder`, with the
  ``last`` or ``prompteol`` pooling: ``cliplab eval sts -m smollm2-135m --pooling prompteol
  --token-prepending``.

Choices (where the notes, the paper and this library differ):

* *The slot's input embedding.* The official code adds ``<PST>`` to the vocabulary with a ``torch.randn`` row (std
  1). Here it is a seeded random normal vector (:func:`pst_embedding`) scaled to the standard deviation of the
  model's token embedding table, passed through ``inputs_embeds``; pass ``slot=`` to use another vector. From
  ``start`` on it is overwritten, so it only affects layers ``< start``.
* *Layer convention.* As in the official loop: before block ``l`` (0-based) for ``start <= l < exit``, with the source
  being the current input of block ``l`` (the output of block ``l - 1``). ``start >= 1`` is required (before block 0
  there is no previous layer's sentence embedding). ``exit=None`` means every remaining block (the official default
  ``tp_exiting_index = 99``). ``start == exit`` is the vanilla forward with the slot present.
* *Where the slot goes.* With PromptEOL, as in the official prompt: ``This sentence : <PST> "X" means in one
  word:"`` (the text around the slot is tokenized in two pieces, as the official tokenizer splits around an added
  token). Without a prompt, first: before the sentence in a decoder without BOS (SmolLM2), right after SOT in CLIP.
  Positions after the slot shift by one, as in the official code where ``<PST>`` is a real token.
* *CLIP adaptation.* CLIP is not a language model, so the default is no prompt; the summary position is EOT.
* *Early exit.* ``readout_layer=k`` reads the summary position of ``hidden[k]`` (negative counts from the end) and
  applies the adapter's ``readout``: for CLIP ``ln_final`` + projection at any layer; for a decoder the final
  RMSNorm at the last layer and the raw stream before it (the official code reads ``transformers``' hidden states,
  which are normed only at the end).
* *Padding.* Rows are padded on the right and each row's summary is its own last token; the official code pads on
  the left and reads position -1. Under causal attention the two are the same computation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from ..methods import register_method
from ..models.lm.tokenizer import TextBatch
from ..models.tokenizer import TokenizedBatch, TruncationWarning
from ..text import SequenceEmbedder, get_pooling
from ..text.pooling import shorten_to_fit
from ..text.causal import CausalTextModel, CLIPText, DecoderText, LayerHook

register_method(
    "token_prepending",
    "Token Prepending: A Training-Free Approach for Eliciting Better Sentence Embeddings from LLMs",
    "prepend a slot that carries the previous layer's sentence embedding (EOT) to causal text towers; early exit",
    doc="docs/methods/token_prepending.md",
)(__name__)

__all__ = ["CausalTextModel", "CLIPText", "DecoderText", "LayerHook", "TPOutput", "insert_slot", "token_prepending",
           "pst_embedding", "encode_text_tp", "TokenPrependingEmbedder", "TP_TEMPLATES"]


@dataclass
class TPOutput:
    """``embedding`` ``[B, D]``: the readout of the summary position at ``readout_layer``; ``hidden``: the
    ``n_layers + 1`` streams ``[B, n + 1, W]`` (slot included); ``summary_index`` ``[B]`` and ``slot_index`` are
    positions in the sequence with the slot."""

    embedding: torch.Tensor
    hidden: list[torch.Tensor]
    summary_index: torch.Tensor
    slot_index: int
    readout_layer: int
    extras: dict = field(default_factory=dict)


def insert_slot(embeds: torch.Tensor, slot: torch.Tensor, slot_index: int = 1) -> torch.Tensor:
    """Insert the slot vector ``[W]`` (or ``[B, W]``) at ``slot_index`` of every row of ``embeds`` ``[B, n, W]``."""
    b, _, w = embeds.shape
    s = slot.to(device=embeds.device, dtype=embeds.dtype)
    s = s.expand(b, w) if s.dim() == 1 else s
    return torch.cat([embeds[:, :slot_index], s.unsqueeze(1), embeds[:, slot_index:]], dim=1)


def token_prepending(lm: CausalTextModel, embeds: torch.Tensor, summary_index: torch.Tensor, slot: torch.Tensor, *,
                     slot_index: int = 1, start: int = 1, exit: int | None = None,
                     readout_layer: int | None = None) -> TPOutput:
    """Token Prepending on any :class:`CausalTextModel`.

    ``embeds`` ``[B, n, W]``: token embeddings *without* the slot; ``summary_index`` ``[B]``: the sentence-embedding
    position in them (the last token; EOT for CLIP), at or after ``slot_index``. The slot is inserted at
    ``slot_index``; before block ``l`` for ``start <= l < exit`` its state is replaced by the summary position's.
    ``start == exit`` runs the vanilla forward with the slot present. ``readout_layer`` (default: the last) is the
    early-exit layer."""
    n_layers = lm.n_layers
    exit = n_layers if exit is None else exit
    if not 1 <= start <= exit <= n_layers:
        raise ValueError(f"need 1 <= start <= exit <= {n_layers} (blocks), got start={start}, exit={exit}")
    layer = n_layers if readout_layer is None else readout_layer
    layer = layer + n_layers + 1 if layer < 0 else layer
    if not 0 <= layer <= n_layers:
        raise ValueError(f"readout_layer {readout_layer} outside 0..{n_layers}")
    summary = summary_index.to(device=embeds.device, dtype=torch.long)
    if bool((summary < slot_index).any()):
        raise ValueError("the summary position must come at or after the slot")
    x = insert_slot(embeds, slot, slot_index)
    summary = summary + 1
    rows = torch.arange(x.shape[0], device=x.device)
    slot_pos = torch.tensor([slot_index], device=x.device)

    def overwrite(h: torch.Tensor) -> torch.Tensor:
        return h.index_copy(1, slot_pos, h[rows, summary].unsqueeze(1))

    hidden = lm.run(x, {l - 1: overwrite for l in range(start, exit)})
    embedding = lm.readout(hidden[layer][rows, summary], layer)
    return TPOutput(embedding, hidden, summary, slot_index, layer)


def pst_embedding(model, seed: int = 0) -> torch.Tensor:
    """The ``<PST>`` input vector: seeded normal, scaled to the standard deviation of the token embedding table of
    ``model`` (a CLIP model, a :class:`~cliplab.models.lm.LlamaDecoder`, or a :class:`CausalTextModel` adapter)."""
    if hasattr(model, "token_table"):
        table = model.token_table
    elif hasattr(model, "text"):
        table = model.text.token_embed.weight
    else:
        table = model.token_embed.weight
    table = table.detach()
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(table.shape[1], generator=g, dtype=torch.float32) * table.float().std()).to(table)


def encode_text_tp(model, texts: str | Sequence[str] | TokenizedBatch, *, start: int = 1, exit: int | None = None,
                   readout_layer: int | None = None, slot: torch.Tensor | None = None, seed: int = 0,
                   normalize: bool = False, output: bool = False):
    """CLIP text features with Token Prepending: ``[B, D]`` (normalised with ``normalize``), or the
    :class:`TPOutput` with ``output=True``. Texts are tokenized to ``context_length - 1`` (room for the slot)."""
    ctx = model.config.text.context_length
    if isinstance(texts, TokenizedBatch):
        batch = texts
    else:
        batch = model.tokenizer([texts] if isinstance(texts, str) else list(texts), context_length=ctx - 1)
    eot = batch.eot_index.to(model.device)
    if int(eot.max()) + 2 > ctx:
        raise ValueError(f"no room for the slot: a text uses {int(eot.max()) + 1} of {ctx} positions; tokenize to "
                         f"context_length={ctx - 1}")
    ids = batch.ids[:, : int(eot.max()) + 1].to(model.device)
    lm = CLIPText(model)
    slot = pst_embedding(model, seed) if slot is None else slot
    out = token_prepending(lm, lm.embed(ids), eot, slot, slot_index=1, start=start, exit=exit,
                           readout_layer=readout_layer)
    out.extras["batch"] = batch
    if normalize:
        out.embedding = torch.nn.functional.normalize(out.embedding, dim=-1)
    return out if output else out.embedding


#: Where the slot goes for each pooling TP supports: ``{slot}`` marks it, ``{text}`` the (prepared) sentence.
TP_TEMPLATES = {"last": "{slot}{text}", "prompteol": 'This sentence : {slot} "{text}" means in one word:"'}


class TokenPrependingEmbedder:
    """Token Prepending around a decoder (:class:`~cliplab.text.DecoderEmbedder`) or CLIP
    (:class:`~cliplab.text.CLIPTextEmbedder`) text embedder; a :class:`~cliplab.text.TextEmbedder` itself.

    ``encode(texts, pooling)`` supports the last-token poolings TP is defined for: ``last`` and ``prompteol``. The
    other keywords are those of :func:`token_prepending`; ``seed`` picks the slot vector when ``slot`` is None."""

    def __init__(self, embedder: SequenceEmbedder, *, start: int = 1, exit: int | None = None,
                 readout_layer: int | None = None, slot: torch.Tensor | None = None, seed: int = 0):
        if not getattr(embedder, "causal", False):
            raise ValueError(f"Token Prepending needs a causal text model; {embedder.name} is bidirectional")
        model = embedder.model
        n_layers = len(model.text.transformer.blocks) if hasattr(model, "text") else len(model.blocks)
        if not 1 <= start <= (n_layers if exit is None else exit) <= n_layers:
            raise ValueError(f"need 1 <= start <= exit <= {n_layers} (blocks of {embedder.name}; exit=None is every "
                             f"block), got start={start}, exit={exit}")
        self.embedder = embedder
        self.name = f"{embedder.name}+tp"
        self.default_pooling = embedder.default_pooling if embedder.default_pooling in TP_TEMPLATES else "last"
        self.start, self.exit, self.readout_layer, self.seed = start, exit, readout_layer, seed
        self.slot = slot
        self.is_clip = hasattr(model, "encode_text")

    @property
    def dim(self) -> int:
        return self.embedder.dim

    def _slot(self, lm) -> torch.Tensor:
        return pst_embedding(lm, self.seed) if self.slot is None else self.slot

    @torch.no_grad()
    def encode(self, texts: Sequence[str], pooling=None, normalize: bool = False, batch_size: int = 64,
               progress: bool = False) -> torch.Tensor:
        pool = get_pooling(pooling or self.default_pooling)
        if pool.name not in TP_TEMPLATES:
            raise ValueError(f"Token Prepending reads the last token: pooling must be one of {sorted(TP_TEMPLATES)}, "
                             f"got {pool.name!r}")
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts; wrap a single text in a list")
        if not texts:
            return torch.empty(0, self.dim)
        if self.is_clip:
            if pool.template is not None:
                raise ValueError("on a CLIP text tower Token Prepending supports pooling 'last' (slot after SOT)")
            out = self._encode_clip(list(texts), batch_size, progress)
        else:
            out = self._encode_decoder(list(texts), pool, batch_size, progress)
        return F.normalize(out, dim=-1) if normalize else out

    def _encode_clip(self, texts: list[str], batch_size: int, progress: bool) -> torch.Tensor:
        model = self.embedder.model
        batch = model.tokenizer(texts, context_length=model.config.text.context_length - 1, stacklevel=4)
        out = torch.empty(len(texts), self.dim)
        order = torch.argsort(batch.lengths, stable=True)
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"encoding ({self.name})", unit="batch")
        for i in starts:
            rows = order[i : i + batch_size]
            sub = TokenizedBatch(batch.ids[rows], batch.lengths[rows], [batch.spans[r] for r in rows.tolist()],
                                 batch.truncated[rows], batch.n_dropped[rows], [batch.texts[r] for r in rows.tolist()])
            out[rows] = encode_text_tp(model, sub, start=self.start, exit=self.exit, readout_layer=self.readout_layer,
                                       slot=self.slot, seed=self.seed).float().cpu()
        return out

    def decoder_batch(self, texts: list[str], pool) -> tuple[TextBatch, int]:
        """Token ids without the slot (prompt prefix + sentence part) and the slot's position in every row.

        The prefix carries the tokenizer's special tokens (a BOS, for models whose tokenizer adds one), so the slot
        follows them. A sentence too long for the room left is shortened, keeping the prompt's end."""
        tok = self.embedder.tokenizer
        before, after = TP_TEMPLATES[pool.name].split("{slot}")
        prefix = tok.encode(before)  # "" gives just the special prefix (BOS) or nothing
        room = tok.max_length - len(prefix) - 1  # one position for the slot

        def render(t: str) -> str:
            return after.replace("{text}", pool.prepare(t) if pool.prepare else t)

        def count(t: str) -> int:
            return len(tok.encode(t, add_special_tokens=False))

        fitted = [shorten_to_fit(t, render, count, room) for t in texts]
        cut = torch.tensor([shortened for _, shortened in fitted], dtype=torch.bool)
        if bool(cut.any()):
            warnings.warn(f"{int(cut.sum())} of {len(texts)} text(s) were shortened to fit {room} tokens with the "
                          f"slot ({self.name})", TruncationWarning, stacklevel=4)
        prepared = [pool.prepare(t) if pool.prepare else t for t in texts]
        rest = tok([part for part, _ in fitted], max_length=room, stacklevel=4, add_special_tokens=False)
        n = len(prefix) + rest.ids.shape[1]
        ids = torch.full((len(texts), n), tok.pad_id, dtype=torch.long)
        ids[:, : len(prefix)] = torch.tensor(prefix, dtype=torch.long)
        ids[:, len(prefix):] = rest.ids
        mask = torch.zeros(len(texts), n, dtype=torch.bool)
        mask[:, : len(prefix)] = True
        mask[:, len(prefix):] = rest.mask
        return TextBatch(ids, mask, rest.lengths + len(prefix), rest.truncated | cut, prepared, rest.spans), len(prefix)

    def _encode_decoder(self, texts: list[str], pool, batch_size: int, progress: bool) -> torch.Tensor:
        lm = DecoderText(self.embedder.model)
        batch, slot_index = self.decoder_batch(texts, pool)
        slot = self._slot(lm)
        out = torch.empty(len(texts), self.dim)
        for rows, sub in self.embedder.iter_batches(batch, batch_size, progress):
            res = token_prepending(lm, lm.embed(sub.ids), sub.last_index, slot, slot_index=slot_index,
                                   start=self.start, exit=self.exit, readout_layer=self.readout_layer)
            out[rows] = res.embedding.float().cpu()
        return out

    def __repr__(self) -> str:
        return (f"TokenPrependingEmbedder({self.embedder.name!r}, start={self.start}, exit={self.exit}, "
                f"readout_layer={self.readout_layer})")
