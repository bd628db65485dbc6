"""Binary PV-DBOW and the Disambiguated Skip-gram: exact binary codes, the straight-through gradient, FAISS Hamming
search against the XOR-popcount reference, keyword pass-through, and the effects on synthetic corpora (32-bit codes
near the real-valued PV, far above random codes; sense purity > 0.9 where a single-sense skip-gram has 0.5)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from cliplab.textrep import binary_pv_dsg as pv
from cliplab.textrep.binary_pv_dsg import (BinaryPVDBOW, build_vocabulary, retrieval_precision, sense_purity,
                                           skipgram_windows, straight_through_binarize, train_dsg, train_pv)
from cliplab.textrep.hamming import (HammingIndex, hamming_distances, hamming_ranking, pack_codes, unpack_codes)
from conftest import REPO


def topic_corpus(n_docs=300, topics=6, vocab=200, length=30, seed=0):
    """LDA-style documents: each mostly from one topic's word distribution (label = that topic)."""
    rng = np.random.default_rng(seed)
    dists = rng.dirichlet(np.full(vocab, 0.05), size=topics)
    labels = rng.integers(0, topics, n_docs)
    docs = []
    for lab in labels:
        mix = 0.8 * np.eye(topics)[lab] + 0.2 * rng.dirichlet(np.ones(topics))
        docs.append([int(w) for w in rng.choice(vocab, length, p=mix @ dists)])
    return docs, labels, vocab


def two_sense_corpus(n=300, seed=0):
    """Word 0 is ambiguous: it appears in sentences of topic A (words 1-20) or topic B (words 21-40)."""
    rng = np.random.default_rng(seed)
    sents, truth = [], []
    for i in range(n):
        words = range(1, 21) if i % 2 == 0 else range(21, 41)
        s = [int(w) for w in rng.choice(list(words), 8)]
        s.insert(int(rng.integers(0, 9)), 0)
        sents.append(s)
        truth.append(i % 2)
    return sents, np.array(truth), 41


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


@pytest.fixture(scope="module")
def corpus():
    return topic_corpus()


@pytest.fixture(scope="module")
def trained(corpus):
    docs, labels, vocab = corpus
    torch.manual_seed(0)
    kw = dict(bits=32, epochs=8, batch_size=512, lr=0.02, seed=0)
    return train_pv(docs, vocab, binary=True, **kw), train_pv(docs, vocab, binary=False, **kw)


# --- exact properties --------------------------------------------------------------------------------------------
def test_codes_are_exactly_binary_and_straight_through(trained):
    binary, _ = trained
    codes = binary.codes()
    assert codes.dtype == torch.uint8 and set(codes.unique().tolist()) <= {0, 1}
    assert 0.1 < codes.float().mean() < 0.9  # not a degenerate constant code
    # the code layer's forward output is exactly {0, 1} and equals the codes
    out = binary.code_layer(binary.doc)
    assert torch.equal(out.detach(), codes.float())
    # straight-through: d out / d d = sigmoid'(d) exactly
    d = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 8, dtype=torch.float64)
    (straight_through_binarize(torch.sigmoid(d)) * g).sum().backward()
    s = torch.sigmoid(d.detach())
    assert torch.allclose(d.grad, g * s * (1 - s), atol=1e-12)


def test_faiss_hamming_equals_xor_popcount_reference():
    rng = np.random.default_rng(1)
    db = rng.integers(0, 2, (500, 32))
    q = rng.integers(0, 2, (40, 32))
    pdb, pq = pack_codes(db), pack_codes(q)
    assert np.array_equal(unpack_codes(pdb), db)
    ref = hamming_distances(pq, pdb)
    assert np.array_equal(ref, (q[:, None, :] != db[None, :, :]).sum(-1))  # bit-by-bit count
    index = HammingIndex(32).add(pdb)
    dist, ids = index.search(pq, 10)
    assert np.array_equal(dist, np.sort(ref, axis=1)[:, :10])
    assert np.array_equal(np.take_along_axis(ref, ids, axis=1), dist)
    assert np.array_equal(index.rank(pq), hamming_ranking(ref))  # full ranking, ties by id


def test_pack_codes_refuses_non_binary_and_odd_sizes():
    with pytest.raises(ValueError, match="exactly 0 or 1"):
        pack_codes(np.full((2, 8), 0.7))
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_codes(np.zeros((2, 12), dtype=int))


def test_precision_by_hand():
    ranking = np.array([[0, 1, 2, 3], [1, 3, 0, 2], [2, 0, 1, 3], [3, 2, 1, 0]])
    labels = [0, 0, 1, 1]
    # query 0: top-2 without itself = [1, 2] -> 1/2; q1: [3, 0] -> 1/2; q2: [0, 1] -> 0; q3: [2, 1] -> 1/2
    assert retrieval_precision(ranking, labels, 2) == pytest.approx((0.5 + 0.5 + 0 + 0.5) / 4)


def test_skipgram_windows_and_purity_by_hand():
    c, ctx = skipgram_windows([[5, 6, 7]], window=1)
    assert c.tolist() == [5, 6, 7] and ctx.tolist() == [[-1, 6], [5, 7], [6, -1]]
    assert sense_purity([0, 0, 1, 1, 1], [0, 1, 1, 1, 1]) == pytest.approx(4 / 5)


def test_dsg_loss_is_the_sense_weighted_skipgram_loss():
    torch.manual_seed(0)
    m = pv.DisambiguatedSkipGram(10, dim=4, senses=3, seed=1)
    centres = torch.tensor([2, 7])
    contexts = torch.tensor([[1, 3], [-1, 4]])
    negs = torch.tensor([[5, 6], [8, 9]])
    p = m.sense_probs(centres, contexts)
    expected = 0.0
    for n in range(2):
        q = m.context_vectors[[c for c in contexts[n].tolist() if c >= 0]].mean(0)
        pn = torch.softmax(m.sense_keys[centres[n]] @ q, dim=0)
        assert torch.allclose(p[n], pn)
        total = 0.0
        for s in range(3):
            v = m.sense_vectors[centres[n], s]
            ls = -sum(torch.nn.functional.logsigmoid(v @ m.output_vectors[c]) for c in contexts[n].tolist() if c >= 0)
            ls = ls - sum(torch.nn.functional.logsigmoid(-(v @ m.output_vectors[k])) for k in negs[n].tolist())
            total = total + pn[s] * ls
        expected = expected + total + 0.3 * -(pn * pn.log()).sum()
    assert torch.allclose(m.loss(centres, contexts, negs, entropy_weight=0.3), expected / 2, atol=1e-6)


# --- keyword pass-through ----------------------------------------------------------------------------------------
def test_every_keyword_reaches_the_core(monkeypatch):
    seen = {}

    class Spy(BinaryPVDBOW):
        def __init__(self, n, v, **kw):
            seen["pv"] = kw
            super().__init__(n, v, **kw)

    monkeypatch.setattr(pv, "BinaryPVDBOW", Spy)
    real_adam = torch.optim.Adam
    monkeypatch.setattr(torch.optim, "Adam", lambda params, lr: seen.setdefault("lr", []).append(lr) or
                        real_adam(params, lr=lr))
    docs = [[0, 1, 2], [2, 3]] * 5
    m = train_pv(docs, 4, bits=16, binary=False, epochs=2, batch_size=3, lr=0.03, seed=7)
    assert seen["pv"] == {"bits": 16, "binary": False, "seed": 7} and seen["lr"] == [0.03]
    assert isinstance(m, Spy) and m.doc.shape == (10, 16)

    class SpyDSG(pv.DisambiguatedSkipGram):
        def __init__(self, v, **kw):
            seen["dsg"] = kw
            super().__init__(v, **kw)

        def loss(self, c, ctx, neg, entropy_weight=0.1):
            seen["ctx_width"], seen["negatives"], seen["entropy_weight"] = ctx.shape[1], neg.shape[1], entropy_weight
            seen["batch"] = max(seen.get("batch", 0), len(c))
            return super().loss(c, ctx, neg, entropy_weight=entropy_weight)

    monkeypatch.setattr(pv, "DisambiguatedSkipGram", SpyDSG)
    train_dsg([[0, 1, 2, 3, 4]] * 4, 5, dim=6, senses=3, window=1, negatives=4, entropy_weight=0.7, epochs=1,
              batch_size=7, lr=0.01, seed=3)
    assert seen["dsg"] == {"dim": 6, "senses": 3, "seed": 3}
    assert (seen["ctx_width"], seen["negatives"], seen["entropy_weight"], seen["batch"]) == (2, 4, 0.7, 7)
    assert seen["lr"][-1] == 0.01


# --- effects -----------------------------------------------------------------------------------------------------
def test_effect_binary_codes_near_real_pv_and_far_above_random(trained, corpus):
    docs, labels, _ = corpus
    binary, real = trained
    p_bin = retrieval_precision(binary.index().rank(pack_codes(binary.codes().numpy())), labels, 10)
    z = torch.nn.functional.normalize(real.codes(), dim=1)
    p_real = retrieval_precision(torch.argsort(-(z @ z.T), dim=1, stable=True).numpy(), labels, 10)
    rnd = np.random.default_rng(0).integers(0, 2, (len(docs), 32))
    p_rand = retrieval_precision(hamming_ranking(hamming_distances(pack_codes(rnd), pack_codes(rnd))), labels, 10)
    assert p_rand < 0.3 and p_bin > 0.7, (p_bin, p_rand)
    assert p_bin > p_real - 0.1, (p_bin, p_real)  # the stated gap: within 0.1 precision@10 of real-valued PV


def test_inferred_codes_of_unseen_documents_retrieve_their_topic(trained, corpus):
    docs, labels, _ = corpus
    binary, _ = trained
    rng = np.random.default_rng(5)
    picks = rng.choice(len(docs), 40, replace=False)
    unseen = [[int(w) for w in rng.permutation(docs[i])[:20]] for i in picks]  # shorter re-samples
    codes = binary.infer(unseen, steps=150, seed=0)
    assert set(codes.unique().tolist()) <= {0, 1}
    _, ids = binary.index().search(pack_codes(codes.numpy()), 10)
    precision = float((labels[ids] == labels[picks][:, None]).mean())
    assert precision > 0.6, precision


def test_effect_dsg_sense_purity_beats_single_sense():
    sents, truth, vocab = two_sense_corpus()
    centres, contexts = skipgram_windows(sents, 2)
    amb = centres == 0
    purity = {}
    for senses in (2, 1):
        m = train_dsg(sents, vocab, senses=senses, epochs=3, seed=0)
        purity[senses] = sense_purity(m.assign_senses(centres[amb], contexts[amb]).numpy(), truth)
    assert purity[2] > 0.9 and purity[1] == pytest.approx(0.5), purity


def test_vocabulary_and_tokenizer():
    vocab = build_vocabulary(["A dog's ball.", "a DOG runs"], min_count=1)
    assert vocab.words == ["a", "ball", "dog", "dog's", "runs"]
    assert vocab.encode("the dog runs") == [2, 4]


def test_doc_example_runs():
    page = (REPO / "docs/methods/binary_pv_dsg.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert blocks
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, "docs/methods/binary_pv_dsg.md", "exec"), namespace)
    assert set(namespace["codes"].unique().tolist()) <= {0, 1}
