"""DupMAE (RetroMAE v2): duplex masked auto-encoding of a BERT encoder, and its combined [CLS] + bag-of-words embedding.

Paper: *RetroMAE v2: Duplex Masked Auto-Encoder For Pre-Training Retrieval-Oriented Language Models*, Shitao Xiao and
Zheng Liu (arXiv 2211.08769); ACL 2023 as *RetroMAE-2*, Zheng Liu, Shitao Xiao, Yingxia Shao, Zhao Cao (arXiv
2305.02564). Official code: ``staoxiao/RetroMAE``,
``src/pretrain/modeling_duplex.py`` (``DupMAEForPretraining``), ``src/pretrain/data.py`` (``DupMAECollator``),
``src/pretrain/enhancedDecoder.py`` (``BertLayerForDecoder``), ``examples/pretrain/README.md`` (hyper-parameters).

The method. A BERT encoder reads its input with 30% of the words masked (whole-word masking, BERT's 80/10/10
replacement) and is trained with three losses:

* **encoder MLM**: the MLM head on the masked positions of the encoder's last layer;
* **[CLS] decoding** (RetroMAE's *enhanced decoding*): a one-layer transformer decoder whose query stream is the
  encoder's final ``[CLS]`` state plus each position's embedding, and whose keys/values are ``[CLS]`` followed by the
  *unmasked* input's token embeddings. Each query row ``i`` sees its own random subset of positions: a fresh
  whole-word mask at 50% is drawn for the row, the row never sees itself and always sees ``[CLS]`` (``[CLS]`` and
  ``[SEP]`` are never mask candidates). Every real token except ``[CLS]`` and the closing ``[SEP]`` is predicted
  through the same MLM head;
* **bag of words (BoW) from the ordinary tokens (OT)**: the MLM head is applied to every ordinary token's final state
  (all positions after ``[CLS]``, ``[SEP]`` included, as in the code), the vocabulary logits are max-pooled over
  positions with padding masked, and the result is scored by cross-entropy against the input's bag of words:
  ``L_bow = -sum_v q_v log softmax(o)_v`` with ``q_v = 1/L`` for every distinct token ``v`` of the ``L`` input tokens
  (special tokens excluded).

``loss = L_mlm + L_dec + 0.1 * L_bow``. The final representation concatenates the ``[CLS]`` embedding (in the paper,
dimension-reduced by a linear map learned in fine-tuning) with the sparsified OT vector
``topk(ReLU(max_j logits_j))``; the similarity of two texts is the sum of the two inner products.

Where it acts: on the **last layer** of the encoder (``BertEncoder``'s ``tokens``, after the last block's post-LN;
MiniLM has no final LayerNorm of its own). ``[CLS]`` is position 0; the ordinary tokens are positions ``1..n-1``
(the closing ``[SEP]`` included, padding excluded). The decoder and the head are trained beside the encoder and
discarded, except the head, which the OT vector needs at inference.

Use: ``pretrain(embedder, texts, steps=...)`` (the MLM-only control: ``config=DupMAEConfig(dec_weight=0,
bow_weight=0)``) returns a :class:`DupMAEEmbedder`, whose ``encode`` gives the combined representation or one part
(``pooling="dupmae" | "dupmae_cls" | "dupmae_ot"``). ``.save(dir)`` writes it; ``cliplab.text.load_embedder(dir)`` and
``cliplab eval sts -m DIR`` read it back. :func:`cli_train` is what ``cliplab textrep train dupmae`` calls.

Choices that differ from the paper or its code, and why:

* **MLM head.** all-MiniLM-L6-v2 ships without its MLM head. The head here is BERT's (``dense -> GELU ->
  LayerNorm``, then the tied word-embedding matrix and a vocabulary bias), with the word-embedding matrix tied to the
  encoder's ``token_embed`` and a fresh transform and bias. The transform starts at the **identity** (dense = I,
  LayerNorm at identity, bias 0) by default, not BERT's normal(0.02): on MiniLM the identity head already ranks
  each position's own token first at 57% of the word positions of 200 held-out Flickr8k captions (a random one
  starts from chance, and the few hundred CPU steps here cannot train it from scratch). ``head_init="normal"`` gives
  BERT's initialisation.
* **Decoder masks.** Each row draws its own whole-word mask; the code draws ``min(n, 256)`` masks per text and lets
  each row pick one at random (so rows may share a mask). Each row's distribution is the same.
* **The number of masked tokens** is HF ``DataCollatorForWholeWordMask``'s: ``max(1, round(ratio * n))`` with ``n``
  counting ``[CLS]`` and ``[SEP]``; whole words that would overshoot are skipped. So on short captions the share of
  *ordinary* tokens masked is a little above the ratio.
* **Padding in the max-pool** is excluded exactly (filled with the dtype's minimum); the code adds -1000.
* **The loss weights.** ``0.1`` on the BoW loss is the code's ``bow_loss_weight`` (the stored ``arguments.py``
  lacks the field, and ``modeling_duplex.py`` calls an undefined ``sparse_embedding`` where ``ot_embedding`` is
  meant; we follow the evident intent). The paper writes the sum without a weight.
* **Scale.** The paper pre-trains BERT-base on Wikipedia + BookCorpus (and MS MARCO) for many epochs, then
  fine-tunes; here all-MiniLM-L6-v2 (already a sentence-embedding model) is pre-trained for a few hundred steps on
  Flickr8k captions (``experiments/dupmae_minilm.py``), with no fine-tuning stage.
* **No dropout** (our ``BertEncoder`` has none; BERT's is 0.1); AdamW with the code's lr 1e-4, warm-up 10% and weight
  decay 0.01, but cosine decay (``cliplab.text.training.fit``) instead of HF's linear decay; fp32.
* **The final representation.** The paper reduces ``[CLS]`` to 384 dimensions with a linear layer learned during
  fine-tuning and keeps the top 384 OT entries (384 + 384 = BERT-base's 768). MiniLM's ``[CLS]`` already has 384
  dimensions, so it is not reduced (there is no fine-tuning stage here to learn a reduction) and ``top_k=384``.
  The two parts' scales are whatever pre-training left: by default
  (``normalize_parts=True``) each part is L2-normalised before concatenation, so the inner product of two
  representations is ``cos([CLS]) + cos(OT)`` (and their cosine is half of it). ``normalize_parts=False`` keeps the
  paper's raw sum of inner products.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..methods import register_method
from ..models.lm import BertEncoder
from ..models.lm.tokenizer import TextBatch, TextTokenizer
from ..text import SequenceEmbedder, get_pooling, register_embedder_kind
from ..text.pooling import Pooling
from ..text.saving import load_model_state, read_saved, save_embedder
from ..text.training import FitResult, fit, register_trainer

register_method(
    "dupmae",
    "RetroMAE v2: Duplex Masked Auto-Encoder For Pre-Training Retrieval-Oriented Language Models",
    "BERT pre-training with [CLS] decoding (enhanced decoding) and an ordinary-token bag-of-words loss; "
    "[CLS] + sparse vocabulary embedding",
    doc="docs/methods/dupmae.md",
)(__name__)

__all__ = ["DupMAEConfig", "DupMAEBatch", "DupMAECollator", "MLMHead", "EnhancedDecoderLayer", "DupMAE",
           "DupMAEEmbedder", "PretrainResult", "pretrain", "whole_word_mask", "mlm_corrupt", "decoder_visibility",
           "bow_target", "ot_vector", "bow_loss", "sparsify", "cli_train", "PARTS", "KIND"]

KIND = "dupmae"
#: what ``DupMAEEmbedder.encode(pooling=...)`` returns: the combined representation, its [CLS] part, its OT part
PARTS = ("dupmae", "dupmae_cls", "dupmae_ot")


@dataclass
class DupMAEConfig:
    """The pre-training objective: mask ratios (paper/code: 0.3 encoder, 0.5 decoder), whole-word masking, and the
    loss weights ``loss = mlm_weight * L_mlm + dec_weight * L_dec + bow_weight * L_bow``. MLM-only pre-training
    (the control) is ``DupMAEConfig(dec_weight=0, bow_weight=0)``."""

    encoder_mask: float = 0.3
    decoder_mask: float = 0.5
    whole_word: bool = True
    mlm_weight: float = 1.0
    dec_weight: float = 1.0
    bow_weight: float = 0.1

    def __post_init__(self):
        for name in ("encoder_mask", "decoder_mask"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


# --- masking ------------------------------------------------------------------------------------------------------
def _continuation_table(tokenizer: TextTokenizer) -> torch.Tensor:
    """``[V]`` bool: True for WordPiece continuation pieces (``##...``), which belong to the word before them."""
    vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
    table = torch.zeros(max(vocab.values()) + 1, dtype=torch.bool)
    for tok, i in vocab.items():
        if tok.startswith("##"):
            table[i] = True
    return table


def _words(row_ids: list[int], special: set[int], cont: torch.Tensor | None) -> list[list[int]]:
    """Candidate words of one row as lists of positions (HF ``_whole_word_mask``): special tokens are skipped and a
    ``##`` piece joins the word before it. ``cont=None``: every token is its own word."""
    words: list[list[int]] = []
    for pos, t in enumerate(row_ids):
        if t in special:
            continue
        if cont is not None and words and t < len(cont) and bool(cont[t]):
            words[-1].append(pos)
        else:
            words.append([pos])
    return words


def _draw_word_mask(words: list[list[int]], n_total: int, ratio: float, generator: torch.Generator) -> list[int]:
    """Positions of one whole-word mask: words in random order, added while they fit in
    ``max(1, round(ratio * n_total))`` tokens (words that would overshoot are skipped)."""
    if ratio <= 0 or not words:
        return []
    budget = max(1, int(round(n_total * ratio)))
    chosen: list[int] = []
    for w in torch.randperm(len(words), generator=generator).tolist():
        if len(chosen) >= budget:
            break
        if len(chosen) + len(words[w]) > budget:
            continue
        chosen.extend(words[w])
    return chosen


def whole_word_mask(ids: torch.Tensor, mask: torch.Tensor, ratio: float, generator: torch.Generator,
                    special_ids: Sequence[int], continuation: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, n]`` bool: the positions chosen for masking, per row ``max(1, round(ratio * length))`` tokens taken as
    whole words (HF ``DataCollatorForWholeWordMask``); never a special token or padding. ``continuation=None``
    masks single tokens."""
    special = set(int(s) for s in special_ids)
    out = torch.zeros_like(mask, dtype=torch.bool)
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        words = _words(ids[b, :n].tolist(), special, continuation)
        out[b, _draw_word_mask(words, n, ratio, generator)] = True
    return out


def mlm_corrupt(ids: torch.Tensor, chosen: torch.Tensor, mask_id: int, vocab_size: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption of the ``chosen`` positions: 80% ``[MASK]``, 10% a random token, 10% unchanged. Returns
    ``(corrupted ids, labels)``, labels ``-100`` outside ``chosen``."""
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    u = torch.rand(ids.shape, generator=generator)
    replace = chosen & (u < 0.8)
    rand = chosen & (u >= 0.8) & (u < 0.9)
    out = ids.clone()
    out[replace] = mask_id
    out[rand] = torch.randint(vocab_size, (int(rand.sum()),), generator=generator)
    return out, labels


def decoder_visibility(ids: torch.Tensor, mask: torch.Tensor, ratio: float, generator: torch.Generator,
                       special_ids: Sequence[int], continuation: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, n, n]`` bool, True where query row ``i`` may attend to position ``j`` in the enhanced decoder: each row
    draws its own whole-word mask at ``ratio`` and sees the positions it left, never itself; ``[CLS]`` and ``[SEP]``
    are never masked (so every row but ``[CLS]``'s own sees ``[CLS]``); padding is never seen. A padding row sees
    only ``[CLS]`` (its output is not scored)."""
    special = set(int(s) for s in special_ids)
    b_, n_ = ids.shape
    vis = torch.zeros(b_, n_, n_, dtype=torch.bool)
    for b in range(b_):
        n = int(mask[b].sum())
        words = _words(ids[b, :n].tolist(), special, continuation)
        vis[b, :n, :n] = True
        for i in range(n):
            hidden = _draw_word_mask(words, n, ratio, generator)
            vis[b, i, hidden] = False
            vis[b, i, i] = False
        vis[b, n:, 0] = True
    return vis


def bow_target(ids: torch.Tensor, mask: torch.Tensor, vocab_size: int, special_ids: Sequence[int]) -> torch.Tensor:
    """``[B, V]``: ``1/L`` at every distinct token of the row's ``L`` non-special tokens (the code's
    ``bag_word_weight``: a repeated token gets ``1/L`` once, so a row sums to ``distinct/L``)."""
    keep = mask.clone()
    for s in special_ids:
        keep &= ids != int(s)
    count = keep.sum(1, keepdim=True).clamp(min=1).float()
    q = torch.zeros(ids.shape[0], vocab_size)
    rows = torch.arange(ids.shape[0])[:, None].expand_as(ids)
    q[rows[keep], ids[keep]] = 1.0
    return q / count


# --- the losses' pieces --------------------------------------------------------------------------------------------
def ot_vector(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The ordinary tokens' vocabulary vector ``[B, V]``: the max over positions ``1..n-1`` (``[CLS]`` excluded) of
    the vocabulary logits ``[B, n, V]``, padding excluded (``mask`` ``[B, n]``, True on real tokens)."""
    lg, m = logits[:, 1:], mask[:, 1:].to(logits.device)
    return lg.masked_fill(~m.unsqueeze(-1), torch.finfo(lg.dtype).min).amax(1)


def bow_loss(ot: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean_b -sum_v target[b, v] * log_softmax(ot[b])_v`` (the code's ``decoder_ot_loss``)."""
    return -(target.to(ot.device) * F.log_softmax(ot.float(), dim=-1)).sum(-1).mean()


def sparsify(ot: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """``ReLU`` then keep the ``top_k`` largest entries of each row (all of them when ``top_k`` is None or at least
    the width), zeros elsewhere."""
    x = F.relu(ot)
    if top_k is None or top_k >= x.shape[-1]:
        return x
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    vals, idx = x.topk(top_k, dim=-1)
    return torch.zeros_like(x).scatter_(-1, idx, vals)


# --- modules -------------------------------------------------------------------------------------------------------
class MLMHead(nn.Module):
    """BERT's MLM head (``BertLMPredictionHead``): ``LayerNorm(GELU(dense(h))) @ E^T + bias`` with ``E`` the encoder's
    word-embedding matrix, passed at call time (tied, stored once). ``init="identity"`` starts the dense layer at the
    identity; ``"normal"`` at BERT's normal(0.02)."""

    def __init__(self, width: int, vocab_size: int, eps: float = 1e-12, init: str = "identity", seed: int = 0):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.ln = nn.LayerNorm(width, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.init = init
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if init == "identity":
                self.dense.weight.copy_(torch.eye(width))
            elif init == "normal":
                nn.init.normal_(self.dense.weight, std=0.02)
            else:
                raise ValueError(f"head init must be 'identity' or 'normal', got {init!r}")
            nn.init.zeros_(self.dense.bias)

    def forward(self, h: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.ln(F.gelu(self.dense(h))), word_embeddings, self.bias)


class EnhancedDecoderLayer(nn.Module):
    """One post-LN BERT layer whose queries and keys/values come from different streams (RetroMAE's
    ``BertLayerForDecoder``): ``x = LN(query + attn(query -> context, visible)); x = LN(x + mlp(x))``."""

    def __init__(self, width: int, heads: int, mlp_dim: int, eps: float = 1e-12, seed: int = 0):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)

    def forward(self, query: torch.Tensor, context: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """``query``, ``context`` ``[B, n, W]``; ``visible`` ``[B, n, n]`` bool (row: query position)."""
        b, n, w = query.shape
        d = w // self.heads
        q = self.q(query).view(b, n, self.heads, d).transpose(1, 2)
        k, v = self.kv(context).view(b, n, 2, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(
            ~visible.to(q.device), float("-inf"))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None])
        x = self.ln_1(query + self.out(y.transpose(1, 2).reshape(b, n, w)))
        return self.ln_2(x + self.fc2(F.gelu(self.fc1(x))))


@dataclass
class DupMAEBatch:
    """One collated batch: the clean ``ids``/``mask``, the encoder's corrupted ``enc_ids`` and ``enc_labels``, the
    decoder's ``visible`` ``[B, n, n]`` and ``dec_labels``, and the BoW target ``bow`` ``[B, V]``."""

    ids: torch.Tensor
    mask: torch.Tensor
    enc_ids: torch.Tensor
    enc_labels: torch.Tensor
    visible: torch.Tensor
    dec_labels: torch.Tensor
    bow: torch.Tensor


class DupMAECollator:
    """Texts -> :class:`DupMAEBatch` with the tokenizer's special tokens (``[CLS]``, ``[SEP]``, ``[MASK]``, padding)
    and ``config``'s mask ratios. The encoder mask is drawn first, then the decoder rows, from ``generator``."""

    def __init__(self, tokenizer: TextTokenizer, vocab_size: int, config: DupMAEConfig | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.config = config or DupMAEConfig()
        self.cls_id = tokenizer.token_id("[CLS]")
        self.sep_id = tokenizer.token_id("[SEP]")
        self.mask_id = tokenizer.token_id("[MASK]")
        self.special = (self.cls_id, self.sep_id, tokenizer.pad_id)
        self.continuation = _continuation_table(tokenizer) if self.config.whole_word else None

    def __call__(self, texts: Sequence[str], generator: torch.Generator) -> DupMAEBatch:
        tb: TextBatch = self.tokenizer(list(texts))
        ids, mask = tb.ids, tb.mask
        cfg = self.config
        chosen = whole_word_mask(ids, mask, cfg.encoder_mask, generator, self.special, self.continuation)
        enc_ids, enc_labels = mlm_corrupt(ids, chosen, self.mask_id, self.vocab_size, generator)
        visible = decoder_visibility(ids, mask, cfg.decoder_mask, generator, self.special, self.continuation)
        dec_labels = ids.masked_fill(~mask, -100)
        dec_labels[:, 0] = -100  # [CLS]
        dec_labels[torch.arange(len(ids)), tb.last_index] = -100  # the closing [SEP]
        return DupMAEBatch(ids, mask, enc_ids, enc_labels, visible, dec_labels,
                           bow_target(ids, mask, self.vocab_size, self.special))


class DupMAE(nn.Module):
    """The pre-training model: a :class:`~cliplab.models.lm.BertEncoder`, the tied :class:`MLMHead` and the
    one-layer :class:`EnhancedDecoderLayer`. ``forward(batch)`` returns the weighted loss and its parts. ``head``
    continues from a trained head instead of a fresh one (``head_init``)."""

    def __init__(self, encoder: BertEncoder, config: DupMAEConfig | None = None, head_init: str = "identity",
                 seed: int = 0, head: MLMHead | None = None):
        super().__init__()
        if not isinstance(encoder, BertEncoder):
            raise TypeError(f"DupMAE pre-trains a BertEncoder, got {type(encoder).__name__}")
        cfg = encoder.cfg
        self.encoder = encoder
        self.config = config or DupMAEConfig()
        self.head = head if head is not None else MLMHead(cfg.width, cfg.vocab_size, cfg.eps, init=head_init,
                                                            seed=seed)
        self.decoder = EnhancedDecoderLayer(cfg.width, cfg.heads, cfg.mlp_dim, cfg.eps, seed=seed + 1)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h, self.encoder.token_embed.weight)

    def embed_positions(self, x: torch.Tensor) -> torch.Tensor:
        """BERT's embedding layer on word vectors ``x`` ``[B, n, W]``: ``LN(x + position + type 0)`` (RetroMAE reuses
        the encoder's embedding module for the decoder's both streams)."""
        enc = self.encoder
        n = x.shape[1]
        return enc.ln_embed(x + enc.pos_embed.weight[:n] + enc.type_embed.weight[0])

    def decode(self, cls: torch.Tensor, ids: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """The enhanced decoder's output ``[B, n, W]``: queries ``LN(cls + pos_i + type)``, keys/values ``[cls;
        LN(tok_j + pos_j + type)]`` of the clean ``ids``."""
        b, n = ids.shape
        query = self.embed_positions(cls[:, None, :].expand(b, n, cls.shape[-1]))
        context = torch.cat([cls[:, None, :], self.embed_positions(self.encoder.token_embed(ids))[:, 1:]], dim=1)
        return self.decoder(query, context, visible)

    def forward(self, batch: DupMAEBatch) -> dict[str, torch.Tensor]:
        cfg = self.config
        states = self.encoder(batch.enc_ids, batch.mask).tokens  # the last layer, [B, n, W]
        picked = batch.enc_labels != -100
        zero = states.new_zeros(())
        parts = {}
        if cfg.bow_weight:
            logits = self.logits(states)  # every position: the MLM loss and the BoW max-pool share them
            parts["mlm"] = F.cross_entropy(logits[picked], batch.enc_labels[picked]) if picked.any() else zero
            parts["bow"] = bow_loss(ot_vector(logits, batch.mask), batch.bow)
        else:
            parts["mlm"] = (F.cross_entropy(self.logits(states[picked]), batch.enc_labels[picked])
                            if picked.any() else zero)
            parts["bow"] = zero
        if cfg.dec_weight:
            out = self.decode(states[:, 0], batch.ids, batch.visible)
            scored = batch.dec_labels != -100
            parts["dec"] = (F.cross_entropy(self.logits(out[scored]), batch.dec_labels[scored])
                            if scored.any() else zero)
        else:
            parts["dec"] = zero
        parts["loss"] = cfg.mlm_weight * parts["mlm"] + cfg.dec_weight * parts["dec"] + cfg.bow_weight * parts["bow"]
        return parts


# --- the embedder --------------------------------------------------------------------------------------------------
class DupMAEEmbedder(SequenceEmbedder):
    """A BERT encoder and its vocabulary head as a :class:`~cliplab.text.TextEmbedder` with DupMAE's representation.

    ``encode(texts, pooling=...)``: ``None``/``"dupmae"`` -> ``[[CLS] (projected); topk(ReLU(OT))]`` (each part
    L2-normalised when ``normalize_parts``); ``"dupmae_cls"`` / ``"dupmae_ot"`` -> one part; any registered pooling
    (``"mean"``, ``"first"``, ...) -> that pooling of the encoder's final states. ``part`` sets the default."""

    def __init__(self, name: str, model: BertEncoder, tokenizer, head: MLMHead, *, top_k: int | None = 384,
                 normalize_parts: bool = True, part: str = "dupmae"):
        super().__init__(name, model, tokenizer, "first")
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        self.head = head.eval()
        self.top_k = top_k
        self.normalize_parts = normalize_parts
        self.default_pooling = part

    @classmethod
    def from_encoder(cls, embedder: SequenceEmbedder, head: MLMHead | None = None, head_init: str = "identity",
                     **kw) -> "DupMAEEmbedder":
        """DupMAE's representation on an encoder embedder (e.g. ``load_embedder("all-MiniLM-L6-v2")``), with a
        trained ``head`` or a fresh one (``head_init``); ``kw`` as in the constructor. Shares the weights."""
        cfg = embedder.model.cfg
        head = head or MLMHead(cfg.width, cfg.vocab_size, cfg.eps, init=head_init)
        return cls(embedder.name, embedder.model, embedder.tokenizer, head, **kw)

    def part_dim(self, part: str) -> int:
        w, v = self.model.cfg.width, self.model.cfg.vocab_size
        return {"dupmae": w + v, "dupmae_cls": w, "dupmae_ot": v}[part]

    @property
    def dim(self) -> int:
        return self.part_dim(self.default_pooling)

    def represent(self, states: torch.Tensor, mask: torch.Tensor, part: str = "dupmae") -> torch.Tensor:
        """The representation of final token states ``[B, n, W]`` (see the class docstring)."""
        states = states.float()
        pieces = []
        if part in ("dupmae", "dupmae_cls"):
            c = states[:, 0]
            pieces.append(F.normalize(c, dim=-1) if self.normalize_parts else c)
        if part in ("dupmae", "dupmae_ot"):
            head = self.head.to(states.device).float()
            o = sparsify(ot_vector(head(states, self.model.token_embed.weight.float()), mask), self.top_k)
            pieces.append(F.normalize(o, dim=-1) if self.normalize_parts else o)
        return torch.cat(pieces, dim=-1)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], pooling: str | Pooling | None = None, normalize: bool = False,
               batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts; wrap a single text in a list")
        part = pooling or self.default_pooling
        pool = None
        if isinstance(part, Pooling) or part not in PARTS:  # a plain pooling of the encoder's final states
            pool = get_pooling(part)
            texts = self.prepare_texts(texts, pool, stacklevel=3)
        width = self.model.cfg.width if pool is not None else self.part_dim(part)
        if not texts:
            return torch.empty(0, width)
        batch = self.tokenize(texts, stacklevel=3)
        out = torch.empty(len(batch), width)
        for rows, sub in self.iter_batches(batch, batch_size, progress):
            states = self.token_states(sub).tokens
            mask = sub.mask.to(states.device)
            out[rows] = (pool(states, mask) if pool is not None else self.represent(states, mask, part)).cpu()
        return F.normalize(out, dim=-1) if normalize else out

    def token_states(self, batch: TextBatch, **kw):
        device = self.model.token_embed.weight.device
        return self.model(batch.ids.to(device), batch.mask.to(device), **kw)

    def set_precision(self, precision: str) -> "DupMAEEmbedder":
        super().set_precision(precision)
        self.head.to(self.model.token_embed.weight.dtype)
        return self

    def save(self, directory, **kw) -> Path:
        """Write the encoder, its tokenizer, the head and the settings; ``load_embedder(directory)`` reads it back."""
        state = dict(self.model.state_dict())
        state.update({f"dupmae.head.{k}": v for k, v in self.head.state_dict().items()})
        extra = {"top_k": self.top_k, "normalize_parts": self.normalize_parts, "head_init": self.head.init}
        return save_embedder(self, directory, kind=KIND, extra=extra, state=state)


@register_embedder_kind(KIND)
def _load_dupmae(directory: Path, meta: dict) -> DupMAEEmbedder:
    meta, state, tok = read_saved(directory)
    model = load_model_state(meta, state)
    cfg, extra = model.cfg, meta["extra"]
    head = MLMHead(cfg.width, cfg.vocab_size, cfg.eps, init=extra.get("head_init", "identity"))
    head.load_state_dict({k[len("dupmae.head."):]: v for k, v in state.items() if k.startswith("dupmae.head.")})
    return DupMAEEmbedder(meta["name"], model, tok, head, top_k=extra["top_k"],
                          normalize_parts=extra["normalize_parts"], part=meta["default_pooling"])


# --- pre-training --------------------------------------------------------------------------------------------------
@dataclass
class PretrainResult:
    embedder: DupMAEEmbedder
    model: DupMAE
    fit: FitResult
    config: dict = field(default_factory=dict)


def pretrain(embedder: SequenceEmbedder, texts: Sequence[str], *, steps: int, batch_size: int = 32,
             lr: float = 1e-4, warmup: float = 0.1, weight_decay: float = 0.01, config: DupMAEConfig | None = None,
             head_init: str = "identity", top_k: int | None = 384, seed: int = 0, progress: bool | None = None,
             log_every: int = 10, name: str | None = None) -> PretrainResult:
    """Pre-train a copy of ``embedder``'s BERT encoder on ``texts`` with the DupMAE objective (``config``; the
    MLM-only control is ``DupMAEConfig(dec_weight=0, bow_weight=0)``) for ``steps`` AdamW steps of ``batch_size``
    texts (``lr``, ``warmup`` as a fraction of the steps, ``weight_decay``; ``cliplab.text.training.fit``).
    Batches walk seeded permutations of ``texts``; step ``i``'s masks come from a generator seeded by ``(seed, i)``,
    so two configs with the same seed see the same texts and the same encoder masks. The input is left untouched.
    A :class:`DupMAEEmbedder` input continues with a copy of its own head (``head_init`` is then unused).
    Returns the trained :class:`DupMAEEmbedder` (``top_k``), the :class:`DupMAE` model and the fit record."""
    texts = list(texts)
    if not texts:
        raise ValueError("pretrain needs texts")
    if batch_size < 1 or steps < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    config = config or DupMAEConfig()
    encoder = copy.deepcopy(embedder.model).float().train()
    head = copy.deepcopy(embedder.head).float().train() if isinstance(embedder, DupMAEEmbedder) else None
    model = DupMAE(encoder, config, head_init=head_init, seed=seed, head=head)
    collate = DupMAECollator(embedder.tokenizer, encoder.cfg.vocab_size, config)
    perm_gen = torch.Generator().manual_seed(seed)
    order: list[int] = []

    def step(i: int):
        while len(order) < (i + 1) * batch_size:
            order.extend(torch.randperm(len(texts), generator=perm_gen).tolist())
        rows = order[i * batch_size : (i + 1) * batch_size]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        parts = model(collate([texts[r] for r in rows], gen))
        return parts["loss"], {k: v.detach() for k, v in parts.items() if k != "loss"}

    result = fit(model.parameters(), step, steps=steps, lr=lr, warmup=int(round(warmup * steps)),
                 weight_decay=weight_decay, seed=seed, progress=progress, log_every=log_every, desc="dupmae")
    model.eval()
    emb = DupMAEEmbedder(name or f"{embedder.name}+dupmae", encoder, embedder.tokenizer, model.head, top_k=top_k)
    return PretrainResult(emb, model, result, {"config": asdict(config), "steps": steps, "batch_size": batch_size,
                                               "lr": lr, "warmup": warmup, "weight_decay": weight_decay,
                                               "head_init": head_init, "seed": seed})


# --- a toy WordPiece tokenizer (for tests and examples without the real models) -----------------------------------
# --- the entry point of ``cliplab textrep train dupmae`` ----------------------------------------------------------
DEFAULT_MODEL = "all-MiniLM-L6-v2"


@register_trainer("dupmae", DEFAULT_MODEL, "duplex masked auto-encoding ([CLS] decoding + bag of words); [CLS] + "
                  "sparse vocabulary embedding")
def cli_train(model: str | None, texts: Sequence[str], *, steps: int, batch_size: int | None = None,
              lr: float | None = None, seed: int = 0, progress: bool = False) -> DupMAEEmbedder:
    """DupMAE pre-training for the command line: load ``model`` (a BERT encoder's name or a saved directory; None:
    ``all-MiniLM-L6-v2``) with ``cliplab.text.load_embedder``, :func:`pretrain` it on ``texts`` with the paper's
    objective (``batch_size`` None: 32; ``lr`` None: 1e-4) and return the embedder (``.save(dir)`` writes it)."""
    from ..text import load_embedder

    base = load_embedder(model or DEFAULT_MODEL)
    if not isinstance(getattr(base, "model", None), BertEncoder):
        raise TypeError(f"dupmae pre-trains a BERT encoder; {model!r} is a {type(base).__name__}")
    return pretrain(base, texts, steps=steps, batch_size=32 if batch_size is None else batch_size,
                    lr=1e-4 if lr is None else lr, seed=seed, progress=progress).embedder
