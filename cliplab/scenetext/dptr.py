"""DPTR: decoder pre-training with text only, for scene text recognition.

Paper: S. Zhao et al., "Decoder Pre-Training with only Text for Scene Text Recognition" (ACM MM 2024; official code
Topdu/OpenOCR). A recognition decoder is pre-trained on *text alone*: the frozen CLIP text encoder's per-token outputs
of a prompt holding the word stand in for the visual features the decoder will later read (the decoder memory), and
the decoder learns to spell the word from them. Then the decoder is fine-tuned on images, reading the image encoder's
tokens through the Feature Merge Unit.

* :func:`word_memory`: the memory of pre-training, ``E_T(template.format(word))`` per token, in the joint space
  (after ``ln_final`` and the text projection; rows up to and including EOT, the longest prompt of the batch).
* **ORP** (Offline Randomized Perturbation, :func:`orp_bank`, :func:`orp_perturb`): a bank of image-encoder token
  features of word-free scenes is extracted once (offline); for each sample one bank image and ``L`` of its token
  rows (``L`` = memory length, drawn without replacement) are picked at random and ``scale * rows`` is added to the
  memory (``scale = 0.1``, the paper's value).
* **FMU** (:class:`FeatureMergeUnit`): ``n_queries`` learnable queries (26, the paper's) cross-attend (pre-LN,
  residual) to the image tokens, then an FFN (pre-LN, residual); output ``[B, n_queries, D]`` whatever the number of
  image tokens. It is the decoder memory during fine-tuning.
* Where it acts on the CLIP model: the text memory is the text tower's per-token output after ``ln_final`` and the
  projection (joint space); the image memory is the image tower's per-token output after ``ln_post`` and ``proj``
  (``encode_image(output="tokens")``: CLS and patches, same joint space). So pre-training and fine-tuning memories
  live in the space CLIP aligned.

Choices that differ from the paper, and why:

* Decoder: a 2-layer left-to-right autoregressive transformer decoder (NRTR-style, one ordering) of width 64 (a
  linear map takes the memory from the CLIP joint width, 128 on ``shapes-tiny``), not PARSeq's 6-layer permutation
  language model of width 512: CPU scale. The paper shows DPTR on NRTR-style decoders too.
* The image encoder is frozen during fine-tuning and its tokens are precomputed (the paper fine-tunes it): CPU scale;
  the FMU and the decoder are trained. Both arms of the ablation get the same treatment.
* Template ``'the word "{}"'`` (the shipped ``shapes-tiny`` captions' phrasing) instead of ``"a photo of a '{}'"``.
* The ORP bank is the shapes world's word-free scenes (no natural images are available offline).
* Images are the scene-text words of :mod:`cliplab.scenetext.dataset` at 64 px (DejaVu fonts), not Union14M.

Measured (``experiments/dptr_ablation.py``, docs/methods/dptr.md): no effect established on ``shapes-tiny``, whose
image tower cannot read TrueType words (zero-shot at chance), so DPTR's premise of aligned image and text tokens
does not hold for the stand-in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..methods import register_method

register_method(
    "dptr",
    "Decoder Pre-Training with only Text for Scene Text Recognition (DPTR)",
    "a recognition decoder pre-trained on CLIP text-encoder token outputs of words (plus ORP image-token noise), "
    "then fine-tuned on images through the Feature Merge Unit's 26 learnable queries",
    doc="docs/methods/dptr.md",
)(__name__)

__all__ = ["CHARSET", "TEMPLATE", "word_memory", "orp_bank", "orp_perturb", "image_tokens", "FeatureMergeUnit",
           "RecognitionDecoder", "pretrain_text_only", "finetune_on_images", "word_accuracy"]

CHARSET = "abcdefghijklmnopqrstuvwxyz"
TEMPLATE = 'the word "{}"'


def word_memory(model, words: Sequence[str], template: str = TEMPLATE) -> torch.Tensor:
    """Frozen CLIP text-encoder per-token outputs ``[len(words), L, D]`` of ``template.format(word)`` (joint space,
    rows 0..EOT of the longest prompt)."""
    tok = model.tokenize([template.format(w) for w in words])
    with torch.no_grad():
        out = model.encode_text(tok, output="tokens")
    length = int(tok.lengths.max())
    return out.tokens[:, :length].float()


def image_tokens(model, images: Sequence, batch_size: int = 64) -> torch.Tensor:
    """Frozen image-encoder per-token outputs ``[len(images), 1 + N, D]`` (CLS and patches, after ``ln_post`` and
    ``proj``) of PIL images."""
    chunks = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            px = torch.stack([model.preprocess(im) for im in images[i:i + batch_size]])
            chunks.append(model.encode_image(px, output="tokens").tokens.float())
    return torch.cat(chunks)


def orp_bank(model, images: Sequence, batch_size: int = 64) -> torch.Tensor:
    """The offline ORP bank ``[B, N, D]``: image-encoder token features of (word-free) images, extracted once."""
    return image_tokens(model, images, batch_size)


def orp_perturb(memory: torch.Tensor, bank: torch.Tensor, scale: float = 0.1,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """ORP: ``memory [B, L, D] + scale * bank[j_b, rows_b]`` with one random bank image ``j_b`` per sample and ``L``
    random token rows of it (without replacement when ``L <= N``)."""
    b, length, d = memory.shape
    if bank.dim() != 3 or bank.shape[-1] != d:
        raise ValueError(f"ORP bank must be [B, N, {d}], got {tuple(bank.shape)}")
    picks = torch.randint(bank.shape[0], (b,), generator=generator)
    n = bank.shape[1]
    if length <= n:
        rows = torch.stack([torch.randperm(n, generator=generator)[:length] for _ in range(b)])
    else:
        rows = torch.randint(n, (b, length), generator=generator)
    noise = bank[picks[:, None], rows]
    return memory + scale * noise.to(memory.dtype)


class FeatureMergeUnit(nn.Module):
    """``n_queries`` learnable queries; pre-LN cross-attention to the image tokens (residual), then a pre-LN FFN
    (residual). ``[B, N, D]`` -> ``[B, n_queries, D]``."""

    def __init__(self, dim: int, n_queries: int = 26, heads: int = 4, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_queries, dim) * 0.02)
        self.ln_q, self.ln_kv, self.ln_ffn = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        q = self.queries.expand(visual.shape[0], -1, -1)
        kv = self.ln_kv(visual)
        x = q + self.attn(self.ln_q(q), kv, kv, need_weights=False)[0]
        return x + self.ffn(self.ln_ffn(x))


class RecognitionDecoder(nn.Module):
    """Left-to-right autoregressive character decoder over a memory ``[B, L, D]``. Targets: 0 = EOS, ``1 + i`` =
    ``charset[i]``; input tokens: 0 = pad, 1 = BOS, ``2 + i`` = ``charset[i]``."""

    def __init__(self, memory_dim: int, dim: int = 64, charset: str = CHARSET, layers: int = 2, heads: int = 4,
                 max_len: int = 12) -> None:
        super().__init__()
        self.charset, self.max_len = charset, max_len
        self.memory_in = nn.Linear(memory_dim, dim)  # memory (CLIP joint width) -> decoder width
        self.embed = nn.Embedding(len(charset) + 2, dim)
        self.pos = nn.Parameter(torch.randn(max_len + 1, dim) * 0.02)
        layer = nn.TransformerDecoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerDecoder(layer, layers)
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, len(charset) + 1)  # EOS (0) and the characters (1..)

    def encode_labels(self, words: Sequence[str]) -> torch.Tensor:
        """``[B, max_len + 1]`` targets: character ids 1.. then EOS 0, padded with -100 (ignored)."""
        out = torch.full((len(words), self.max_len + 1), -100, dtype=torch.long)
        for i, w in enumerate(words):
            if len(w) > self.max_len or any(c not in self.charset for c in w):
                raise ValueError(f"word {w!r}: need <= {self.max_len} characters from the charset")
            ids = [self.charset.index(c) + 1 for c in w] + [0]
            out[i, :len(ids)] = torch.tensor(ids)
        return out

    def _logits(self, inputs: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        n = inputs.shape[1]
        causal = torch.triu(torch.full((n, n), float("-inf")), diagonal=1)
        x = self.embed(inputs) + self.pos[:n]
        return self.head(self.ln(self.blocks(x, self.memory_in(memory), tgt_mask=causal)))

    def loss(self, memory: torch.Tensor, words: Sequence[str]) -> torch.Tensor:
        """Teacher-forced character cross-entropy (EOS included)."""
        target = self.encode_labels(words)
        # input tokens: BOS = 1, character target c (1..) -> c + 1; after EOS only ignored targets follow (pad 0)
        shifted = torch.where(target > 0, target + 1, 0)
        inputs = torch.cat([torch.ones(len(words), 1, dtype=torch.long), shifted[:, :-1]], dim=1)
        logits = self._logits(inputs, memory)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)

    @torch.no_grad()
    def decode(self, memory: torch.Tensor) -> list[str]:
        """Greedy decoding until EOS (or ``max_len``)."""
        b = memory.shape[0]
        inputs = torch.ones(b, 1, dtype=torch.long)
        chars = torch.zeros(b, 0, dtype=torch.long)
        for _ in range(self.max_len + 1):
            nxt = self._logits(inputs, memory)[:, -1].argmax(-1)
            chars = torch.cat([chars, nxt[:, None]], dim=1)
            inputs = torch.cat([inputs, nxt[:, None] + 1], dim=1)
        words = []
        for row in chars.tolist():
            end = row.index(0) if 0 in row else len(row)
            words.append("".join(self.charset[c - 1] for c in row[:end]))
        return words


def pretrain_text_only(decoder: RecognitionDecoder, memory: torch.Tensor, words: Sequence[str], *, steps: int = 300,
                       batch_size: int = 64, lr: float = 1e-3, bank: torch.Tensor | None = None,
                       orp_scale: float = 0.1, seed: int = 0) -> list[float]:
    """DPTR pre-training: the decoder learns to spell ``words[i]`` from ``memory[i]`` (:func:`word_memory`), with ORP
    noise from ``bank`` when given. Returns the loss per step."""
    if len(words) != memory.shape[0]:
        raise ValueError("memory needs one row per word (use word_memory(model, words))")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    decoder.train()
    for _ in range(steps):
        idx = torch.randint(len(words), (batch_size,), generator=g)
        mem = memory[idx]
        if bank is not None:
            mem = orp_perturb(mem, bank, orp_scale, generator=g)
        loss = decoder.loss(mem, [words[i] for i in idx.tolist()])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def finetune_on_images(decoder: RecognitionDecoder, fmu: FeatureMergeUnit, visual: torch.Tensor,
                       words: Sequence[str], *, steps: int = 200, batch_size: int = 32, lr: float = 1e-3,
                       seed: int = 0, on_step=None) -> list[float]:
    """Fine-tuning: FMU and decoder trained together on image tokens ``visual [M, N, D]`` labelled ``words``.
    ``on_step(step)`` (optional) is called after each step (e.g. to evaluate at checkpoints)."""
    if len(words) != visual.shape[0]:
        raise ValueError("visual needs one row of image tokens per label")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(list(decoder.parameters()) + list(fmu.parameters()), lr=lr, weight_decay=0.0)
    losses = []
    decoder.train()
    fmu.train()
    for _ in range(steps):
        idx = torch.randint(len(words), (batch_size,), generator=g)
        loss = decoder.loss(fmu(visual[idx]), [words[i] for i in idx.tolist()])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(len(losses))
    return losses


@torch.no_grad()
def word_accuracy(decoder: RecognitionDecoder, fmu: FeatureMergeUnit | None, memory: torch.Tensor,
                  words: Sequence[str]) -> float:
    """Fraction of exactly recognised words; ``fmu=None`` reads ``memory`` directly (text memories)."""
    decoder.eval()
    if fmu is not None:
        fmu.eval()
        memory = fmu(memory)
    return sum(p == w for p, w in zip(decoder.decode(memory), words)) / max(1, len(words))
