"""ProCLIP (cliplab.longtext.proclip): the instance, structure and self-distillation losses against brute force, the
self-distillation term zero at the start of stage 2, the adapter's normalised input, keyword pass-through, saving, and
the stage-1 effect (MiniLM distilled from shapes-tiny's text tower retrieves synthetic images zero-shot)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cliplab
import cliplab.longtext.proclip as pc
from cliplab.text.llm_tower import load_llm_clip
from cliplab.models.lm import BertConfig, BertEncoder, word_tokenizer
from cliplab.text import EncoderEmbedder

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods" / "proclip.md"
WORDS = "a the red blue green circle square star on left right of image".split()
TEXTS = ["a red circle", "a blue square on the left", "the green star", "a red star on the right of the image",
         "a blue circle", "the green square"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


def tiny_bert(seed=0):
    tok = word_tokenizer(WORDS)
    cfg = BertConfig(vocab_size=tok.vocab_size, width=32, layers=2, heads=4, mlp_dim=64, max_positions=64)
    return EncoderEmbedder("tiny-bert", BertEncoder(cfg).init_weights(seed=seed), tok, "mean")


def test_losses_match_brute_force():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    assert float(pc.instance_alignment_loss(s, t)) == pytest.approx(float(((s - t) ** 2).sum()), rel=1e-6)
    ref = 0.0
    for i in range(5):
        for j in range(i + 1, 5):
            d = abs(float((s[i] - s[j]).norm()) - float((t[i] - t[j]).norm()))
            ref += 0.5 * d * d if d < 1 else d - 0.5
    assert float(pc.structure_alignment_loss(s, t)) == pytest.approx(ref, rel=1e-5)
    assert float(pc.self_distillation_loss(s, t)) == pytest.approx(float(((s - t) ** 2).sum()) + ref, rel=1e-5)


def test_structure_loss_is_zero_for_a_rigid_motion_and_instance_loss_is_not():
    g = torch.Generator().manual_seed(1)
    t = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    s = t @ q
    assert float(pc.structure_alignment_loss(s, t)) < 1e-9
    assert float(pc.instance_alignment_loss(s, t)) > 0.1
    assert float(pc.self_distillation_loss(t, t)) == 0.0


def test_adapter_reads_the_normalised_llm_embedding():
    model = pc.proclip_model(cliplab.create_model("test-tiny", seed=0), tiny_bert())
    ad = model.adapter
    assert len(ad.blocks) == 1 and ad.blocks[0][1].out_features == 8 * 32 and ad.normalize_input
    x = torch.randn(3, 32)
    torch.testing.assert_close(ad(5.0 * x), ad(x))
    torch.testing.assert_close(ad.trunk(x), F.normalize(x, dim=-1))  # the residual block starts at identity


def _pixels(model, n, seed=0):
    size = model.clip.config.vision.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_self_distillation_is_zero_at_the_start_and_stage2_moves_only_adapter_and_image_tower(monkeypatch):
    model = pc.proclip_model(cliplab.create_model("test-tiny", seed=0), tiny_bert())
    pixels = _pixels(model, len(TEXTS))
    first = {}
    real_fit = pc.fit

    def spy_fit(params, step, **kw):
        _, logs = step(0)
        first.update(logs)
        return real_fit(params, step, **kw)

    monkeypatch.setattr(pc, "fit", spy_fit)
    text_before = {k: v.clone() for k, v in model.clip.text.state_dict().items()}
    vis_before = {k: v.clone() for k, v in model.clip.visual.state_dict().items()}
    llm_before = {k: v.clone() for k, v in model.embedder.model.state_dict().items()}
    pc.contrastive_tune(model, pixels, TEXTS, steps=3, batch_size=4, lr=1e-3, warmup=0)
    assert float(first["self_distill"]) < 1e-8 and float(first["clip"]) > 0
    assert all(torch.equal(v, text_before[k]) for k, v in model.clip.text.state_dict().items())
    assert all(torch.equal(v, llm_before[k]) for k, v in model.embedder.model.state_dict().items())
    assert any(not torch.equal(v, vis_before[k]) for k, v in model.clip.visual.state_dict().items())


def test_self_distillation_holds_the_image_tower():
    """Same seed, data and steps: with the term the image features stay closer to the original than without."""
    drift = {}
    for w in (0.0, 10.0):
        model = pc.proclip_model(cliplab.create_model("test-tiny", seed=0), tiny_bert())
        pixels = _pixels(model, len(TEXTS))
        with torch.no_grad():
            before = model.encode_image(pixels, normalize=True)
        pc.contrastive_tune(model, pixels, TEXTS, distill_weight=w, steps=8, batch_size=6, lr=3e-3, warmup=0)
        with torch.no_grad():
            drift[w] = float(1 - (model.encode_image(pixels, normalize=True) * before).sum(-1).mean())
    assert drift[10.0] < 0.5 * drift[0.0], drift


def test_keywords_reach_the_core(monkeypatch):
    seen = {}

    def fake_fit(params, step, **kw):
        seen.update(kw)
        seen["loss"], seen["logs"] = step(0)
        return pc.FitResult(kw["steps"])

    monkeypatch.setattr(pc, "fit", fake_fit)
    model = pc.proclip_model(cliplab.create_model("test-tiny", seed=0), tiny_bert())
    pc.distill_text(model, TEXTS, steps=4, batch_size=3, lr=0.2, weight_decay=0.5, warmup=2, seed=3, noise_drop=0.6,
                    structure_weight=0.0, progress=False)
    assert {k: seen[k] for k in ("steps", "lr", "weight_decay", "warmup", "seed", "progress")} == \
        {"steps": 4, "lr": 0.2, "weight_decay": 0.5, "warmup": 2, "seed": 3, "progress": False}
    assert float(seen["logs"]["structure"]) > 0  # structure_weight=0 reached the loss:
    assert float(seen["loss"].detach()) == pytest.approx(float(seen["logs"]["instance"]))
    noisy = [pc.perturb_caption(t, 0.6, seed=3) for t in TEXTS]
    assert set(noisy) <= set(model.cache)  # noise_drop / seed reached the perturbation
    pc.distill_text(model, TEXTS, noisy_texts=["x"] * len(TEXTS), steps=1, warmup=0)
    assert "x" in model.cache
    seen.clear()
    pc.contrastive_tune(model, _pixels(model, len(TEXTS)), TEXTS, distill_weight=0.0, steps=5, batch_size=2,
                        lr=0.1, weight_decay=0.25, warmup=1, seed=7, progress=False)
    assert {k: seen[k] for k in ("steps", "lr", "weight_decay", "warmup", "seed", "progress")} == \
        {"steps": 5, "lr": 0.1, "weight_decay": 0.25, "warmup": 1, "seed": 7, "progress": False}


def test_stage1_loss_is_both_instance_terms_plus_the_structure_term(monkeypatch):
    """One batch holding every text: the step's loss equals the brute-force sum of the clean and noisy instance
    terms (order-free sums) plus ``structure_weight`` times the structure term."""
    seen = {}

    def fake_fit(params, step, **kw):
        seen["loss"], seen["logs"] = step(0)
        return pc.FitResult(kw["steps"])

    monkeypatch.setattr(pc, "fit", fake_fit)
    model = pc.proclip_model(cliplab.create_model("test-tiny", seed=0), tiny_bert())
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    noisy = [t + " red" for t in TEXTS]
    pc.distill_text(model, TEXTS, noisy_texts=noisy, steps=1, batch_size=len(TEXTS), structure_weight=0.5)
    with torch.no_grad():
        s = model.encode_texts(TEXTS, normalize=True)
        s_n = model.encode_texts(noisy, normalize=True)
        t, t_n = pc.clip_text_features(model.clip, TEXTS), pc.clip_text_features(model.clip, noisy)
    inst = float(((s - t) ** 2).sum() + ((s_n - t_n) ** 2).sum())
    struct = float(pc.structure_alignment_loss(s, t))
    assert float(seen["logs"]["instance"]) == pytest.approx(inst, rel=1e-4)
    assert float(seen["logs"]["structure"]) == pytest.approx(struct, rel=1e-4)
    assert float(seen["loss"].detach()) == pytest.approx(inst + 0.5 * struct, rel=1e-4)


def test_perturb_caption_drops_words_reproducibly():
    t = "a small red circle on the left of a large blue square"
    assert pc.perturb_caption(t, 0.0) == t
    assert pc.perturb_caption(t, 0.5, seed=1) == pc.perturb_caption(t, 0.5, seed=1)
    assert len(pc.perturb_caption(t, 0.5, seed=1).split()) < len(t.split())
    assert pc.perturb_caption(t, 1.0) == "a"


def test_stage1_distils_clip_text_space_into_minilm(minilm, tmp_path):
    """MiniLM + ProCLIP adapter, trained only to imitate shapes-tiny's text embeddings of 200 synthetic captions,
    retrieves 40 held-out synthetic images zero-shot from their short captions far above chance (and the untrained
    adapter, same model, does not)."""
    from cliplab.data import SceneWorld

    world = SceneWorld(image_size=64, seed=3)
    base = cliplab.load("shapes-tiny").eval()
    train = [world.sample(i).short_caption for i in range(200)]
    test = [world.sample(10_000 + i) for i in range(40)]
    model = pc.proclip_model(base, minilm)
    with torch.no_grad():
        img = model.encode_image(base.preprocessor.batch([s.render() for s in test]), normalize=True)

    def r1():
        with torch.no_grad():
            t = model.encode_texts([s.short_caption for s in test], normalize=True)
        return float(((t @ img.T).argmax(1) == torch.arange(len(test))).float().mean())

    before = r1()
    pc.distill_text(model, train, steps=150, batch_size=64, lr=2e-3)
    after = r1()
    assert after >= 0.3 and after > before + 0.2, (before, after)  # chance 1/40
    model.save(tmp_path / "m", embedder_ref="all-MiniLM-L6-v2")
    back = load_llm_clip(tmp_path / "m", embedder=minilm)
    assert back.adapter.normalize_input and len(back.adapter.blocks) == 1
    with torch.no_grad():
        torch.testing.assert_close(back.encode_texts(train[:4]), model.encode_texts(train[:4]))


def test_doc_example_runs(minilm):
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert code, "docs/methods/proclip.md has no python example"
    exec(compile(code[0], str(DOC), "exec"), {})
