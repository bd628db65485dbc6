"""ltok (Learn Your Tokens): segmentation, pooling within words, no leakage, causality, the byte likelihood, and
the effect of the word-level context against the same model without it."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch

from cliplab.textrep import lm_training as lt
from cliplab.textrep.ltok import END, EOW, JOIN, POOL, LTokConfig, LTokLM, evaluate_ltok_bpb, segment, train_ltok, \
    unsegment

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods" / "ltok.md"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


@pytest.fixture(scope="module")
def model():
    return LTokLM(LTokConfig(width=32, layers=2, max_word_len=6, max_words=16), seed=3).eval()


def test_segment_hand_made_and_round_trip():
    assert segment("a dog", 8) == [[97, EOW], [100, 111, 103, END]]
    units = segment("abcdefgh i", 3)  # a long word continues across units
    assert units == [[97, 98, 99, JOIN], [100, 101, 102, JOIN], [103, 104, EOW], [105, END]]
    for text in ["a café , item-4821 costs 37", "x", "supercalifragilisticexpialidocious is long"]:
        assert unsegment(segment(text, 5)) == text
    with pytest.raises(ValueError, match="normalise"):
        segment("two  spaces")


def test_pooling_reads_the_pool_token_of_each_unit_alone(model):
    units = [[97, EOW], [100, 111, 103, 115, END], [120, JOIN]]
    with torch.no_grad():
        vectors = model.word_vectors(units)
        for i, u in enumerate(units):
            alone = model.encoder(torch.tensor([u + [POOL]])).tokens[0, -1]
            torch.testing.assert_close(vectors[i], alone, rtol=1e-5, atol=1e-6)


def test_no_cross_word_leakage_in_the_encoder(model):
    units = segment("the dog runs fast", 6)
    changed = [list(u) for u in units]
    changed[2][:3] = [120, 121, 122]  # same length, other bytes
    with torch.no_grad():
        a, b = model.word_vectors(units), model.word_vectors(changed)
    assert torch.equal(a[[0, 1, 3]], b[[0, 1, 3]])
    assert not torch.allclose(a[2], b[2])


def test_word_lm_is_causal_and_unit_t_never_sees_itself(model):
    text, other = "the dog runs fast home", "the dog jumps fast home"
    with torch.no_grad():
        h1, _ = model.word_states([segment(text, 6)])
        h2, _ = model.word_states([segment(other, 6)])
    # unit 2 ("runs" vs "jumps") differs: the contexts of units 0..2 are the same, those after it differ
    assert torch.equal(h1[0, :3], h2[0, :3])
    assert not torch.allclose(h1[0, 3], h2[0, 3])


def test_nll_scores_every_byte_space_and_end_once(model):
    texts = ["a dog runs", "supercalifragilistic words"]
    with torch.no_grad():
        total, count = model(texts)
        single = sum(float(model([t])[0]) for t in texts)
    assert count == sum(len(t.encode()) + 1 for t in texts) + 3  # + a JOIN per extra chunk of the long word
    assert float(total) == pytest.approx(single, rel=1e-5)  # rows of a batch do not interact


def test_train_ltok_passes_every_keyword_to_fit(monkeypatch):
    import cliplab.text.training as training

    seen = {}

    def fake_fit(params, step, **kw):
        seen.update(kw)
        step(0)
        return training.FitResult(kw["steps"])

    monkeypatch.setattr(training, "fit", fake_fit)
    m = LTokLM(LTokConfig(width=32, layers=1, max_words=8))
    train_ltok(m, ["a b"], steps=5, batch_size=2, lr=0.2, warmup=1, weight_decay=0.4, seed=7, progress=True)
    assert seen == {"steps": 5, "lr": 0.2, "warmup": 1, "weight_decay": 0.4, "seed": 7, "progress": True,
                    "desc": "ltok"}


def _counting(n, seed):
    words = "zero one two three four five six seven eight nine".split()
    rng = random.Random(seed)
    return [" ".join(words[(s + i) % 10] for i in range(6)) for s in (rng.randrange(10) for _ in range(n))]


def test_word_context_lowers_bpb_against_the_context_free_control():
    """Effect: counting sequences ("three four five ..."), where the next word follows from the last one. Same seed,
    data and steps; the control decodes every word from the BOS state alone (it can learn only word frequencies)."""
    train, held = _counting(200, 0), _counting(40, 1)
    bpb = {}
    for ctx in (True, False):
        m = LTokLM(LTokConfig(width=32, layers=1, max_words=16, word_context=ctx), seed=0)
        train_ltok(m, train, steps=40, batch_size=16, lr=1e-2)
        bpb[ctx] = evaluate_ltok_bpb(m, held)["bpb"]
    assert bpb[True] < bpb[False] - 0.4, bpb


def test_doc_example_runs():
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert code, "docs/methods/ltok.md has no python example"
    exec(compile(code[0], str(DOC), "exec"), {})


def test_registered():
    from cliplab.methods import list_methods

    assert "ltok" in {m.slug for m in list_methods()}
    assert lt.bits_per_byte  # the shared trainer is the public one


def test_run_is_registered_and_passes_its_keywords(monkeypatch):
    import cliplab.text.training as training
    from cliplab.textrep import ltok

    seen = {}

    def fake_train(model, texts, **kw):
        seen.update(kw, texts=texts, width=model.cfg.width)
        return training.FitResult(kw["steps"], losses=[1.0])

    monkeypatch.setattr(ltok, "train_ltok", fake_train)
    summary, model = lt.get_lm_method("ltok")(["A  Dog"], ["a cat"], steps=3, batch_size=2, lr=0.1, seed=4,
                                              progress=True)
    assert seen == {"steps": 3, "batch_size": 2, "lr": 0.1, "seed": 4, "progress": True, "texts": ["a dog"],
                    "width": 128}
    assert summary["bpb"] > 0 and summary["params"] == lt.count_params(model)
