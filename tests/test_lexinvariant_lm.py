"""Lexinvariant LM: exact vocabulary-permutation invariance, per-sequence embeddings, the per-position loss, and the
cipher effect against a standard LM with the same blocks, data, steps and seed."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from cliplab.textrep import lm_training as lt
from cliplab.textrep.lexinvariant_lm import LexinvariantLM, cipher, lexinvariant_nll, per_position, position_nll, \
    train_lexinvariant

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods" / "lexinvariant_lm.md"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


def test_loss_is_invariant_to_a_vocabulary_permutation():
    torch.manual_seed(0)
    model = LexinvariantLM(30, width=32, layers=2, seed=1).eval()
    ids = torch.randint(30, (3, 20))
    emb = model.sample_embeddings(3, torch.Generator().manual_seed(2))
    perm = torch.randperm(30)
    inverse = torch.argsort(perm)
    with torch.no_grad():
        base, n = model.nll(ids, embeddings=emb)
        permuted, m = model.nll(perm[ids], embeddings=emb[:, inverse])  # token pi(v) gets the row of v
        other, _ = model.nll(perm[ids], embeddings=emb)  # the same table, other ids: a different loss
    assert n == m
    torch.testing.assert_close(permuted, base, rtol=1e-5, atol=1e-4)
    assert abs(float(other) - float(base)) > 1e-2


def test_each_sequence_gets_its_own_table_and_draws_are_seeded():
    model = LexinvariantLM(10, width=32, layers=1)
    e = model.sample_embeddings(2, torch.Generator().manual_seed(0))
    assert e.shape == (2, 10, 32) and not torch.allclose(e[0], e[1])
    assert e.std().item() == pytest.approx(32 ** -0.5, rel=0.1)
    ids = torch.randint(10, (2, 8))
    assert lexinvariant_nll(model, ids, draws=2, seed=5) == lexinvariant_nll(model, ids, draws=2, seed=5)


def test_per_position_matches_the_summed_loss():
    model = LexinvariantLM(12, width=32, layers=1, seed=2).eval()
    ids = torch.randint(12, (2, 9))
    emb = model.sample_embeddings(2, torch.Generator().manual_seed(1))
    with torch.no_grad():
        total, count = model.nll(ids, embeddings=emb)
        by_pos = per_position(model, ids, embeddings=emb)
    assert by_pos.shape == (2, 8)
    assert float(by_pos.sum()) == pytest.approx(float(total), rel=1e-5) and count == 16
    curve = position_nll(lambda x: per_position(model, x, embeddings=emb[: len(x)]), ids, batch_size=2)
    torch.testing.assert_close(curve, by_pos.mean(0))


def test_cipher_is_a_per_row_bijection_that_keeps_specials():
    ids = torch.tensor([[1, 2, 3, 1, 9], [1, 2, 3, 1, 9]])
    out = cipher(ids, 8, seed=0)
    assert out[:, -1].tolist() == [9, 9]
    for r in range(2):
        assert out[r, 0] == out[r, 3] and len({*out[r, :3].tolist()}) == 3
    assert not torch.equal(out[0], out[1])


def test_train_lexinvariant_passes_every_keyword(monkeypatch):
    import cliplab.text.training as training

    seen = {}

    def fake_fit(params, step, **kw):
        seen.update(kw)
        step(0)
        return training.FitResult(kw["steps"])

    monkeypatch.setattr(training, "fit", fake_fit)
    model = LexinvariantLM(10, width=32, layers=1)
    train_lexinvariant(model, torch.randint(10, (4, 6)), steps=3, batch_size=2, lr=0.1, warmup=1, weight_decay=0.2,
                       seed=8, progress=True)
    assert seen == {"steps": 3, "lr": 0.1, "warmup": 1, "weight_decay": 0.2, "seed": 8, "progress": True,
                    "desc": "lexinvariant"}


@pytest.mark.skipif(not lt.caption_path().is_file(), reason="Flickr8k captions (../shared/data) not available")
def test_cipher_defeats_a_standard_lm_but_not_the_lexinvariant_one():
    """Effect: both trained on caption bytes (same blocks, windows, steps, seed), scored on held-out windows under a
    random substitution of all 256 byte values per window. The standard LM is confidently wrong; the lexinvariant
    LM scores the same as on plain text, and below the uniform loss ln V (so it learned something, unlike a stub)."""
    codec = lt.ByteCodec()
    split = lt.load_caption_splits(max_images=300, held_out_images=30)
    train = lt.pack_stream(lt.encode_rows(codec, split.train), 64)
    held = lt.pack_stream(lt.encode_rows(codec, split.held_out), 64)[:24]
    ciphered = cipher(held, 256, seed=1)
    standard = lt.tiny_lm(codec.vocab_size, width=32, layers=2, seed=0)
    lt.train_lm(standard, train.tolist(), pad_id=codec.pad_id, steps=150, batch_size=8, lr=1e-2)
    lexinv = LexinvariantLM(codec.vocab_size, width=32, layers=2, seed=0)
    train_lexinvariant(lexinv, train, steps=150, batch_size=8, lr=1e-2)
    with torch.no_grad():
        s, c = lt.next_token_nll(standard, ciphered)
    std_cipher = float(s) / c
    lex_plain = lexinvariant_nll(lexinv, held, draws=2)
    lex_cipher = lexinvariant_nll(lexinv, ciphered, draws=2)
    uniform = math.log(codec.vocab_size)
    assert lex_cipher < std_cipher - 1.0
    assert abs(lex_cipher - lex_plain) < 0.1
    assert lex_plain < uniform - 0.08, (lex_plain, uniform)


def test_doc_example_runs():
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert code, "docs/methods/lexinvariant_lm.md has no python example"
    exec(compile(code[0], str(DOC), "exec"), {})


def test_run_is_registered_and_passes_its_keywords(monkeypatch):
    import cliplab.text.training as training
    from cliplab.textrep import lexinvariant_lm

    seen = {}

    def fake_train(model, windows, **kw):
        seen.update(kw, shape=tuple(windows.shape))
        return training.FitResult(kw["steps"], losses=[1.0])

    monkeypatch.setattr(lexinvariant_lm, "train_lexinvariant", fake_train)
    summary, _ = lt.get_lm_method("lexinvariant_lm")(["a dog runs"] * 4, ["a cat sits"] * 4, steps=3, batch_size=2,
                                                     lr=0.1, seed=4, progress=True, length=8)
    assert seen == {"steps": 3, "batch_size": 2, "lr": 0.1, "seed": 4, "progress": True, "shape": (6, 8)}
    assert summary["windows"] == 6 and summary["bits_per_byte_cipher"] > 0
