"""MCIP / 2SFT (:mod:`cliplab.objectives.mcip`): ArcMargin and MCArcMargin against brute force, the proxy learning-rate
reparametrisation, the near-duplicate source and benchmark, keyword pass-through to the trainer, per-stage freezing
(bit-identical frozen towers, gradients only into the trained one) and the effect on the shipped model."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cliplab
from cliplab.objectives import mcip
from cliplab.objectives.mcip import (MCIPLoss, NearDuplicateViews, arc_margin_logits, arc_margin_loss,
                                     arcmargin_loss, layout_distractor, mcip_config, near_duplicate,
                                     near_duplicate_benchmark, multi_caption_arc_margin_loss, retrieval_map)
from cliplab.data import SceneWorld
from cliplab.models import ModelConfig
from cliplab.train import BatchOutput, Trainer, get_loss, get_preset
from cliplab.train.data import Batch
from cliplab.train.presets import tiny_smoke_model

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


def _tiny():
    return cliplab.create_model(ModelConfig.from_dict(tiny_smoke_model()), seed=0)


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


# --- ArcMargin -------------------------------------------------------------------------------------------------------
def test_arc_margin_logits_match_the_angle_formula():
    cos = torch.tensor([[0.9, -0.2, -0.999], [0.3, 0.99, -0.9]])
    pos = torch.tensor([[True, True, True], [False, True, True]])
    s, m = 30.0, 0.2
    got = arc_margin_logits(cos, pos, s, m)
    for i in range(2):
        for j in range(3):
            c = float(cos[i, j])
            if not pos[i, j]:
                want = s * c
            elif math.acos(c) + m < math.pi:  # the margin fits: cos(theta + m)
                want = s * math.cos(math.acos(c) + m)
            else:  # theta + m would pass pi: the linear fallback keeps the logit decreasing
                want = s * (c - m * math.sin(m))
            assert float(got[i, j]) == pytest.approx(want, abs=1e-4)


def test_arc_margin_is_softmax_cross_entropy_at_zero_margin_and_larger_with_one():
    feats, proxies = _unit(6, 8, 0), _unit(5, 8, 1)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    plain = F.cross_entropy(30.0 * feats @ proxies.t(), labels)
    assert float(arc_margin_loss(feats, proxies, labels, 30.0, 0.0)) == pytest.approx(float(plain), rel=1e-5)
    assert float(arc_margin_loss(feats, 3 * proxies, labels, 30.0, 0.0)) == pytest.approx(float(plain), rel=1e-5)
    for m in (0.05, 0.1, 0.5):
        assert float(arc_margin_loss(feats, proxies, labels, 30.0, m)) > float(plain)


def test_multi_caption_arc_margin_matches_a_brute_force_loop():
    img, txt = _unit(3, 8, 2), _unit(5, 8, 3)
    positive = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    s, m, tail = 20.0, 0.15, 0.1
    total = 0.0
    for b in range(3):
        z = []
        for t in range(5):
            c = float(img[b] @ txt[t])
            z.append(s * math.cos(math.acos(c) + m) if positive[b, t] else s * c)
        log_z = math.log(sum(math.exp(v) for v in z))
        log_p = [v - log_z for v in z]
        pos = [t for t in range(5) if positive[b, t]]
        ce = -sum(log_p[t] for t in pos) / len(pos) if pos else 0.0
        total += ce + tail * max(-log_p[t] for t in range(5) if t not in pos)
    got = multi_caption_arc_margin_loss(img, txt, positive, s, m, tail)
    assert float(got) == pytest.approx(total / 3, rel=1e-5)


# --- the loss --------------------------------------------------------------------------------------------------------
class _Model(torch.nn.Module):  # what attach() reads of a model
    def __init__(self, embed_dim: int):
        super().__init__()
        self.config = type("Config", (), {"embed_dim": embed_dim})()


def _out(indices: list[int], dim: int = 8, seed: int = 0) -> BatchOutput:
    n = len(indices)
    batch = Batch(step=0, indices=indices, pixels=torch.zeros(0), ids=torch.zeros(0), texts=[""] * n,
                  is_long=torch.zeros(n, dtype=torch.bool), truncated=torch.zeros(n, dtype=torch.bool))
    return BatchOutput(_unit(n, dim, seed), _unit(n, dim, seed + 1), torch.tensor(math.log(1 / 0.07)), batch)


def _attached(**kw) -> MCIPLoss:
    torch.manual_seed(0)
    loss = MCIPLoss(**{"num_classes": 6, "views": 2, **kw})
    loss.attach(_Model(8))
    return loss


def test_mcip_loss_is_the_weighted_sum_of_its_terms():
    out = _out([4, 5, 6, 7, 0, 1])  # views=2: classes 2, 2, 3, 3, 0, 0
    loss_fn = _attached(text_weight=0.25, margin=0.2, scale=16.0, tail_weight=0.3)
    labels = torch.tensor([2, 2, 3, 3, 0, 0])
    assert torch.equal(loss_fn.labels(out.batch.indices), labels)
    arc = arc_margin_loss(out.image_features, loss_fn.proxies, labels, 16.0, 0.2).detach()
    text = multi_caption_arc_margin_loss(out.image_features, out.text_features, labels[:, None] == labels[None, :],
                                         16.0, 0.2, 0.3).detach()
    loss, logs = loss_fn(out)
    loss = loss.detach()
    assert float(loss) == pytest.approx(0.75 * float(arc) + 0.25 * float(text), rel=1e-6)
    assert logs["arcmargin"] == pytest.approx(float(arc)) and logs["mc_arcmargin"] == pytest.approx(float(text))
    only_arc, logs = _attached(text_weight=0.0, margin=0.2, scale=16.0)(out)
    assert only_arc.item() == pytest.approx(float(arc), rel=1e-6) and "mc_arcmargin" not in logs
    with pytest.raises(ValueError, match="num_classes"):
        loss_fn(_out([12, 13]))  # class 6 with views=2: the source has more classes than the loss's proxies


def test_text_features_get_no_gradient():
    out = _out([0, 1, 2, 3])
    txt = out.text_features.clone().requires_grad_(True)
    img = out.image_features.clone().requires_grad_(True)
    loss, _ = _attached()(BatchOutput(img, txt, out.logit_scale, out.batch))
    loss.backward()
    assert txt.grad is None and img.grad is not None and img.grad.abs().sum() > 0


def test_proxy_reparametrisation_is_a_larger_adam_step():
    """The stored proxy ``w / k`` under AdamW at rate ``lr`` moves ``w`` as AdamW at ``k * lr`` would (eps aside)."""
    loss_fn = _attached(proxy_lr_scale=100.0)
    w0 = loss_fn.proxies.detach().clone()
    direct = torch.nn.Parameter(w0.clone())
    opt_a = torch.optim.AdamW([loss_fn.stored_proxies], lr=1e-3, eps=1e-12, weight_decay=0.0)
    opt_b = torch.optim.AdamW([direct], lr=1e-1, eps=1e-12, weight_decay=0.0)
    for step in range(3):
        out = _out([0, 1, 2, 3, 4, 5], seed=step)
        labels = loss_fn.labels(out.batch.indices)
        for opt, proxies in ((opt_a, loss_fn.proxies), (opt_b, direct)):
            opt.zero_grad()
            arc_margin_loss(out.image_features, proxies, labels).backward()
            opt.step()
    assert torch.allclose(loss_fn.proxies.detach(), direct.detach(), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(direct.detach(), w0)


def test_every_keyword_reaches_the_loss():
    kw = dict(num_classes=9, views=3, scale=12.0, margin=0.3, text_weight=0.4, tail_weight=0.2, proxy_lr_scale=7.0)
    loss = get_loss("mcip", **kw)
    assert {k: getattr(loss, k) for k in kw} == kw
    alias_kw = {k: v for k, v in kw.items() if k not in ("text_weight", "tail_weight")}
    alias = get_loss("arcmargin", **alias_kw)
    assert isinstance(alias, MCIPLoss) and alias.text_weight == 0.0
    assert {k: getattr(alias, k) for k in alias_kw} == alias_kw
    assert repr(arcmargin_loss(5)) == repr(MCIPLoss(5, text_weight=0.0))  # same defaults
    for bad in (dict(num_classes=1), dict(num_classes=4, text_weight=1.5), dict(num_classes=4, margin=-0.1)):
        with pytest.raises(ValueError):
            MCIPLoss(**bad)


# --- near-duplicates ---------------------------------------------------------------------------------------------
def test_near_duplicate_moves_objects_a_little_and_keeps_their_attributes():
    world = SceneWorld(seed=3)
    for i in range(10):
        scene = world.sample(i)
        dup = near_duplicate(world, scene, np.random.default_rng(i), jitter=2.0, background_shift=6)
        assert world.layout_ok(dup) and dup.brightness == scene.brightness and dup.word == scene.word
        assert abs(dup.background - scene.background) <= 6
        for a, b in zip(scene.objects, dup.objects):
            assert (a.shape, a.colour, a.size, a.texture) == (b.shape, b.colour, b.size, b.texture)
            assert abs(a.x - b.x) <= 2.0 and abs(a.y - b.y) <= 2.0
        other = layout_distractor(world, scene, np.random.default_rng(i))
        assert sorted((o.shape, o.colour, o.size, o.texture) for o in other.objects) == sorted(
            (o.shape, o.colour, o.size, o.texture) for o in scene.objects)
        assert world.layout_ok(other)


def test_views_source_layout_and_siblings():
    model = cliplab.create_model(cliplab.get_config("test-tiny"))
    src = NearDuplicateViews(model.preprocessor, num_classes=6, views=3, siblings=2, jitter=1.5, background_shift=4,
                             seed=5)
    assert (src.size, src.group_size) == (18, 3)
    for cls in range(6):
        base = src.class_scene(cls)
        assert src.scene(3 * cls) == base  # view 0 is the class scene
        for v in (1, 2):
            view = src.scene(3 * cls + v)
            assert view != base and all(abs(a.x - b.x) <= 1.5 for a, b in zip(base.objects, view.objects))
    a, b = src.class_scene(0), src.class_scene(1)  # siblings: the same objects, another layout
    assert [o.colour for o in a.objects] == [o.colour for o in b.objects] and a.objects != b.objects
    again = NearDuplicateViews(model.preprocessor, num_classes=6, views=3, siblings=2, jitter=1.5, background_shift=4,
                               seed=5)
    assert again.scene(7) == src.scene(7)  # a pure function of the options and the index
    with pytest.raises(IndexError):
        src.scene(18)


def test_retrieval_map_matches_a_brute_force_average_precision():
    feats = torch.randn(9, 4, generator=torch.Generator().manual_seed(1))
    labels = [0, 0, 0, 1, 1, 2, 2, -1, -1]
    f = F.normalize(feats, dim=-1)
    aps, r1 = [], []
    for q in range(9):
        if labels[q] < 0:
            continue
        others = sorted((j for j in range(9) if j != q), key=lambda j: -float(f[q] @ f[j]))
        rel = [labels[j] == labels[q] for j in others]
        hits, precisions = 0, []
        for k, r in enumerate(rel, 1):
            if r:
                hits += 1
                precisions.append(hits / k)
        aps.append(sum(precisions) / len(precisions))
        r1.append(rel[0])
    got = retrieval_map(feats, labels)
    assert got["mAP"] == pytest.approx(sum(aps) / len(aps)) and got["R@1"] == pytest.approx(sum(r1) / len(r1))


def test_benchmark_holds_views_and_distractors():
    bench = near_duplicate_benchmark(n_scenes=4, views=3, distractors=2, seed=9)
    labels = np.array(bench.labels)
    assert all((labels == s).sum() == 3 for s in range(4)) and (labels == -1).sum() <= 8
    assert len(bench.images) == len(bench.scenes) == len(labels)


# --- recipes: pass-through and freezing ----------------------------------------------------------------------------
def test_presets_and_config_pass_every_keyword():
    kw = dict(num_classes=10, views=2, steps=7, batch_size=8, lr=3e-5, text_weight=0.5, scale=20.0, margin=0.2,
              tail_weight=0.05, proxy_lr_scale=50.0, jitter=1.0, background_shift=3, siblings=3, data_seed=4,
              init_from="x", out_dir="o", seed=2, threads=2, extra_freeze=["visual.stem.*"])
    cfg = mcip_config("mcip", **kw)
    assert cfg.loss_kwargs == dict(num_classes=10, views=2, scale=20.0, margin=0.2, proxy_lr_scale=50.0,
                                   text_weight=0.5, tail_weight=0.05)
    assert cfg.data.options == dict(num_classes=10, views=2, jitter=1.0, background_shift=3, siblings=3, seed=4)
    assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.init_from, cfg.out_dir, cfg.seed, cfg.threads) == (
        7, 8, 3e-5, "x", "o", 2, 2)
    assert cfg.freeze == ["text.*", "logit_scale", "visual.stem.*"] and cfg.sampler == "sequential"
    stage1 = mcip_config("arcmargin", **kw)
    assert stage1.loss == "arcmargin" and "text_weight" not in stage1.loss_kwargs
    stage2 = mcip_config("realign", **kw)
    assert (stage2.loss, stage2.freeze, stage2.data.options, stage2.lr) == ("clip", ["visual.*"], {"seed": 4}, 3e-5)
    with pytest.raises(ValueError, match="multiple of views"):
        mcip_config("mcip", batch_size=10, views=4)
    assert get_preset("mcip-tiny").init_from == "shapes-tiny" and get_preset("mcip-2sft-tiny").loss == "arcmargin"
    assert get_preset("mcip-realign-tiny").init_from == "runs/mcip-2sft-tiny/final"


def test_convenience_functions_pass_every_keyword(monkeypatch):
    seen = []

    class FakeTrainer:
        def __init__(self, cfg, model=None):
            seen.append((cfg, model))

        def fit(self):
            return "fit"

    monkeypatch.setattr(mcip, "Trainer", FakeTrainer)
    kw = dict(num_classes=10, views=2, batch_size=8, lr=3e-5, scale=20.0, margin=0.2, proxy_lr_scale=50.0,
              jitter=1.0, background_shift=3, siblings=3, data_seed=4, seed=2, threads=2, extra_freeze=["a*"])
    model = torch.nn.Linear(2, 2)
    assert mcip.mcip_finetune(model, steps=5, out_dir="a", text_weight=0.4, tail_weight=0.3, **kw) == "fit"
    cfg, got = seen.pop()
    assert got is model and cfg == mcip_config("mcip", steps=5, out_dir="a", init_from=None, text_weight=0.4,
                                               tail_weight=0.3, **kw)
    assert mcip.two_stage_finetune(model, steps=5, realign_steps=3, realign_lr=1e-4, out_dir="b", **kw) == (
        "fit", "fit")
    (first, m1), (second, m2) = seen
    assert m1 is model and m2 is model
    assert first == mcip_config("arcmargin", steps=5, out_dir="b/stage1", init_from=None, **kw)
    assert second == mcip_config("realign", steps=3, out_dir="b/stage2", init_from=None, **{**kw, "lr": 1e-4})


def test_set_overrides_reach_the_loss_and_source(tmp_path):
    cfg = get_preset("mcip-tiny").with_overrides([
        "loss_kwargs.margin=0.3", "loss_kwargs.scale=25", "loss_kwargs.text_weight=0.5", "loss_kwargs.tail_weight=0",
        "loss_kwargs.proxy_lr_scale=10", "loss_kwargs.num_classes=8", "data.options.num_classes=8",
        "data.options.siblings=4", "data.options.jitter=1.5", "init_from=null", f"out_dir={tmp_path}"])
    trainer = Trainer(cfg, model=_tiny())
    loss = trainer.loss_fn
    assert (loss.margin, loss.scale, loss.text_weight, loss.tail_weight, loss.proxy_lr_scale, loss.num_classes) == (
        0.3, 25.0, 0.5, 0.0, 10.0, 8)
    assert (trainer.source.num_classes, trainer.source.siblings, trainer.source.jitter) == (8, 4, 1.5)


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """A from-scratch tiny model through two steps of each stage (the towers' parameters before and after)."""
    torch.manual_seed(0)
    model = _tiny()
    snaps = [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    opts = dict(steps=2, batch_size=8, views=2, num_classes=8, lr=1e-3, init_from=None, threads=1)
    root = tmp_path_factory.mktemp("mcip")
    for stage in ("mcip", "realign"):
        mcip.run_stage(model, mcip_config(stage, out_dir=str(root / stage), **opts))
        assert all(p.requires_grad for p in model.parameters())  # the next stage freezes only its own tower
        snaps.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return snaps


def _changed(before: dict, after: dict, prefix: str) -> tuple[bool, bool]:
    keys = [k for k in before if k.startswith(prefix)]
    return all(torch.equal(before[k], after[k]) for k in keys), any(not torch.equal(before[k], after[k]) for k in keys)


def test_each_stage_trains_only_its_tower(staged):
    start, after_mcip, after_realign = staged
    assert _changed(start, after_mcip, "text.") == (True, False)  # bit-identical text tower
    assert torch.equal(start["logit_scale"], after_mcip["logit_scale"])
    assert _changed(start, after_mcip, "visual.")[1]
    assert _changed(after_mcip, after_realign, "visual.") == (True, False)  # bit-identical image tower
    assert _changed(after_mcip, after_realign, "text.")[1]


def test_gradients_reach_only_the_image_tower_without_any_freezing():
    """Even with every parameter trainable, the MCIP loss sends no gradient into the text tower or the scale."""
    model = _tiny()
    loss_fn = MCIPLoss(num_classes=4, views=2)
    loss_fn.attach(model)
    src = NearDuplicateViews(model.preprocessor, num_classes=4, views=2)
    idx = list(range(8))
    tokens = model.tokenizer(src.captions(idx)[0])
    img = F.normalize(model.encode_image(src.pixels(idx)), dim=-1)
    txt = F.normalize(model.encode_text(tokens.ids), dim=-1)
    batch = Batch(step=0, indices=idx, pixels=torch.zeros(0), ids=tokens.ids, texts=[], is_long=torch.zeros(8),
                  truncated=torch.zeros(8))
    loss_fn(BatchOutput(img, txt, model.logit_scale, batch))[0].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None for n, g in grads.items() if not n.startswith("visual."))
    assert all(g is not None for n, g in grads.items() if n.startswith("visual."))


def test_docs_example_runs():
    text = (ROOT / "docs" / "methods" / "mcip.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    exec(compile(blocks[0], "docs/methods/mcip.md", "exec"), {})


# --- effect on the shipped model ---------------------------------------------------------------------------------
EFFECT = dict(steps=24, lr=3e-4, batch_size=16, num_classes=32, views=2, siblings=4)


def test_effect_mcip_separates_its_instances_and_keeps_text_search(tmp_path):
    """The shipped model (the control) against itself after MCIP on the same instance classes: fresh near-duplicate
    views of the trained classes (views 2-4, never trained on; every class has 3 sibling classes with the same
    objects elsewhere) are retrieved better (mAP +0.03 or more; measured 0.494 -> 0.540), while text-to-image R@1
    over 100 held-out scenes stays within the stated tolerance of 0.15 of the start (measured 0.96 -> 0.85: MCIP
    does not keep text search intact at this scale; lr 1.5e-4 kept 0.89 but gained only +0.014 mAP). Held-out
    scenes gain little: see docs/methods/mcip.md."""
    model = cliplab.load("shapes-tiny")
    src = NearDuplicateViews(model.preprocessor, num_classes=EFFECT["num_classes"], views=5,
                             siblings=EFFECT["siblings"])
    idx = [c * 5 + v for c in range(EFFECT["num_classes"]) for v in (2, 3, 4)]
    labels = [i // 5 for i in idx]
    world = SceneWorld(seed=2027)
    scenes = [world.sample(i) for i in range(100)]

    @torch.no_grad()
    def measure():
        model.eval()
        i2i = retrieval_map(model.encode_image(src.pixels(idx)), labels)["mAP"]
        img = model.encode_images([s.image for s in scenes], normalize=True)
        txt = model.encode_texts([s.short_caption for s in scenes], normalize=True)
        return i2i, float(((txt @ img.t()).argmax(1) == torch.arange(100)).float().mean())

    before = measure()
    mcip.mcip_finetune(model, out_dir=str(tmp_path / "run"), **EFFECT)
    after = measure()
    assert after[0] > before[0] + 0.03, (before, after)
    assert after[1] >= before[1] - 0.15, (before, after)
