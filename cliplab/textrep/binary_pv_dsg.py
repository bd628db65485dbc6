"""Binary Paragraph Vectors and the Disambiguated Skip-gram.

Paper: *Vector representations of text data in deep learning*, Karol Grzegorczyk (PhD dissertation, AGH Krakow,
2019; arXiv:1901.01695), which collects *Binary Paragraph Vectors* (Grzegorczyk & Kurdziel, RepL4NLP 2017) and
*Disambiguated skip-gram model* (Grzegorczyk & Kurdziel, EMNLP 2018). No CLIP involved: these are text models.

**Binary PV-DBOW** (:class:`BinaryPVDBOW`). Each document has a free vector ``d`` (``bits`` numbers); the code is
``b = round(sigmoid(d))`` in the forward pass with the straight-through gradient of ``sigmoid(d)`` in the backward
pass (the dissertation's choice over Krizhevsky-style noise), and ``b`` predicts the document's words through a
softmax over the vocabulary (``logits = b W + c``). At inference the codes are exactly 0/1; codes for new
documents are inferred by optimising a fresh ``d`` with the word layer frozen (:meth:`BinaryPVDBOW.infer`).
``binary=False`` is the real-valued PV-DBOW of the same size (the control: ``d`` itself predicts the words). Codes
are searched in Hamming space (:mod:`cliplab.textrep.hamming`: FAISS ``IndexBinaryFlat``; XOR-popcount reference).

**Disambiguated Skip-gram** (:class:`DisambiguatedSkipGram`). Every word has ``senses`` sense vectors. A
disambiguation network scores each sense of the centre word against its context,
``p(s | w, ctx) = softmax_s(<k_{w,s}, mean_{c in ctx} q_c>)`` (its own sense keys ``k`` and context vectors ``q``),
and the loss is the sense-weighted skip-gram (negative sampling) loss ``sum_s p(s) L_sg(v_{w,s}, ctx)`` plus
``entropy_weight * H(p)``, which pushes each occurrence towards one sense. Everything is differentiable; the sense of
an occurrence is ``argmax_s p(s | w, ctx)`` (:meth:`DisambiguatedSkipGram.assign_senses`).

Choices that differ from the papers, and why:

* **Scale.** Small corpora (Flickr8k captions, a synthetic two-topic corpus), full softmax over the vocabulary (the
  papers use hierarchical softmax / negative sampling for 100k-word vocabularies), Adam instead of SGD.
* **Binary PV variants.** Only Binary PV-DBOW; the Real-Binary PV-DBOW and Binary PV-DM variants are not built.
* **Training documents.** Codes are trained for every document of the corpus (transductive, like PV itself);
  :meth:`BinaryPVDBOW.infer` gives codes for unseen documents.
* **DSG.** The disambiguation network here is one dot product of sense keys with the mean context vector (the
  paper's network also scores against context vectors; its exact parametrisation is not reproduced). The entropy
  term's weight is a parameter (default 0.1); uniform negative sampling instead of the unigram^0.75 table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..methods import register_method
from .hamming import HammingIndex, pack_codes

register_method("binary_pv_dsg", "Vector representations of text data in deep learning",
                "Binary PV-DBOW (straight-through binary document codes, Hamming search) and the Disambiguated "
                "Skip-gram (sense vectors)", doc="docs/methods/binary_pv_dsg.md")(__name__)

__all__ = ["tokenize", "Vocabulary", "build_vocabulary", "straight_through_binarize", "BinaryPVDBOW", "train_pv",
           "retrieval_precision", "DisambiguatedSkipGram", "skipgram_windows", "train_dsg", "sense_purity"]

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-cased words (letters/digits, with an inner apostrophe)."""
    return _WORD.findall(text.lower())


@dataclass
class Vocabulary:
    words: list[str]
    index: dict[str, int]

    def encode(self, text: str) -> list[int]:
        return [self.index[w] for w in tokenize(text) if w in self.index]

    def __len__(self) -> int:
        return len(self.words)


def build_vocabulary(texts: Sequence[str], min_count: int = 1) -> Vocabulary:
    counts: dict[str, int] = {}
    for t in texts:
        for w in tokenize(t):
            counts[w] = counts.get(w, 0) + 1
    words = sorted(w for w, c in counts.items() if c >= min_count)
    return Vocabulary(words, {w: i for i, w in enumerate(words)})


def straight_through_binarize(probs: torch.Tensor) -> torch.Tensor:
    """Forward: ``probs > 0.5`` as exact 0./1.; backward: the identity (straight-through)."""
    hard = (probs > 0.5).to(probs.dtype)
    return probs + (hard - probs).detach()


def _flatten_docs(docs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    doc_ids = torch.tensor([i for i, d in enumerate(docs) for _ in d], dtype=torch.long)
    word_ids = torch.tensor([w for d in docs for w in d], dtype=torch.long)
    return doc_ids, word_ids


class BinaryPVDBOW(nn.Module):
    """PV-DBOW whose document code is binary (``binary=True``) or the real-valued vector itself (the control)."""

    def __init__(self, n_docs: int, vocab_size: int, bits: int = 32, binary: bool = True, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.bits, self.binary = int(bits), bool(binary)
        self.doc = nn.Parameter(torch.randn(n_docs, bits, generator=gen) * 0.1)
        self.words = nn.Linear(bits, vocab_size)
        with torch.no_grad():
            self.words.weight.copy_(torch.randn(vocab_size, bits, generator=gen) / bits ** 0.5)
            self.words.bias.zero_()

    def code_layer(self, d: torch.Tensor) -> torch.Tensor:
        return straight_through_binarize(torch.sigmoid(d)) if self.binary else d

    def loss(self, doc_ids: torch.Tensor, word_ids: torch.Tensor, doc: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy of predicting each (document, word) occurrence's word from the document code."""
        d = (self.doc if doc is None else doc)[doc_ids]
        return F.cross_entropy(self.words(self.code_layer(d)), word_ids)

    @torch.no_grad()
    def codes(self, doc: torch.Tensor | None = None) -> torch.Tensor:
        """Binary model: ``{0,1}`` codes ``[n, bits]`` (uint8); real model: the vectors (float)."""
        d = self.doc if doc is None else doc
        return (torch.sigmoid(d) > 0.5).to(torch.uint8) if self.binary else d.detach().clone()

    def infer(self, docs: Sequence[Sequence[int]], steps: int = 200, lr: float = 0.05, seed: int = 0) -> torch.Tensor:
        """Codes of new documents (word-id lists): fresh vectors fitted with the word layer frozen."""
        gen = torch.Generator().manual_seed(seed)
        d = (torch.randn(len(docs), self.bits, generator=gen) * 0.1).requires_grad_(True)
        doc_ids, word_ids = _flatten_docs(docs)
        opt = torch.optim.Adam([d], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            self.loss(doc_ids, word_ids, doc=d).backward()  # only d is in the optimiser
            opt.step()
        self.words.zero_grad(set_to_none=True)
        return self.codes(d.detach())

    def index(self) -> HammingIndex:
        """A FAISS binary index of the training documents' codes (binary model only)."""
        if not self.binary:
            raise ValueError("a real-valued PV has no binary codes; build it with binary=True")
        return HammingIndex(self.bits).add(pack_codes(self.codes().numpy()))


def train_pv(docs: Sequence[Sequence[int]], vocab_size: int, *, bits: int = 32, binary: bool = True,
             epochs: int = 20, batch_size: int = 2048, lr: float = 0.02, seed: int = 0) -> BinaryPVDBOW:
    """Fit a (Binary) PV-DBOW on documents given as word-id lists (Adam, shuffled (doc, word) pairs)."""
    model = BinaryPVDBOW(len(docs), vocab_size, bits=bits, binary=binary, seed=seed)
    doc_ids, word_ids = _flatten_docs(docs)
    if len(word_ids) == 0:
        raise ValueError("the documents have no words in the vocabulary")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(word_ids), generator=gen)
        for i in range(0, len(perm), batch_size):
            idx = perm[i: i + batch_size]
            opt.zero_grad()
            model.loss(doc_ids[idx], word_ids[idx]).backward()
            opt.step()
    return model.eval()


def retrieval_precision(ranking: np.ndarray, labels: Sequence[int], k: int, query_ids: Sequence[int] | None = None
                        ) -> float:
    """Mean precision@k: the share of the top ``k`` (the query itself left out) that share the query's label.
    ``ranking[q]``: database ids, best first; ``query_ids[q]``: the query's own database id (default: ``q``)."""
    labels = np.asarray(labels)
    query_ids = np.arange(len(ranking)) if query_ids is None else np.asarray(query_ids)
    hits = []
    for q, row in enumerate(np.asarray(ranking)):
        row = row[row != query_ids[q]][:k]
        hits.append(float((labels[row] == labels[query_ids[q]]).mean()))
    return float(np.mean(hits))


# --- Disambiguated Skip-gram ------------------------------------------------------------------------------------------
def skipgram_windows(sentences: Sequence[Sequence[int]], window: int = 2, pad: int = -1
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(centres [N], contexts [N, 2 window])`` for every position; missing context positions hold ``pad``."""
    centres, contexts = [], []
    for s in sentences:
        for i, w in enumerate(s):
            ctx = [s[j] if 0 <= j < len(s) else pad for j in range(i - window, i + window + 1) if j != i]
            centres.append(w)
            contexts.append(ctx)
    return torch.tensor(centres, dtype=torch.long), torch.tensor(contexts, dtype=torch.long)


class DisambiguatedSkipGram(nn.Module):
    """Sense vectors ``v [V, S, dim]``, output vectors ``u [V, dim]``, and the disambiguation network's sense keys
    ``k [V, S, dim]`` and context vectors ``q [V, dim]``."""

    def __init__(self, vocab_size: int, dim: int = 32, senses: int = 2, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.senses = int(senses)
        self.sense_vectors = nn.Parameter(torch.randn(vocab_size, senses, dim, generator=gen) / dim ** 0.5)
        self.output_vectors = nn.Parameter(torch.randn(vocab_size, dim, generator=gen) / dim ** 0.5)
        self.sense_keys = nn.Parameter(torch.randn(vocab_size, senses, dim, generator=gen) / dim ** 0.5)
        self.context_vectors = nn.Parameter(torch.randn(vocab_size, dim, generator=gen) / dim ** 0.5)

    def sense_probs(self, centres: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
        """``p(s | w, ctx)`` ``[N, S]`` (context positions < 0 are padding)."""
        mask = (contexts >= 0).unsqueeze(-1).float()
        q = (self.context_vectors[contexts.clamp(min=0)] * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.softmax(torch.einsum("nsd,nd->ns", self.sense_keys[centres], q), dim=-1)

    def loss(self, centres: torch.Tensor, contexts: torch.Tensor, negatives: torch.Tensor,
             entropy_weight: float = 0.1) -> torch.Tensor:
        """``mean_n [sum_s p_s L_sg(v_{w,s}) + entropy_weight * H(p)]``; ``negatives [N, K]`` word ids."""
        p = self.sense_probs(centres, contexts)
        v = self.sense_vectors[centres]  # [N, S, dim]
        mask = (contexts >= 0).float()
        pos = torch.einsum("nsd,ncd->nsc", v, self.output_vectors[contexts.clamp(min=0)])
        neg = torch.einsum("nsd,nkd->nsk", v, self.output_vectors[negatives])
        per_sense = -(F.logsigmoid(pos) * mask[:, None, :]).sum(-1) - F.logsigmoid(-neg).sum(-1)  # [N, S]
        entropy = -(p * torch.log(p.clamp(min=1e-12))).sum(-1)
        return ((p * per_sense).sum(-1) + entropy_weight * entropy).mean()

    @torch.no_grad()
    def assign_senses(self, centres: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
        return self.sense_probs(centres, contexts).argmax(-1)


def train_dsg(sentences: Sequence[Sequence[int]], vocab_size: int, *, dim: int = 32, senses: int = 2,
              window: int = 2, negatives: int = 5, entropy_weight: float = 0.1, epochs: int = 5,
              batch_size: int = 256, lr: float = 0.02, seed: int = 0) -> DisambiguatedSkipGram:
    """Fit a DSG (``senses=1`` is the plain single-sense skip-gram) on word-id sentences."""
    model = DisambiguatedSkipGram(vocab_size, dim=dim, senses=senses, seed=seed)
    centres, contexts = skipgram_windows(sentences, window)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(centres), generator=gen)
        for i in range(0, len(perm), batch_size):
            idx = perm[i: i + batch_size]
            neg = torch.randint(0, vocab_size, (len(idx), negatives), generator=gen)
            opt.zero_grad()
            model.loss(centres[idx], contexts[idx], neg, entropy_weight=entropy_weight).backward()
            opt.step()
    return model.eval()


def sense_purity(assigned: Sequence[int], truth: Sequence[int]) -> float:
    """Cluster purity: each assigned sense counts its most common true label; the sum over all occurrences."""
    assigned, truth = np.asarray(assigned), np.asarray(truth)
    total = 0
    for s in np.unique(assigned):
        total += np.bincount(truth[assigned == s]).max()
    return float(total / len(assigned))
