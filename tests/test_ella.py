"""ELLA (cliplab.t2i.ella): the Timestep-aware Semantic Connector's exact properties (fixed output count, zero-init
AdaLN: time-independent output with the time term off, padding ignored), the wrapper (timesteps reach the connector
while sampling, guidance in closed form, only the connector gets gradients), keyword pass-through, save/load, a
short training run, and the effect: the shipped TSC binds colours to shapes on 3-object prompts better than the
pooled-embedding control trained with the same steps, data and seed."""

from __future__ import annotations

import re

import pytest
import torch

import cliplab.t2i.ella as ella
from cliplab.generation import Conditioning, DenoiserConfig, DiffusionGenerator, GenerationScenes, TokenDenoiser
from conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ella.ConnectorConfig(input_dim=12, output_dim=16, width=16, layers=2, heads=2, num_latents=8,
                             time_channels=16, time_embed_dim=16)
TINY_GEN = DenoiserConfig(image_size=32, cond_dim=16, channels=(8, 16), attn_levels=(1,), heads=2, time_dim=16,
                          groups=4)


def _tokens(b=2, length=5, dim=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, length, dim, generator=g), torch.ones(b, length, dtype=torch.bool)


def _perturb(module, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # leave the zero-initialised state so every path carries signal
        for _, p in sorted(module.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def _tiny_generator(seed=0):
    torch.manual_seed(seed)
    gen = DiffusionGenerator(_perturb(TokenDenoiser(TINY_GEN), seed), guidance=3.0)
    return gen.frozen()


class FakeLM:
    """An LMConditioner stand-in: one fixed random vector per character (width 12), no padding logic beyond masks."""

    dim = 12

    def __call__(self, texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = max(1, max(len(t) for t in texts)) + 1
        tokens = torch.zeros(len(texts), length, self.dim)
        mask = torch.zeros(len(texts), length, dtype=torch.bool)
        for i, t in enumerate(texts):
            for j, ch in enumerate("^" + t):
                tokens[i, j] = torch.randn(self.dim, generator=torch.Generator().manual_seed(ord(ch)))
                mask[i, j] = True
        return Conditioning(tokens, mask)

    def null(self, n=1):
        return self([""] * n)


# --------------------------------------------------------------------------------------------- exact properties
def test_output_count_is_fixed_for_any_length():
    torch.manual_seed(0)
    tsc = ella.TimestepAwareConnector(SMALL)
    for length in (1, 7, 77, 300):
        x, m = _tokens(3, length)
        assert tsc(x, m, torch.tensor([0, 500, 999])).shape == (3, 8, 16)
    pooled = ella.PooledConnector(12, 16)
    assert pooled(*_tokens(2, 300)).shape == (2, 1, 16)


def test_output_count_with_minilm_prompts_beyond_77_tokens(minilm):
    text = ella.LMConditioner(minilm)
    long_prompt = " and ".join(["a red circle", "a blue square", "a green triangle"] * 12)
    cond = text(["a red circle", long_prompt])
    assert cond.tokens.shape[1] > 77 and cond.mask.sum(1).tolist()[0] < 10  # [CLS] a red circle [SEP]
    torch.manual_seed(0)
    tsc = ella.TimestepAwareConnector(ella.TOY)
    out = tsc.condition(cond, torch.tensor([10, 900]))
    assert out.tokens.shape == (2, 64, 128) and bool(out.mask.all())


def test_time_term_off_makes_init_output_bit_identical_across_timesteps():
    x, m = _tokens(2, 6)
    t0, t999 = torch.zeros(2, dtype=torch.long), torch.full((2,), 999)
    torch.manual_seed(0)
    off = ella.TimestepAwareConnector(ella.ConnectorConfig(**{**SMALL.to_dict(), "time_aware": False}))
    assert torch.equal(off(x, m, t0), off(x, m, t999))  # AdaLN starts at zero: no path from t
    torch.manual_seed(0)
    on = ella.TimestepAwareConnector(SMALL)
    assert not torch.allclose(on(x, m, t0), on(x, m, t999), atol=1e-4)  # the time-aware linear term alone
    # the same weights with that term zeroed: identical again, and equal to the "off" model
    with torch.no_grad():
        on.time_aware_linear.weight.zero_()
        on.time_aware_linear.bias.zero_()
    assert torch.equal(on(x, m, t0), on(x, m, t999))
    # once the AdaLN weights move (training), the output depends on t through them
    with torch.no_grad():
        for block in off.blocks:
            block.ln_latents.linear.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(off(x, m, t0), off(x, m, t999), atol=1e-4)


def test_adaln_is_identity_layernorm_at_init_and_shift_scale_order():
    ada = ella.AdaLayerNorm(8, 4)
    x, temb = torch.randn(2, 3, 8), torch.randn(2, 4)
    ln = torch.nn.functional.layer_norm(x, (8,), eps=1e-6)
    assert torch.equal(ada(x, temb), ln)
    with torch.no_grad():
        ada.linear.bias[:8] = 0.5   # shift
        ada.linear.bias[8:] = 1.0   # scale
    assert torch.allclose(ada(x, temb), ln * 2 + 0.5, atol=1e-6)


def test_padding_is_ignored():
    torch.manual_seed(0)
    tsc = _perturb(ella.TimestepAwareConnector(SMALL))
    pooled = _perturb(ella.PooledConnector(12, 16))
    x, m = _tokens(2, 9, seed=3)
    m[0, 4:] = False
    t = torch.tensor([5, 700])
    for net in (tsc, pooled):
        base = net(x, m, t)
        junk = x.clone()
        junk[0, 4:] = 1e3
        assert torch.equal(net(junk, m, t)[0], base[0])         # values at padded positions never read
        alone = net(x[:1, :4], m[:1, :4], t[:1])
        assert torch.allclose(alone, base[:1], atol=1e-5)       # a prompt's output does not depend on its batch


def test_pooled_connector_closed_form():
    net = _perturb(ella.PooledConnector(12, 16))
    x, m = _tokens(1, 5)
    m[0, 3:] = False
    lin, ln = net.proj
    expected = ln(lin(x[0, :3].mean(0)))
    assert torch.allclose(net(x, m)[0, 0], expected, atol=1e-6)


def test_slot_colours_are_right_on_clean_renders_and_wrong_when_colours_change_places():
    from cliplab.generation.quality import held_out_specs

    for count in (2, 3):
        specs, clean = held_out_specs(count, 24)
        assert ella.slot_colour_accuracy(clean, specs) == 1.0
        moved = [list(s.pairs[1:]) + [s.pairs[0]] for s in specs]   # the same colours, in other slots
        assert ella.slot_colour_accuracy(clean, moved) == 0.0
    grey = torch.full((1, 3, 32, 32), 120 / 255)
    assert ella.slot_colour_accuracy(grey, [[("red", "circle")]], per_image=True) == [0.0]


# --------------------------------------------------------------------------------------------- the wrapper
def test_sampling_hands_each_ddim_timestep_to_the_connector_and_guides_in_closed_form():
    gen = _tiny_generator()
    gen.prediction = "eps"  # a v-predictor's x0 at t=999 amplifies batch-order rounding ~1/sqrt(abar) times
    torch.manual_seed(0)
    tsc = _perturb(ella.TimestepAwareConnector(SMALL))
    seen = []
    tsc.register_forward_hook(lambda mod, args, out: seen.append(args[2].clone()))
    wrapped = ella.ConnectedGenerator(gen, tsc, text=FakeLM())
    cond = FakeLM()(["ab", "c"])
    images = wrapped.sample(cond, steps=3, seed=4, guidance=2.5)
    expected_ts = gen.schedule.ddim_timesteps(3)
    assert [int(t[0]) for t in seen] == expected_ts and all(len(set(t.tolist())) == 1 for t in seen)
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    # the same DDIM by hand: eps = u + g (c - u), with c and u from the connector at that step's t
    uncond = FakeLM().null(2)

    def predict(x, t):
        c = gen.predict_noise(x, t, tsc.condition(cond, t))
        u = gen.predict_noise(x, t, tsc.condition(uncond, t))
        return u + 2.5 * (c - u)

    manual = (gen.schedule.ddim_sample(predict, (2, 3, 32, 32), steps=3, seed=4) + 1) / 2
    assert torch.allclose(images, manual.clamp(0, 1), atol=1e-5)
    unguided = wrapped.sample(cond, steps=3, seed=4, guidance=1.0)
    assert not torch.allclose(unguided, images, atol=1e-3)


def test_only_the_connector_receives_gradients(minilm):
    gen = _tiny_generator()
    torch.manual_seed(0)
    tsc = ella.TimestepAwareConnector(ella.ConnectorConfig(**{**SMALL.to_dict(), "input_dim": 384}))
    wrapped = ella.ella_generator(gen, tsc, minilm)
    cond = wrapped.text(["a red circle and a blue square", "a green cross"])
    loss = wrapped.loss(torch.rand(2, 3, 32, 32), cond, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tsc.parameters())
    assert all(p.grad is None for p in gen.parameters())
    assert all(p.grad is None for p in minilm.model.parameters())
    assert not cond.tokens.requires_grad


@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_wrapper_loss_is_the_generators_own_loss_under_the_connectors_context(prediction):
    gen = _tiny_generator()
    gen.prediction = prediction
    torch.manual_seed(0)
    tsc = _perturb(ella.TimestepAwareConnector(SMALL))
    wrapped = ella.ConnectedGenerator(gen, tsc)
    cond = FakeLM()(["abc", "d"])
    images, t, noise = torch.rand(2, 3, 32, 32), torch.tensor([30, 870]), torch.randn(2, 3, 32, 32)
    got = wrapped.loss(images, cond, t=t, noise=noise, reduction="none")
    want = gen.loss(images, tsc.condition(cond, t), t=t, noise=noise, reduction="none")
    assert torch.allclose(got, want, atol=1e-6)


def test_wrapper_rejects_a_connector_of_the_wrong_width():
    with pytest.raises(ValueError, match="output_dim=16"):
        ella.ConnectedGenerator(_tiny_generator(), ella.PooledConnector(12, 32))


# --------------------------------------------------------------------------------------------- keywords
def test_every_keyword_reaches_the_core(monkeypatch):
    gen = _tiny_generator()
    wrapped = ella.ConnectedGenerator(gen, ella.PooledConnector(12, 16), text=FakeLM())
    seen = {}

    def fake_sample(cond, steps=25, seed=0, guidance=None, uncond=None):
        seen.setdefault("sample", []).append({"steps": steps, "seed": seed, "guidance": guidance, "n": len(cond)})
        return torch.zeros(len(cond), 3, 32, 32)

    monkeypatch.setattr(wrapped, "sample", fake_sample)
    wrapped.generate(["a", "b"], steps=7, seed=3, guidance=1.5)
    assert seen["sample"][-1] == {"steps": 7, "seed": 3, "guidance": 1.5, "n": 2}

    # judge_binding: count/n reach held_out_specs, steps/seed/guidance/batch_size reach sample
    specs_seen = {}
    real_specs = ella.held_out_specs

    def fake_specs(count, n):
        specs_seen.update(count=count, n=n)
        return real_specs(count, n)

    class Judge:
        def score(self, images, specs):
            return {"binding": 0.0, "colours": 0.0, "shapes": 0.0}

    monkeypatch.setattr(ella, "held_out_specs", fake_specs)
    seen["sample"].clear()
    ella.judge_binding(wrapped, FakeLM(), Judge(), count=2, n=5, steps=6, seed=11, guidance=2.0, batch_size=3)
    assert specs_seen == {"count": 2, "n": 5}
    assert seen["sample"] == [{"steps": 6, "seed": 11, "guidance": 2.0, "n": 3},
                              {"steps": 6, "seed": 14, "guidance": 2.0, "n": 2}]

    # held_out_loss: count/n reach held_out_specs, seed fixes t and noise, batch_size splits the calls
    class LossRecorder:
        timesteps = 1000

        def __init__(self):
            self.calls = []

        def loss(self, images, cond, t=None, noise=None, reduction="mean"):
            self.calls.append((len(images), t.clone(), noise.clone(), reduction))
            return torch.ones(len(images))

    rec = LossRecorder()
    specs_seen.clear()
    assert ella.held_out_loss(rec, FakeLM(), count=2, n=5, seed=4, batch_size=2) == 1.0
    assert specs_seen == {"count": 2, "n": 5} and [c[0] for c in rec.calls] == [2, 2, 1]
    again = LossRecorder()
    ella.held_out_loss(again, FakeLM(), count=2, n=5, seed=4, batch_size=5)
    assert torch.equal(torch.cat([c[1] for c in rec.calls]), again.calls[0][1])
    assert torch.equal(torch.cat([c[2] for c in rec.calls]), again.calls[0][2])
    other = LossRecorder()
    ella.held_out_loss(other, FakeLM(), count=2, n=5, seed=5, batch_size=5)
    assert not torch.equal(other.calls[0][2], again.calls[0][2]) and rec.calls[0][3] == "none"

    # sample: steps/seed reach DDIM, guidance and uncond reach the prediction
    monkeypatch.undo()
    calls = {}

    def fake_ddim(predict, shape, steps=25, seed=0, device=None):
        calls.update(steps=steps, seed=seed, shape=shape)
        x = torch.zeros(shape)
        calls["eps"] = predict(x, torch.full((shape[0],), 500))
        return x

    monkeypatch.setattr(wrapped.schedule, "ddim_sample", fake_ddim)
    cond, other = FakeLM()(["xy"]), FakeLM()(["zz"])
    wrapped.sample(cond, steps=9, seed=2, guidance=4.0, uncond=other)
    assert calls["steps"] == 9 and calls["seed"] == 2 and calls["shape"] == (1, 3, 32, 32)
    t = torch.full((1,), 500)
    c = wrapped.predict_noise(torch.zeros(1, 3, 32, 32), t, cond)
    u = wrapped.predict_noise(torch.zeros(1, 3, 32, 32), t, other)
    assert torch.allclose(calls["eps"], u + 4.0 * (c - u), atol=1e-5)

    # train_connector: every config field is used (steps, batch_size, n_images, lr, cond_dropout, seed)
    batches = []
    monkeypatch.setattr(wrapped, "loss", lambda images, cond, generator=None: (
        batches.append((images.shape[0], cond)), wrapped.connector(cond.tokens, cond.mask).sum())[1])
    scenes = GenerationScenes(seed=1, counts=(1,), weights=None)
    cfg = ella.ELLATrainConfig(steps=3, batch_size=5, n_images=7, lr=0.25, warmup=1, cond_dropout=1.0, seed=9)
    out = ella.train_connector(wrapped, scenes=scenes, config=cfg)
    assert len(out["losses"]) == 3 and [b for b, _ in batches] == [5, 5, 5] and out["config"]["lr"] == 0.25
    assert all(c.mask.sum(1).eq(1).all() for _, c in batches)  # cond_dropout=1: every prompt is ""


# --------------------------------------------------------------------------------------------- save / load
def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    for net in (_perturb(ella.TimestepAwareConnector(SMALL)), _perturb(ella.PooledConnector(12, 16))):
        d = ella.save_connector(net, tmp_path / net.kind, info={"steps": 3})
        back = ella.load_connector(d)
        x, m = _tokens(2, 4)
        t = torch.tensor([1, 800])
        assert type(back) is type(net) and back.info == {"steps": 3}
        assert torch.equal(back(x, m, t), net.eval()(x, m, t))
    with pytest.raises(FileNotFoundError, match="not a saved ELLA connector"):
        ella.load_connector(tmp_path)


# --------------------------------------------------------------------------------------------- training and effect
@pytest.fixture(scope="module")
def shipped(scene_generator, minilm):
    gen, judge, shapes_text = scene_generator
    try:
        tsc, pooled = ella.shipped_connector("tsc"), ella.shipped_connector("pooled")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return gen, judge, shapes_text, tsc, pooled, ella.LMConditioner(minilm)


def test_a_short_training_run_lowers_the_denoising_loss(scene_generator, minilm):
    gen = scene_generator[0]
    torch.manual_seed(0)
    wrapped = ella.ella_generator(gen, ella.TimestepAwareConnector(ella.TOY), minilm)
    scenes = GenerationScenes(seed=3)
    images, specs = scenes.batch(range(16))
    cond = wrapped.text([s.prompt for s in specs])
    g = torch.Generator().manual_seed(0)
    t, noise = torch.randint(100, 900, (16,), generator=g), torch.randn(16, 3, 32, 32, generator=g)

    def held_loss():
        with torch.no_grad():
            return wrapped.loss(images, cond, t=t, noise=noise).item()

    before = held_loss()
    ella.train_connector(wrapped, scenes=scenes, config=ella.ELLATrainConfig(
        steps=25, batch_size=16, n_images=64, lr=3e-3, warmup=5, seed=0))
    after = held_loss()
    assert after < 0.85 * before, (before, after)   # measured 0.0299 -> 0.0208
    assert all(p.grad is None for p in gen.parameters())


def test_tsc_binds_colours_to_objects_better_than_pooled_conditioning(shipped):
    """Measured in experiments/ella_train.py (docs/methods/ella.md, n=96: slot colours 0.45 vs 0.23, colours 0.85 vs
    0.66, held-out loss 0.0381 vs 0.0440); here fewer prompts of the same held-out set. The judge's full binding is at
    the floor for every arm (the shipped generator draws colours, not yet shapes), so it is not asserted."""
    gen, judge, _, tsc, pooled, text = shipped
    scores, losses = {}, {}
    for name, conn in (("tsc", tsc), ("pooled", pooled)):
        wrapped = ella.ConnectedGenerator(gen, conn, text=text)
        losses[name] = ella.held_out_loss(wrapped, text, count=3, n=128)
        scores[name] = ella.judge_binding(wrapped, text, judge, count=3, n=24, steps=15, seed=0)
    assert losses["tsc"] < losses["pooled"] - 0.003, losses
    assert scores["tsc"]["slot_colours"] >= scores["pooled"]["slot_colours"] + 0.1, scores
    assert scores["tsc"]["colours"] > scores["pooled"]["colours"], scores
    assert scores["tsc"]["clean_slot_colours"] == 1.0


def test_doc_example_runs(shipped):
    page = (REPO / "docs" / "methods" / "ella.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert blocks
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, "docs/methods/ella.md", "exec"), namespace)
    assert namespace["images"].shape == (2, 3, 32, 32)
