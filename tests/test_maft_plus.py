"""MAFT+ (cliplab.dense.maft_plus): CDT's identity at zero transfer weights, the RC loss and POD against brute force,
mask pooling, save/load, keywords reaching the core, and the held-out-class effect against same-compute controls."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cliplab
from cliplab.dense import maft_plus as M


@pytest.fixture(scope="module")
def model():
    return cliplab.load("shapes-tiny")


def test_cdt_with_zero_transfer_weights_returns_the_text_embeddings():
    torch.manual_seed(0)
    cdt = M.ContentDependentTransfer(32, heads=4)
    text, feats = torch.randn(5, 32), torch.randn(3, 16, 32)
    assert torch.equal(cdt(text, feats, (4, 4)), text.expand(3, -1, -1))
    with torch.no_grad():
        cdt.out.weight.normal_(std=0.1)
    moved = cdt(text, feats, (4, 4))
    assert (moved[0] - text).abs().max() > 1e-3 and (moved[0] - moved[1]).abs().max() > 1e-4  # per-image


def test_cdt_matches_a_brute_force_cross_attention():
    torch.manual_seed(1)
    cdt = M.ContentDependentTransfer(8, heads=2)
    with torch.no_grad():
        cdt.out.weight.normal_(std=0.3)
    text, feats = torch.randn(3, 8), torch.randn(1, 4, 8)
    keys = feats[0] + M.sine_positions((2, 2), 8)
    q, k, v = cdt.q(text), cdt.k(keys), cdt.v(feats[0])
    heads = []
    for h in range(2):
        s = slice(4 * h, 4 * h + 4)
        heads.append(torch.softmax(q[:, s] @ k[:, s].T / 2.0, -1) @ v[:, s])
    brute = text + cdt.out(torch.cat(heads, -1))
    assert torch.allclose(cdt(text, feats, (2, 2))[0], brute, atol=1e-5)


def test_pod_and_rc_loss_against_brute_force():
    torch.manual_seed(2)
    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    out = M.pod(x)
    assert out.shape == (2, 3 * (2 + 4 + 8))
    cells = x[:, :, :4, :4].mean((-1, -2)), x[:, :, :4, 4:].mean((-1, -2))  # scale 2, top row of cells
    assert torch.allclose(out[:, 3 + 3:3 + 3 + 2 * 3].view(2, 3, 2)[:, :, 0], cells[0] + cells[1], atol=1e-6)
    assert torch.allclose(out[:, :3], x.mean((-1, -2)), atol=1e-6)
    assert M.rc_loss(x, x.clone()) == 0
    assert M.rc_loss(-x.abs(), -y.abs()) == 0  # relu: negative features are not compensated
    assert M.rc_loss(x, y) > 0


def test_mask_pool_is_the_covered_mean():
    feats = torch.arange(4.0).view(1, 4, 1).expand(1, 4, 2)
    masks = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    masks[0, 0, :2, :] = True  # the top two cells of a 2x2 grid
    w = M.proposal_weights(masks, (2, 2))
    assert torch.equal(w, torch.tensor([[[1.0, 1.0, 0.0, 0.0]]]))
    assert torch.equal(M.mask_pool(feats, w), torch.tensor([[[0.5, 0.5]]]))


def test_untrained_maft_equals_plain_mask_pooled_classification(model):
    from cliplab.dense import SyntheticSegmentation

    samples = list(SyntheticSegmentation(n=3, by="shape"))
    px, masks, _ = M._scene_batch(model, samples, (8, 8))
    text = M.class_embeddings(model, ("circle", "square", "star"))
    with torch.no_grad():
        logits = M.MaftPlus(model).classify(px, masks, text)
        tokens = model.encode_image(px, output="tokens").tokens[:, 1:]
        pooled = M.mask_pool(tokens, M.proposal_weights(masks, (8, 8)))
        plain = model.logit_scale.exp() * F.normalize(pooled, dim=-1) @ text.T
    assert torch.allclose(logits, plain, atol=1e-5)


def test_keywords_reach_training_and_save_load(tmp_path, monkeypatch):
    calls = []
    real = M.rc_loss
    monkeypatch.setattr(M, "rc_loss", lambda a, b: calls.append(1) or real(a, b))
    tuned = cliplab.load("shapes-tiny")
    frozen_block = tuned.visual.transformer.blocks[-2].attn.qkv.weight.clone()
    cfg = M.MaftConfig(steps=2, batch_size=4, pool_scenes=8, train_blocks=1, lr=1e-3, rc_weight=0.5,
                       seen=("circle", "square", "triangle"))
    maft = M.train_maft_plus(tuned, cfg)
    assert len(calls) == 2 and maft.use_cdt
    assert torch.equal(tuned.visual.transformer.blocks[-2].attn.qkv.weight, frozen_block)  # train_blocks honoured
    assert maft.cdt.out.weight.abs().sum() > 0  # CDT trained
    calls.clear()
    off = M.train_maft_plus(cliplab.load("shapes-tiny"), M.MaftConfig(steps=1, batch_size=4, pool_scenes=8,
                                                                     rc_weight=0.0, use_cdt=False))
    assert not calls and not off.use_cdt and off.cdt.out.weight.abs().sum() == 0
    maft.save(tmp_path / "m")
    back = M.MaftPlus.load(tmp_path / "m")
    px, masks = torch.rand(1, 3, 64, 64), torch.ones(1, 1, 64, 64, dtype=torch.bool)
    text = torch.randn(3, tuned.config.embed_dim)
    with torch.no_grad():
        assert torch.equal(maft.classify(px, masks, text), back.classify(px, masks, text))
    with pytest.raises(ValueError, match="not a saved MAFT"):
        M.MaftPlus.load(tmp_path)


@pytest.fixture(scope="module")
def trained_arms():
    """CDT + RC and CDT without RC: same seed, scenes, batches and steps (a short run of the measured recipe)."""
    cfg = dict(steps=15, batch_size=16, pool_scenes=48)
    return {"rc": M.train_maft_plus(cliplab.load("shapes-tiny"), M.MaftConfig(**cfg)),
            "no_rc": M.train_maft_plus(cliplab.load("shapes-tiny"), M.MaftConfig(rc_weight=0.0, **cfg))}


def test_effect_training_beats_frozen_and_rc_keeps_features_close(model, trained_arms):
    """Against the frozen model (same proposals, same vocabulary) the trained proposal classifier is far better on
    the seen classes (0.71 vs 0.22 mIoU after 100 steps; here 15), and RC keeps the fine-tuned features closer to
    the frozen ones than the same run without it. (Held-out classes, measured in experiments/maft_plus_heldout.py:
    0.22 with RC, 0.27 without, 0.16 frozen: RC's protective effect is not reproduced; docs/methods/maft_plus.md.)"""
    from cliplab.dense import SyntheticSegmentation

    seen = M.MaftConfig().seen
    frozen = M.evaluate_open_vocab(M.MaftPlus(model), seen, n=20)
    rc = M.evaluate_open_vocab(trained_arms["rc"], seen, n=20)
    assert rc["seen_miou"] > frozen["seen_miou"] + 0.2
    samples = list(SyntheticSegmentation(n=8, offset=500, by="shape"))
    px, _, _ = M._scene_batch(model, samples, (8, 8))
    to_map = lambda t: t.transpose(1, 2).reshape(t.shape[0], -1, 8, 8)  # noqa: E731
    with torch.no_grad():
        base = to_map(M.MaftPlus(model).dense_features(px)[0])
        drift = {k: M.rc_loss(to_map(arm.dense_features(px)[0]), base).item() for k, arm in trained_arms.items()}
    assert drift["rc"] < 0.7 * drift["no_rc"]
