"""DPTR: ORP's scale and seeded row selection, the FMU's fixed output length, the memory being CLIP's per-token text
output, keywords reaching the training loops, text-only pre-training spelling words a stub cannot, and the docs page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import cliplab
from cliplab.data.synthetic.vocabulary import WORDS
from cliplab.scenetext import dptr as D

DOC = Path(__file__).resolve().parents[1] / "docs/methods/dptr.md"


@pytest.fixture(scope="module")
def model():
    return cliplab.load("shapes-tiny").eval()


@pytest.fixture(scope="module")
def memory(model):
    return D.word_memory(model, list(WORDS))


@pytest.fixture(scope="module")
def pretrained(memory):
    """Text-only pre-training on the 16 words (shared by the tests below)."""
    torch.manual_seed(0)
    dec = D.RecognitionDecoder(memory.shape[-1])
    stub_acc = D.word_accuracy(dec, None, memory, list(WORDS))
    losses = D.pretrain_text_only(dec, memory, list(WORDS), steps=160, batch_size=32, lr=3e-3, seed=0)
    return dec, stub_acc, losses


def test_memory_is_the_per_token_text_output(model, memory):
    tok = model.tokenize([D.TEMPLATE.format(w) for w in WORDS])
    assert memory.shape == (16, int(tok.lengths.max()), 128)
    with torch.no_grad():
        pooled = model.encode_text(tok)
    eot = tok.lengths - 1
    # the memory's EOT row is CLIP's pooled text embedding (after ln_final and the projection), exactly
    assert torch.allclose(memory[torch.arange(16), eot], pooled, atol=1e-5)


def test_orp_scale_and_seeded_row_selection():
    b, length, n, d = 6, 5, 9, 4
    bank = torch.zeros(3, n, d)
    bank[:, :, 0] = torch.arange(3.0)[:, None]  # which image
    bank[:, :, 1] = torch.arange(float(n))[None]  # which row
    mem = torch.randn(b, length, d)
    out = D.orp_perturb(mem, bank, 0.1, generator=torch.Generator().manual_seed(0))
    noise = (out - mem) / 0.1
    assert torch.allclose(D.orp_perturb(mem, bank, 0.0), mem)
    for i in range(b):
        assert noise[i, :, 0].round().unique().numel() == 1  # one bank image per sample
        rows = noise[i, :, 1].round()
        assert rows.unique().numel() == length  # rows drawn without replacement
        assert torch.allclose(noise[i, :, 1], rows, atol=1e-4) and rows.min() >= 0 and rows.max() < n
    again = D.orp_perturb(mem, bank, 0.1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    twice = D.orp_perturb(mem, bank, 0.2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(twice - mem, 2 * (out - mem), atol=1e-5)  # linear in the scale
    long = D.orp_perturb(torch.zeros(2, 20, d), bank, 1.0)  # more memory rows than bank rows: with replacement
    assert long.shape == (2, 20, d)
    with pytest.raises(ValueError, match="ORP bank"):
        D.orp_perturb(mem, torch.zeros(3, n, d + 1))


def test_fmu_output_length_is_fixed():
    fmu = D.FeatureMergeUnit(32)
    for n in (1, 5, 65):
        assert fmu(torch.randn(3, n, 32)).shape == (3, 26, 32)
    x = torch.randn(2, 7, 32)
    assert not torch.allclose(fmu(x)[0], fmu(x)[1])  # the queries read the input
    assert D.FeatureMergeUnit(32, n_queries=8)(x).shape == (2, 8, 32)


def test_labels_and_teacher_forcing():
    dec = D.RecognitionDecoder(8, dim=16, max_len=4)
    lab = dec.encode_labels(["cat", "to"])
    assert lab.tolist() == [[3, 1, 20, 0, -100], [20, 15, 0, -100, -100]]
    with pytest.raises(ValueError, match="characters"):
        dec.encode_labels(["trees"])
    # causality: the loss of a word does not depend on what a longer word would add after EOS
    torch.manual_seed(0)
    mem = torch.randn(1, 3, 8)
    logits = dec._logits(torch.tensor([[1, 5, 3, 22]]), mem)
    logits2 = dec._logits(torch.tensor([[1, 5, 3, 9]]), mem)
    assert torch.allclose(logits[:, :3], logits2[:, :3], atol=1e-6)


def test_text_only_pretraining_spells_words_a_stub_cannot(pretrained, memory):
    dec, stub_acc, losses = pretrained
    acc = D.word_accuracy(dec, None, memory, list(WORDS))
    assert stub_acc == 0.0 and acc >= 0.5, (stub_acc, acc)
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])


def test_pretrain_keywords_reach_the_core(monkeypatch, memory):
    seen = {"scale": [], "batch": [], "lr": []}
    real_orp, real_adamw = D.orp_perturb, torch.optim.AdamW

    def orp(mem, bank, scale, generator=None):
        seen["scale"].append(scale)
        seen["batch"].append(mem.shape[0])
        return real_orp(mem, bank, scale, generator)

    def adamw(params, lr, **kw):
        seen["lr"].append(lr)
        return real_adamw(params, lr=lr, **kw)

    monkeypatch.setattr(D, "orp_perturb", orp)
    monkeypatch.setattr(D.torch.optim, "AdamW", adamw)
    bank = torch.randn(2, 9, memory.shape[-1])
    dec = D.RecognitionDecoder(memory.shape[-1], dim=16, layers=1)
    losses = D.pretrain_text_only(dec, memory, list(WORDS), steps=3, batch_size=5, lr=0.01, bank=bank,
                                  orp_scale=0.3, seed=4)
    assert len(losses) == 3 and seen["scale"] == [0.3] * 3 and seen["batch"] == [5] * 3 and seen["lr"] == [0.01]
    seen["scale"].clear()
    D.pretrain_text_only(dec, memory, list(WORDS), steps=2, bank=None)
    assert seen["scale"] == []  # no bank: no ORP
    # the seed picks the batches
    a = D.RecognitionDecoder(memory.shape[-1], dim=16, layers=1)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    la = D.pretrain_text_only(a, memory, list(WORDS), steps=2, batch_size=4, seed=1)
    a.load_state_dict(state)
    lb = D.pretrain_text_only(a, memory, list(WORDS), steps=2, batch_size=4, seed=2)
    assert la[0] != lb[0]


def test_finetune_keywords_reach_the_core(monkeypatch):
    seen = {"lr": [], "steps": [], "batch": []}
    real_adamw = torch.optim.AdamW
    monkeypatch.setattr(D.torch.optim, "AdamW", lambda params, lr, **kw: seen["lr"].append(lr) or
                        real_adamw(params, lr=lr, **kw))
    dec, fmu = D.RecognitionDecoder(16, dim=16, layers=1), D.FeatureMergeUnit(16, n_queries=4)
    real_fwd = fmu.forward
    monkeypatch.setattr(fmu, "forward", lambda v: seen["batch"].append(v.shape[0]) or real_fwd(v))
    losses = D.finetune_on_images(dec, fmu, torch.randn(6, 5, 16), ["cat", "dog", "sun", "car", "cup", "hat"],
                                  steps=3, batch_size=7, lr=0.02, seed=3, on_step=seen["steps"].append)
    assert len(losses) == 3 and seen == {"lr": [0.02], "steps": [1, 2, 3], "batch": [7, 7, 7]}


def test_docs_page_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert blocks
    ns: dict = {"__name__": "docs_dptr"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{DOC.name}[block {i}]", "exec"), ns)
