"""RTD (cliplab.cir.rtd), the LinCIR-style phi (cliplab.cir.phi) and the synthetic CIR benchmark."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cliplab
from cliplab.cir import benchmark as bm
from cliplab.cir import phi as phimod
from cliplab.cir import rtd
from cliplab.data.synthetic import parse_modification

REPO = Path(__file__).resolve().parents[1]

# small budgets shared by the effect tests (module fixtures train once); measured numbers: docs/methods/rtd.md
PHI_STEPS, PHI_BATCH = 60, 32
RTD_STEPS, RTD_BATCH, RTD_LR = 15, 12, 5e-4


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return cliplab.load("shapes-tiny").eval()


@pytest.fixture(scope="module")
def triplets():
    return bm.cir_text_triplets(400, seed=1000)


@pytest.fixture(scope="module")
def phi(model, triplets):
    caps = sorted({t.reference for t in triplets} | {t.target for t in triplets})
    return phimod.train_phi(model, caps, steps=PHI_STEPS, batch_size=PHI_BATCH, seed=0)


@pytest.fixture(scope="module")
def bench():
    return bm.synthetic_cir(60, seed=0)


@pytest.fixture(scope="module")
def enc(model):
    """One in-memory embedding cache: the gallery is encoded once for every evaluation."""
    from cliplab.eval.cache import CachedEncoder

    return CachedEncoder(model, None)


# --- exact properties ----------------------------------------------------------------------------------------------
def test_nt_xent_matches_the_official_formula_written_out():
    g = torch.Generator().manual_seed(0)
    t, q = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    tau = 0.1
    v1, v2 = F.normalize(t, dim=1), F.normalize(q, dim=1)
    num = torch.exp(torch.diag(v1 @ v2.t()) / tau)
    num = torch.cat([num, num])
    joint = torch.cat([v1, v2])
    pairs = torch.exp(joint @ joint.t() / tau)
    den = (pairs - pairs * torch.eye(10)).sum(0)
    ref = -torch.mean(torch.log(num / den))
    assert torch.allclose(rtd.nt_xent(t, q, tau), ref, atol=1e-6)
    # swapping the roles leaves it unchanged (the code's loss is symmetric)
    assert torch.allclose(rtd.nt_xent(q, t, tau), ref, atol=1e-6)


def test_pseudo_word_equal_to_a_real_token_embedding_reproduces_the_plain_forward(model):
    texts = ["a photo of $ that make the circle red", "$ below a small square"]
    real = ["a photo of circle that make the circle red", "circle below a small square"]
    word = model.text.token_embed.weight[7117]  # "circle</w>"
    with torch.no_grad():
        got = phimod.encode_with_pseudo_words(model, texts, word.expand(2, -1))
        ref = model.encode_text(model.tokenize(real))
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


def test_every_placeholder_of_a_row_gets_that_rows_word(model):
    w = torch.randn(2, model.config.text.width)
    with torch.no_grad():
        both = phimod.encode_with_pseudo_words(model, ["$ and $", "$ and $"], w)
    assert not torch.allclose(both[0], both[1])  # row 0 and row 1 differ only by their word
    with pytest.raises(ValueError, match="no placeholder"):
        phimod.encode_with_pseudo_words(model, ["a red circle"], w[:1])


def test_self_masking_replaces_noun_phrases():
    assert phimod.mask_keywords("a large red ring below a medium green triangle") == "$ below $"
    assert phimod.mask_keywords("with the hexagon above it") == "with $ above it"
    assert phimod.mask_keywords("nothing here") == "a photo of $"


def test_text_triplets_follow_the_grammar(triplets):
    for t in triplets[:40]:
        change = parse_modification(t.modification)
        assert change["op"] == t.kind
        assert bm.modification_text(change) == t.modification
        assert t.reference != t.target


def test_cir_recall_leaves_the_reference_out_and_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(6, 12, generator=g)
    target, ref = [6, 7, 8, 9, 10, 11], [0, 1, 2, 3, 4, 5]
    scores[torch.arange(6), ref] = 10.0  # the reference always looks best
    got = bm.cir_recall(scores, target, ref, ks=(1, 3))
    for k in (1, 3):
        hits = 0
        for q in range(6):
            order = [j for j in scores[q].argsort(descending=True).tolist() if j != ref[q]]
            hits += target[q] in order[:k]
        assert got[f"R@{k}"] == pytest.approx(hits / 6)
    assert bm.cir_recall(scores, target, None, ks=(1,))["R@1"] == 0.0  # without the rule the reference wins


def test_tuned_copy_is_the_identity_before_training(model, phi, bench, enc):
    feats = enc.images(bench.gallery[:12])
    mods = bench.modifications[:12]
    a = phimod.composed_queries(model, phi, feats, mods)
    b = phimod.composed_queries(rtd.tunable_copy(model), phi, feats, mods)
    assert torch.equal(a, b)


def test_only_the_tuned_text_tower_receives_gradients(model, phi, triplets):
    tuned = rtd.tunable_copy(model)
    loss = rtd.rtd_loss(tuned, model, phi, triplets[:4])
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is None for p in phi.parameters())
    assert all(p.grad is None for p in tuned.visual.parameters())
    assert all(p.grad is not None for p in tuned.text.transformer.parameters())
    # without the anchor the targets are the tuned tower's too: still nothing reaches the frozen model
    tuned2 = rtd.tunable_copy(model)
    rtd.rtd_loss(tuned2, model, phi, triplets[:4], anchor=False).backward()
    assert all(p.grad is None for p in model.parameters())


def test_frozen_model_and_phi_are_bit_identical_after_training(model, phi, triplets):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    phi_before = {k: v.clone() for k, v in phi.state_dict().items()}
    res = rtd.train_rtd(model, phi, triplets, steps=3, batch_size=8, lr=1e-3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(phi_before[k], v) for k, v in phi.state_dict().items())
    tuned = res.model.state_dict()
    assert any(not torch.equal(before[k], tuned[k]) for k in before if k.startswith("text."))
    assert all(torch.equal(before[k], tuned[k]) for k in before if not k.startswith("text."))
    assert len(res.losses) == 3


# --- keywords reach the core ---------------------------------------------------------------------------------------
def test_train_rtd_passes_every_keyword_to_the_loss(monkeypatch, model, phi, triplets):
    seen = {}

    def fake_loss(tuned, frozen, phi_, batch, **kw):
        seen.update(kw, n=len(batch))
        return sum(p.sum() for p in tuned.text.parameters()) * 0.0

    monkeypatch.setattr(rtd, "rtd_loss", fake_loss)
    kw = dict(tau=0.2, noise_scale=0.3, anchor=False, hard_negatives=False, concat="text",
              template="an image of $ where {}", reference_template="an image of $")
    res = rtd.train_rtd(model, phi, triplets, steps=1, batch_size=5, **kw)
    assert seen["n"] == 5 and isinstance(seen["generator"], torch.Generator)
    assert {k: seen[k] for k in kw} == kw
    assert {k: res.settings[k] for k in kw} == kw


def test_rtd_loss_keywords_change_what_is_encoded(monkeypatch, model, phi, triplets):
    calls = []
    real = phimod.encode_with_pseudo_words

    def spy(m, texts, words, *a, **k):
        calls.append((list(texts), words.clone()))
        return real(m, texts, words, *a, **k)

    monkeypatch.setattr(rtd, "encode_with_pseudo_words", spy)
    batch = triplets[:3]
    with torch.no_grad():
        rtd.rtd_loss(model, model, phi, batch, template="look: $ then {}", reference_template="only $",
                     hard_negatives=True, noise_scale=0.0)
    texts, words = calls[-1]
    assert texts == [f"look: $ then {t.modification}" for t in batch] + ["only $"] * 3
    e = model.encode_texts([t.reference for t in batch])
    assert torch.allclose(words[:3], phi(e), atol=1e-6) and torch.equal(words[:3], words[3:])
    got = {}
    monkeypatch.setattr(rtd, "nt_xent", lambda t, q, tau: got.update(t=t, q=q, tau=tau) or t.sum() * 0)
    with torch.no_grad():
        rtd.rtd_loss(model, model, phi, batch, tau=0.3)
        anchor = model.encode_text(model.tokenize([t.target for t in batch] + [t.reference for t in batch]))
    assert torch.allclose(got["t"], anchor, atol=1e-6) and got["q"].shape == anchor.shape and got["tau"] == 0.3
    rtd.rtd_loss(model, model, phi, batch, hard_negatives=False)
    assert len(calls[-1][0]) == 3 and got["t"].shape[0] == 3
    n = len(calls)
    with torch.no_grad():
        loss_text = rtd.rtd_loss(model, model, phi, batch, concat="text")
    assert len(calls) == n and torch.isfinite(loss_text)  # the naive concatenation never uses phi
    with pytest.raises(ValueError, match="concat"):
        rtd.rtd_loss(model, model, phi, batch, concat="words")


def test_evaluate_cir_passes_its_keywords(monkeypatch, model, phi, bench, enc):
    seen = {}
    real = phimod.composed_queries

    def spy(text_model, phi_, feats, mods, template=phimod.DEFAULT_TEMPLATE, **k):
        seen.update(text_model=text_model, phi=phi_, template=template)
        return real(text_model, phi_, feats, mods, template=template, **k)

    monkeypatch.setattr(phimod, "composed_queries", spy)
    other = rtd.tunable_copy(model)
    small = bench.subset(range(6))
    assert small.target == bench.target[:6] and small.gallery is bench.gallery
    res = bm.evaluate_cir(model, small, query="phi", phi=phi, text_model=other, template="pic of $ but {}",
                          ks=(2,), encoder=enc)
    assert seen == {"text_model": other, "phi": phi, "template": "pic of $ but {}"}
    assert set(k for k in res["metrics"] if k.startswith("R@")) == {"R@2"}
    with pytest.raises(ValueError, match="needs phi"):
        bm.evaluate_cir(model, bench, query="phi")
    with pytest.raises(ValueError, match="query='phi' only"):
        bm.evaluate_cir(model, bench, query="sum", template="x $ {}")


def test_cir_task_passes_every_option(monkeypatch, model, bench):
    from cliplab.eval import tasks

    seen = {}
    monkeypatch.setattr(bm, "evaluate_cir", lambda m, d, **kw: seen.update(kw) or {"task": "cir"})
    opts = dict(query="phi", phi="p.pt", text_model="dir", template="t $ {}")
    tasks.run_task("cir", bench, tasks.CachedEncoder(model, None), **opts)
    assert {k: seen[k] for k in opts} == opts and seen["encoder"].model is model


def test_train_phi_passes_its_keywords(monkeypatch, model):
    seen = {}
    monkeypatch.setattr(phimod, "_fit_phi", lambda m, phi, masked, targets, *a: seen.update(phi=phi, masked=masked,
                                                                                             args=a))
    p = phimod.train_phi(model, ["a red circle", "a big blue square"], steps=7, batch_size=3, lr=0.5,
                         weight_decay=0.2, noise_scale=0.25, dropout=0.1, hidden_dim=32, l2_normalize=False,
                         vocabulary=["red", "circle"], seed=5)
    assert seen["args"][:5] == (7, 3, 0.5, 0.2, 0.25) and seen["args"][5].initial_seed() == 5
    assert seen["masked"] == ["a $", "a photo of $"]
    assert p.config == {"input_dim": 128, "output_dim": 128, "hidden_dim": 32, "dropout": 0.1, "l2_normalize": False}
    mine = phimod.Phi(128, 128, hidden_dim=16)
    assert phimod.train_phi(model, ["a red circle"], steps=1, phi=mine) is mine and seen["phi"] is mine


def test_lincir_noise_is_uniform_times_gaussian():
    x = torch.randn(4, 6)
    assert phimod.lincir_noise(x, 0.0) is x
    got = phimod.lincir_noise(x, 0.5, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    u, n = torch.rand(4, 1, generator=g), torch.randn(4, 6, generator=g)
    assert torch.equal(got, x + 0.5 * u * n)


def test_phi_save_load_round_trip(tmp_path, phi):
    path = phi.save(tmp_path / "phi.pt")
    back = phimod.Phi.load(path)
    x = torch.randn(3, 128)
    assert torch.equal(back(x), phi.eval()(x))


# --- evaluation task -----------------------------------------------------------------------------------------------
def test_cir_eval_task_runs_through_evaluate(model):
    from cliplab.eval import evaluate

    res = evaluate("cir", model, "synthetic-cir", dataset_options={"n": 8}, cache_dir=None, query="sum")
    m = res["metrics"]
    assert res["num_queries"] == 8 and res["num_images"] == 16
    assert 0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 1
    assert m["chance"]["R@1"] == pytest.approx(1 / 15)
    assert sum(v["queries"] for v in m["by_kind"].values()) == 8


# --- the effect ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def arms(model, phi, triplets, bench, enc):
    """Same phi, data, seed and steps in every arm; only the RTD switch under test differs."""
    out = {"frozen": bm.evaluate_cir(model, bench, query="phi", phi=phi, encoder=enc)["metrics"]}
    for name, kw in (("rtd", {}), ("no_anchor", {"anchor": False})):
        res = rtd.train_rtd(model, phi, triplets, steps=RTD_STEPS, batch_size=RTD_BATCH, lr=RTD_LR, seed=0, **kw)
        out[name] = bm.evaluate_cir(model, bench, query="phi", phi=phi, text_model=res.model,
                                    encoder=enc)["metrics"]
    print("rtd arms:", {k: (round(v["R@1"], 3), round(v["R@5"], 3)) for k, v in out.items()})
    return out


def test_rtd_beats_the_frozen_text_encoder(arms):
    frozen, tuned = arms["frozen"], arms["rtd"]
    assert tuned["R@1"] >= frozen["R@1"] + 0.2, (frozen["R@1"], tuned["R@1"])
    assert tuned["R@5"] >= frozen["R@5"] + 0.1, (frozen["R@5"], tuned["R@5"])


def test_dropping_the_target_anchor_hurts(arms):
    assert arms["rtd"]["R@1"] >= arms["no_anchor"]["R@1"] + 0.05, (arms["rtd"]["R@1"], arms["no_anchor"]["R@1"])


# --- docs ----------------------------------------------------------------------------------------------------------
def test_doc_example_runs():
    page = (REPO / "docs" / "methods" / "rtd.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert blocks
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, "docs/methods/rtd.md", "exec"), namespace)
    assert namespace["after"]["R@1"] > namespace["before"]["R@1"]
