"""Learn Your Tokens (ltok): bytes pooled into word vectors inside the model, a word-level LM, a byte decoder.

Paper: *Learn Your Tokens: Word-Pooled Tokenization for Language Modeling*, Avijit Thawani, Saurabh Ghanekar,
Xiaoyuan Zhu, Jay Pujara (Findings of EMNLP 2023; code avi-jit/eTok). The model:

1. **Segmentation** (:func:`segment`): the text is split on spaces into words; each word's UTF-8 bytes become a
   *unit*, closed by a terminal symbol: ``EOW`` (a space follows), ``END`` (the text ends) or ``JOIN`` (a word longer
   than ``max_word_len`` bytes continues in the next unit). :func:`unsegment` inverts it exactly.
2. **Word encoder** (``encoder``, a :class:`~cliplab.models.lm.LlamaDecoder` of ``encoder_layers``): each unit is its
   own row ``c_1 .. c_L term POOL``, so attention never crosses units; the word vector is the final state (after
   the last RMSNorm) at ``POOL``.
3. **Word LM** (``word_lm``, ``layers`` blocks, causal): input ``[BOS, w_1, ..., w_{T-1}]``; its final state ``h_t``
   at position ``t`` is the context for unit ``t + 1``.
4. **Byte decoder** (``decoder``, ``decoder_layers``): per unit, the row ``[P h_t, c_1, ..., c_L]`` predicts
   ``c_1, ..., c_L, term`` (``P`` a linear map of the word state); all units of all texts run in parallel.
5. **Loss**: the summed byte-level cross-entropy (terminals included), so :func:`ltok_nll` over a text is a full
   likelihood of its bytes, spaces and end: bits per byte compare with byte and BPE LMs
   (:func:`cliplab.textrep.lm_training.bits_per_byte`).

Choices that differ from the paper, and why:

* *Causal encoder, pool at the end.* The paper's word encoder prefixes ``[W]`` tokens and reads them; here the
  encoder is cliplab's causal Llama block, so the pooling token goes *last*, where it sees every byte of the unit.
* *Terminal symbols.* Word boundaries are spaces only (captions have no other whitespace after
  :func:`~cliplab.textrep.lm_training.normalize_text`); the terminal symbol makes the byte likelihood complete (the
  paper decodes a fixed number of characters per word and scores next-word accuracy).
* *Metric.* Bits per byte on held-out Flickr8k captions (issue 26) rather than the paper's next-word accuracy; the
  same model, at equal parameters and steps, against a byte LM and a CLIP-BPE LM (``experiments/textrep_lm_ltok.py``).
* *Scale.* About a million parameters, one encoder and one decoder layer, a thousand steps on 2 CPU cores.

Where it acts: it *is* the token layer: the model's input is bytes, its output distribution is over bytes.

Public API: :func:`segment`, :func:`unsegment`, :class:`LTokConfig`, :class:`LTokLM` (``word_vectors``,
``word_states``, ``forward`` -> summed NLL), :func:`ltok_nll`, :func:`train_ltok`, :func:`evaluate_ltok_bpb`,
:func:`run` (train and measure; registered with :func:`cliplab.textrep.lm_training.register_lm_method`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..methods import register_method
from ..models.lm import LlamaDecoder
from .lm_training import bits_per_byte, count_params, normalize_text, register_lm_method, tiny_lm_config

register_method(
    "ltok",
    "Learn Your Tokens: Word-Pooled Tokenization for Language Modeling",
    "bytes pooled within words by a small encoder into word vectors, a word-level causal LM, and a byte decoder that "
    "spells the next word from the LM state; scored in bits per byte against byte and BPE LMs",
    doc="docs/methods/ltok.md",
)(__name__)

__all__ = ["EOW", "END", "JOIN", "POOL", "PAD", "N_SYMBOLS", "LTokConfig", "LTokLM", "segment", "unsegment",
           "ltok_nll", "run", "train_ltok", "evaluate_ltok_bpb"]

#: byte-vocabulary symbols after the 256 bytes
EOW, END, JOIN, POOL, PAD = 256, 257, 258, 259, 260
N_SYMBOLS = 261
TERMINALS = (EOW, END, JOIN)


def segment(text: str, max_word_len: int = 24) -> list[list[int]]:
    """Units of ``text``: each word's bytes (cut into pieces of at most ``max_word_len``) plus a terminal symbol
    (``EOW`` a space follows, ``JOIN`` the word continues, ``END`` the text ends). Spaces are the only separators;
    a text with runs of spaces or leading/trailing spaces does not round-trip (normalise it first)."""
    if max_word_len < 1:
        raise ValueError(f"max_word_len must be at least 1, got {max_word_len}")
    words = text.split(" ")
    if any(not w for w in words):
        raise ValueError("empty word: normalise the text to single spaces (cliplab.textrep.lm_training."
                         "normalize_text) before segmenting")
    units = []
    for k, word in enumerate(words):
        raw = word.encode("utf-8")
        pieces = [list(raw[i: i + max_word_len]) for i in range(0, len(raw), max_word_len)]
        for j, piece in enumerate(pieces):
            last_piece = j == len(pieces) - 1
            term = JOIN if not last_piece else (END if k == len(words) - 1 else EOW)
            units.append(piece + [term])
    return units


def unsegment(units: Sequence[Sequence[int]]) -> str:
    """The text of :func:`segment`'s units (exact inverse)."""
    out = bytearray()
    for u in units:
        out.extend(u[:-1])
        if u[-1] == EOW:
            out.extend(b" ")
        elif u[-1] == END:
            break
    return out.decode("utf-8")


@dataclass
class LTokConfig:
    width: int = 128
    layers: int = 4            # word-level LM blocks
    encoder_layers: int = 1
    decoder_layers: int = 1
    head_dim: int = 32
    max_word_len: int = 24
    max_words: int = 256
    word_context: bool = True  # False: the ablation, every unit decoded from the BOS state alone (no word LM input)


class LTokLM(nn.Module):
    """The three parts of the module docstring; ``forward(texts)`` -> ``(summed byte NLL in nats, bytes scored)``."""

    def __init__(self, cfg: LTokConfig | None = None, *, seed: int = 0):
        super().__init__()
        self.cfg = cfg = cfg or LTokConfig()
        kw = dict(width=cfg.width, head_dim=cfg.head_dim)
        self.encoder = LlamaDecoder(tiny_lm_config(N_SYMBOLS, layers=cfg.encoder_layers,
                                                   max_positions=cfg.max_word_len + 2, **kw))
        self.word_lm = LlamaDecoder(tiny_lm_config(1, layers=cfg.layers, max_positions=cfg.max_words, **kw))
        self.decoder = LlamaDecoder(tiny_lm_config(N_SYMBOLS, layers=cfg.decoder_layers,
                                                   max_positions=cfg.max_word_len + 2, **kw))
        self.bos = nn.Parameter(torch.zeros(cfg.width))
        self.prefix = nn.Linear(cfg.width, cfg.width, bias=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for part in (self.encoder, self.word_lm, self.decoder):
                part.init_weights()
            nn.init.normal_(self.bos, std=0.02)
            nn.init.normal_(self.prefix.weight, std=cfg.width ** -0.5)

    def units(self, texts: Sequence[str]) -> list[list[list[int]]]:
        return [segment(t, self.cfg.max_word_len) for t in texts]

    def word_vectors(self, units: Sequence[Sequence[int]]) -> torch.Tensor:
        """``[N, W]``: the encoder's final state at ``POOL`` of each unit (``bytes + terminal``), one row per unit."""
        n = max(len(u) for u in units) + 1
        ids = torch.full((len(units), n), PAD, dtype=torch.long)
        for i, u in enumerate(units):
            ids[i, : len(u)] = torch.tensor(u)
            ids[i, len(u)] = POOL
        pool_at = torch.tensor([len(u) for u in units])
        states = self.encoder(ids).tokens
        return states[torch.arange(len(units)), pool_at]

    def word_states(self, per_text: Sequence[Sequence[Sequence[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h [B, T, W], counts [B])``: the word LM's final states over ``[BOS, w_1, ..., w_{T-1}]`` of each text's
        units; ``h[b, t]`` is the context for unit ``t`` (0-based) of text ``b``."""
        counts = torch.tensor([len(u) for u in per_text])
        if int(counts.max()) > self.cfg.max_words:
            raise ValueError(f"a text has {int(counts.max())} units > max_words {self.cfg.max_words}")
        flat = [u for units in per_text for u in units]
        vectors = self.word_vectors(flat).split(counts.tolist())
        t = int(counts.max())
        x = self.bos.new_zeros(len(per_text), t, self.cfg.width)
        x[:, 0] = self.bos
        for b, v in enumerate(vectors):
            if self.cfg.word_context:
                x[b, 1: len(v)] = v[:-1]  # unit t is predicted from the units before it
            else:
                x[b, 1: len(v)] = self.bos
        return self.word_lm(inputs_embeds=x).tokens, counts

    def unit_logits(self, h: torch.Tensor, units: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [N, L+1, N_SYMBOLS], targets [N, L+1])`` of the byte decoder for ``units`` given their context
        states ``h`` ``[N, W]``; padding targets are ``-100``."""
        n = max(len(u) for u in units)
        inputs = torch.full((len(units), n), PAD, dtype=torch.long)
        targets = torch.full((len(units), n), -100, dtype=torch.long)
        for i, u in enumerate(units):
            inputs[i, 1: len(u)] = torch.tensor(u[:-1])
            targets[i, : len(u)] = torch.tensor(u)
        x = self.decoder.token_embed(inputs)
        x = torch.cat([self.prefix(h)[:, None].to(x.dtype), x[:, 1:]], dim=1)
        return self.decoder.logits(self.decoder(inputs_embeds=x).tokens), targets

    def forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, int]:
        per_text = self.units(texts)
        h, counts = self.word_states(per_text)
        flat_h = torch.cat([h[b, : int(c)] for b, c in enumerate(counts)])
        flat_units = [u for units in per_text for u in units]
        logits, targets = self.unit_logits(flat_h, flat_units)
        nll = F.cross_entropy(logits.reshape(-1, N_SYMBOLS), targets.reshape(-1), ignore_index=-100,
                              reduction="sum")
        return nll, int((targets != -100).sum())


def ltok_nll(model: LTokLM, texts: Sequence[str], batch_size: int = 64) -> float:
    """Summed NLL (nats) of ``texts`` under ``model``, without gradients."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            total += float(model(texts[i: i + batch_size])[0])
    return total


def evaluate_ltok_bpb(model: LTokLM, texts: Sequence[str], batch_size: int = 64) -> dict:
    """``{"bpb", "nats", "bytes"}`` of ``model`` on ``texts`` (every byte, space and the end scored)."""
    model.eval()
    nats = ltok_nll(model, texts, batch_size)
    return {"bpb": bits_per_byte(nats, texts), "nats": nats, "bytes": sum(len(t.encode()) for t in texts)}


def train_ltok(model: LTokLM, texts: Sequence[str], *, steps: int, batch_size: int = 32, lr: float = 3e-3,
               warmup: int | None = None, weight_decay: float = 0.01, seed: int = 0, progress: bool | None = False):
    """Train on seeded random batches of ``texts`` (per-byte mean NLL) with :func:`cliplab.text.training.fit`."""
    from ..text.training import fit

    if not texts:
        raise ValueError("no training texts")
    gen = torch.Generator().manual_seed(seed)

    def step(i):
        pick = torch.randint(len(texts), (batch_size,), generator=gen).tolist()
        total, count = model([texts[j] for j in pick])
        return total / count, {}

    model.train()
    result = fit(model.parameters(), step, steps=steps, lr=lr, warmup=warmup if warmup is not None else
                 max(1, steps // 20), weight_decay=weight_decay, seed=seed, progress=progress, desc="ltok")
    model.eval()
    return result


@register_lm_method("ltok")
def run(train_texts: Sequence[str], held_texts: Sequence[str], *, steps: int, batch_size: int | None = None,
        lr: float | None = None, seed: int = 0, progress: bool | None = False):
    """Train the default :class:`LTokLM` on ``train_texts`` and measure held-out bits per byte (texts normalised)."""
    train = [normalize_text(t) for t in train_texts]
    held = [normalize_text(t) for t in held_texts]
    model = LTokLM(LTokConfig(), seed=seed)
    fit = train_ltok(model, train, steps=steps, batch_size=batch_size or 32, lr=lr or 3e-3, seed=seed,
                     progress=progress)
    return {"method": "ltok", "params": count_params(model), "steps": steps, "final_loss": fit.losses[-1],
            **evaluate_ltok_bpb(model, held)}, model
