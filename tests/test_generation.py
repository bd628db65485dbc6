"""cliplab.generation: the conditioning protocol, the noise schedule, the denoiser's wiring, save/load, the judge,
and the shipped generator's effect (its samples follow the prompt, unlike the same sampler without the prompt)."""

from __future__ import annotations

import math

import pytest
import torch

from cliplab.generation import (Conditioning, ConditionalGenerator, DenoiserConfig, DiffusionGenerator,
                                GenerationScenes, GeneratorTrainConfig, NoiseSchedule, SceneJudge, TokenDenoiser,
                                image_grid, prompt_for, train_generator)
from cliplab.generation.quality import held_out_specs

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = DenoiserConfig(image_size=32, cond_dim=16, channels=(8, 16), attn_levels=(1,), heads=2, time_dim=16, groups=4)


def _cond(b=2, length=5, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(b, length, dim, generator=g), torch.ones(b, length, dtype=torch.bool))


def _perturbed(cfg=TINY, seed=0):
    torch.manual_seed(seed)
    net = TokenDenoiser(cfg)
    with torch.no_grad():  # leave the zero-initialised state so every path carries signal
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.03)
    return net.eval()


# ----------------------------------------------------------------------------------------------- conditioning
def test_conditioning_validates_and_pads():
    with pytest.raises(ValueError, match="at least one unmasked"):
        Conditioning(torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not match"):
        Conditioning(torch.zeros(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))
    a, b = _cond(1, 3, 4), _cond(2, 5, 4, seed=1)
    both = Conditioning.cat([a, b])
    assert both.tokens.shape == (3, 5, 4) and both.mask.sum(1).tolist() == [3, 5, 5]
    assert torch.equal(both.tokens[0, :3], a.tokens[0]) and both.tokens[0, 3:].abs().sum() == 0
    assert Conditioning.single(torch.ones(2, 4)).tokens.shape == (2, 1, 4)
    assert Conditioning.cat([a]).repeat(3).tokens.shape == (3, 3, 4)


# ----------------------------------------------------------------------------------------------- schedule
def test_schedule_closed_forms():
    s = NoiseSchedule(1000)
    ab = s.alpha_bar
    assert ab.shape == (1000,) and bool((ab[1:] < ab[:-1]).all()) and 0.99 < ab[0] <= 1 and ab[-1] < 1e-3
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    xt = s.add_noise(x0, t, eps)
    a = ab[t].view(-1, 1, 1, 1)
    assert torch.allclose(xt, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    keep = t < 999  # at t=999 sqrt(abar) ~ 6e-3 amplifies float32 rounding
    assert torch.allclose(s.predict_x0(xt, t, eps)[keep], x0[keep], atol=1e-4)
    assert s.ddim_timesteps(5) == [999, 749, 500, 250, 0]


def test_ddim_with_the_true_noise_returns_the_clean_image():
    """An oracle that predicts the exact noise of a fixed x0 makes deterministic DDIM land on x0."""
    s = NoiseSchedule(1000)
    x0 = torch.rand(2, 3, 8, 8) * 1.6 - 0.8

    def oracle(x, t):
        a = s.alpha_bar[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    out = s.ddim_sample(oracle, x0.shape, steps=10, seed=3)
    assert torch.allclose(out, x0, atol=1e-4)


def test_velocity_round_trips_to_the_noise():
    s = NoiseSchedule(1000)
    x0, eps, t = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4), torch.tensor([0, 400, 999])
    xt = s.add_noise(x0, t, eps)
    v = s.velocity(x0, t, eps)
    assert torch.allclose(s.noise_from_velocity(xt, t, v), eps, atol=1e-5)
    # a v-predicting generator's predict_noise is that conversion of its denoiser's output
    gen = _tiny_generator()
    c = _cond(3)
    x = torch.randn(3, 3, 32, 32)
    tt = torch.tensor([5, 500, 990])
    gen.schedule = NoiseSchedule(1000)
    assert torch.allclose(gen.predict_noise(x, tt, c), s.noise_from_velocity(x, tt, gen.denoiser(x, tt, c)))
    assert DiffusionGenerator(gen.denoiser, prediction="eps").predict_noise(x, tt, c).equal(gen.denoiser(x, tt, c))
    with pytest.raises(ValueError, match="prediction"):
        DiffusionGenerator(gen.denoiser, prediction="x0")


def test_generator_loss_targets_its_prediction():
    gen = _tiny_generator()
    x0, noise, t = torch.rand(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.tensor([10, 80])
    c = _cond()
    v = gen.schedule.velocity(x0 * 2 - 1, t, noise)
    out = gen.denoiser(gen.schedule.add_noise(x0 * 2 - 1, t, noise), t, c)
    assert torch.allclose(gen.loss(x0, c, t=t, noise=noise), (out - v).pow(2).mean())
    gen.prediction = "eps"
    assert torch.allclose(gen.loss(x0, c, t=t, noise=noise), (out - noise).pow(2).mean())


def test_schedule_loss_is_the_noise_error():
    s = NoiseSchedule(100)
    x0, noise, t = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4), torch.tensor([1, 50, 99])
    assert s.loss(lambda x, tt: noise, x0, t=t, noise=noise).item() == 0.0
    per = s.loss(lambda x, tt: torch.zeros_like(x), x0, t=t, noise=noise, reduction="none")
    assert torch.allclose(per, noise.pow(2).flatten(1).mean(1))


# ----------------------------------------------------------------------------------------------- denoiser
def test_denoiser_ignores_conditioning_at_initialisation():
    """Cross-attention outputs start at zero: a fresh denoiser's output does not depend on the prompt."""
    torch.manual_seed(0)
    net = TokenDenoiser(TINY).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 700])
    assert torch.equal(net(x, t, _cond(seed=0)), net(x, t, _cond(seed=1)))


def test_denoiser_reads_only_unmasked_tokens():
    net = _perturbed()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 700])
    c = _cond()
    base = net(x, t, c)
    assert not torch.allclose(base, net(x, t, _cond(seed=1)), atol=1e-4)  # conditioning matters once trained
    padded = Conditioning.cat([c, Conditioning(torch.randn(1, 9, 16), torch.ones(1, 9, dtype=torch.bool))]).select(
        slice(0, 2))
    garbage = padded.tokens.clone()
    garbage[:, 5:] = 1e3  # masked padding: any value
    assert torch.allclose(net(x, t, Conditioning(garbage, padded.mask)), base, atol=1e-5)
    with pytest.raises(ValueError, match="cond_dim"):
        net(x, t, _cond(dim=8))
    with pytest.raises(ValueError, match="conditioning rows"):
        net(x, t, _cond(b=3))


def test_denoiser_depends_on_the_timestep():
    net = _perturbed()
    x, c = torch.randn(1, 3, 32, 32), _cond(1)
    assert not torch.allclose(net(x, torch.tensor([10]), c), net(x, torch.tensor([900]), c), atol=1e-4)


# ----------------------------------------------------------------------------------------------- generator
def _tiny_generator():
    null = Conditioning(torch.zeros(1, 2, 16), torch.ones(1, 2, dtype=torch.bool))
    return DiffusionGenerator(_perturbed(), null=null, timesteps=100, guidance=2.5, info={"note": "tiny"})


def test_generator_meets_the_protocol_and_round_trips(tmp_path):
    gen = _tiny_generator()
    assert isinstance(gen, ConditionalGenerator)
    c = _cond()
    out = gen.sample(c, steps=4, seed=1)
    assert out.shape == (2, 3, 32, 32) and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out, gen.sample(c, steps=4, seed=1))
    assert not torch.equal(out, gen.sample(c, steps=4, seed=2))
    loaded = DiffusionGenerator.load(gen.save(tmp_path / "g"))
    assert loaded.guidance == 2.5 and loaded.timesteps == 100 and loaded.info == {"note": "tiny"}
    assert torch.equal(loaded.sample(c, steps=4, seed=1), out)
    with pytest.raises(FileNotFoundError, match="not a saved generator"):
        DiffusionGenerator.load(tmp_path)


def test_guidance_keywords_reach_the_sampler(monkeypatch):
    """The sampler's noise prediction is exactly ``u + s (c - u)`` with ``u`` from ``uncond`` (default: the stored
    empty prompt) and ``s`` from ``guidance`` (default: the generator's); ``guidance=1`` never reads ``u``."""
    gen = _tiny_generator()
    c = _cond()
    seen = {}

    def capture(predict, shape, steps, seed, device=None):
        seen.update(predict=predict, steps=steps, seed=seed)
        return torch.zeros(shape)

    monkeypatch.setattr(gen.schedule, "ddim_sample", capture)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([50, 50])
    eps_c = gen.predict_noise(x, t, c)
    other = Conditioning(torch.randn(1, 2, 16), torch.ones(1, 2, dtype=torch.bool))
    for kwargs, scale, u in (({}, 2.5, gen.null), ({"guidance": 4.0}, 4.0, gen.null),
                             ({"guidance": 2.0, "uncond": other}, 2.0, other)):
        gen.sample(c, steps=7, seed=11, **kwargs)
        eps_u = gen.predict_noise(x, t, u.repeat(2))
        assert torch.allclose(seen["predict"](x, t), eps_u + scale * (eps_c - eps_u), atol=1e-5)
        assert seen["steps"] == 7 and seen["seed"] == 11
    gen.null = None
    gen.sample(c, steps=3, guidance=1.0)
    assert torch.equal(seen["predict"](x, t), eps_c)
    with pytest.raises(ValueError, match="unconditional"):
        gen.sample(c, steps=3)


def test_loss_reaches_the_conditioning():
    gen = _tiny_generator()
    tokens = torch.randn(2, 4, 16, requires_grad=True)
    loss = gen.loss(torch.rand(2, 3, 32, 32), Conditioning(tokens, torch.ones(2, 4, dtype=torch.bool)),
                    generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0


def test_training_lowers_the_denoising_loss():
    """A few dozen steps on the world beat the untrained network on held-out images (same noise, same t)."""
    class Fixed:  # a conditioner stand-in: one learned-free embedding per word, no text tower needed
        dim = 16

        def __call__(self, texts):
            texts = [texts] if isinstance(texts, str) else texts
            rows = [[hash_word(w) for w in t.split()] or [hash_word("<empty>")] for t in texts]
            n = max(len(r) for r in rows)
            tok = torch.zeros(len(rows), n, 16)
            mask = torch.zeros(len(rows), n, dtype=torch.bool)
            for i, r in enumerate(rows):
                tok[i, :len(r)] = torch.stack(r)
                mask[i, :len(r)] = True
            return Conditioning(tok, mask)

        def null(self, n=1):
            return self([""] * n)

    def hash_word(w):
        return torch.tensor([math.sin((sum(map(ord, w)) + 1) * (k + 1)) for k in range(16)])

    cfg = GeneratorTrainConfig(steps=40, batch_size=8, n_images=64, warmup=5, lr=2e-3, denoiser=TINY)
    scenes = GenerationScenes(seed=0)
    gen = train_generator(Fixed(), scenes, cfg, progress=False)
    images, specs = scenes.batch(range(100, 116))
    c = Fixed()([s.prompt for s in specs])
    g = torch.Generator()
    fresh = DiffusionGenerator(TokenDenoiser(DenoiserConfig(**{**TINY.to_dict(), "cond_dim": 16})))
    with torch.no_grad():
        trained = gen.loss(images, c, generator=g.manual_seed(1)).item()
        untrained = fresh.loss(images, c, generator=g.manual_seed(1)).item()
    assert trained < 0.7 * untrained


# ----------------------------------------------------------------------------------------------- world and judge
def test_scenes_are_seeded_with_distinct_objects():
    scenes = GenerationScenes(seed=3)
    x, spec = scenes[5]
    y, same = GenerationScenes(seed=3)[5]
    assert torch.equal(x, y) and spec == same and x.shape == (3, 32, 32)
    for i in range(30):
        pairs = scenes[i][1].pairs
        assert len({c for c, _ in pairs}) == len(pairs) == len({s for _, s in pairs})
    assert prompt_for([("orange", "cross"), ("red", "circle")]) == "an orange cross and a red circle"


def test_judge_scores_binding_exactly():
    class Oracle(SceneJudge):  # a parser that reports given {colour: shape} maps
        def __init__(self, seen):
            super().__init__()
            self.seen = seen

        def parse(self, images):
            return self.seen

    truth = [[("red", "circle"), ("blue", "square")]] * 4
    judge = Oracle([{"red": "circle", "blue": "square"}, {"blue": "circle", "red": "square"},
                    {"red": "circle", "green": "square"}, {"red": "circle", "blue": "square", "cyan": "cross"}])
    rows = judge.score(torch.zeros(4, 3, 32, 32), truth, per_image=True)
    assert rows["binding"] == [1.0, 0.0, 0.0, 1.0]     # swapped colours: colours and shapes right, binding wrong
    assert rows["colours"] == [1.0, 1.0, 0.5, 1.0] and rows["shapes"] == [1.0, 1.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="images for"):
        judge.score(torch.zeros(2, 3, 32, 32), truth)


def test_judge_parses_colours_exactly_and_crops_are_scale_free():
    judge = SceneJudge()
    img = torch.full((1, 3, 32, 32), 120 / 255)
    img[0, :, 4:10, 4:10] = torch.tensor([210, 25, 25]).view(3, 1, 1) / 255     # red block
    img[0, :, 20:22, 20:22] = torch.tensor([30, 70, 230]).view(3, 1, 1) / 255   # blue, 4 px (= min_area)
    img[0, :, 28, 28] = torch.tensor([30, 170, 50]) / 255                       # green, 1 px: too small
    cmap = judge.colour_map(img)[0]
    assert (cmap == judge.colours.index("red")).sum() == 36 and (cmap == len(judge.colours)).sum() == 1024 - 41
    assert judge.region(cmap, "blue").sum() == 4 and judge.region(cmap, "green") is None
    assert set(judge.parse(img)[0]) == {"red", "blue"}
    small, large = torch.zeros(32, 32), torch.zeros(32, 32)
    small[4:8, 4:8], large[10:26, 6:22] = 1, 1
    assert torch.allclose(judge.crop_region(small.numpy() > 0), judge.crop_region(large.numpy() > 0))


def test_shipped_judge_reads_clean_renders():
    """The shipped judge on held-out clean renders: the ceiling every generator score is read against."""
    from cliplab.generation import load_judge

    judge = load_judge("scenes-32")
    for count in (1, 2):
        specs, images = held_out_specs(count, 40)
        scores = judge.score(images, specs)
        assert scores["colours"] == 1.0 and scores["binding"] >= 0.85
        swapped = [tuple((a[0], b[1]) for a, b in zip(s.pairs, s.pairs[1:] + s.pairs[:1])) for s in specs]
        if count == 2:
            assert judge.score(images, swapped)["binding"] <= 0.1


def test_grid_layout():
    img = image_grid(torch.rand(5, 3, 8, 8), columns=3, scale=2, pad=1)
    assert img.size == (3 * 17 + 1, 2 * 17 + 1)


# ----------------------------------------------------------------------------------------------- the shipped model
def test_text_conditioner_reads_the_final_states(scene_generator):
    _, _, cond = scene_generator
    model = cond.model
    c = cond(["a red circle", "a red circle and an orange square"])
    out = model.encode_text(model.tokenize(["a red circle and an orange square"]), output="final")
    assert torch.allclose(c.tokens[1], out.final[0], atol=1e-5)
    assert c.mask.sum(1).tolist() == model.tokenize(["a red circle", "a red circle and an orange square"]
                                                    ).lengths.tolist()
    # a short prompt's states do not depend on its batch-mates (causal text tower, padding masked)
    alone = cond(["a red circle"])
    assert torch.allclose(c.tokens[0, :5], alone.tokens[0], atol=1e-5)
    assert cond.null().mask.sum().item() == 2  # SOT + EOT


def test_shipped_generator_follows_its_prompts(scene_generator):
    """Effect: samples of held-out one- and two-object prompts show the prompt's pairs far more often than the same
    sampler (same seeds, same noise) given the empty prompt, and far above chance (1/32 for one object)."""
    gen, judge, cond = scene_generator
    specs = held_out_specs(1, 16)[0] + held_out_specs(2, 16)[0]
    prompts = [s.prompt for s in specs]
    with torch.no_grad():
        shown = gen.sample(cond(prompts), steps=20, seed=0)
        blind = gen.sample(cond([""] * len(prompts)), steps=20, seed=0)
    with_prompt = judge.score(shown, specs)
    without = judge.score(blind, specs)
    assert with_prompt["colours"] > 0.85 and with_prompt["colours"] > without["colours"] + 0.5
    assert with_prompt["shapes"] > without["shapes"] + 0.1


def test_generation_page_example_runs(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "generation.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/generation.md", "exec"), {})
    assert (tmp_path / "samples.png").is_file()


def test_cli_sample_with_a_learned_direction(tmp_path):
    """`cliplab generate sample --direction --subject --alpha`: a row per alpha with the same noise, judged; at
    alpha 0 the rows equal plain sampling, and the direction needs its subject."""
    import json

    from click.testing import CliRunner

    from cliplab.cli import main

    run = CliRunner().invoke
    args = ["generate", "sample", "a blue circle and a green square", "--per-prompt", "2", "--steps", "6", "--json"]
    r = run(main, args + ["-o", str(tmp_path / "edit.png"), "--direction", "red-blue", "--subject", "circle",
                          "--alpha", "0", "--alpha", "3"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["alphas"] == [0.0, 3.0] and len(d["judged"]) == 2
    plain = json.loads(run(main, args + ["-o", str(tmp_path / "plain.png")]).output)
    assert d["judged"]["a blue circle and a green square @ alpha 0"] == plain["judged"]["a blue circle and a green square"]
    r = run(main, args + ["-o", str(tmp_path / "x.png"), "--direction", "red-blue"])
    assert r.exit_code != 0 and "--subject" in r.output


def test_judge_generator_keywords_reach_the_sampler():
    from cliplab.generation import judge_generator

    seen = []

    class Spy:
        def sample(self, cond, steps=25, seed=0, **kw):
            seen.append((len(cond), steps, seed, kw.get("guidance")))
            return torch.zeros(len(cond), 3, 32, 32)

    class Judge:
        def score(self, images, specs):
            return {"binding": 0.0, "colours": 0.0, "shapes": 0.0}

    def conditioner(texts):
        return _cond(len(texts), 2, 16)

    out = judge_generator(Spy(), conditioner, Judge(), per_count=5, counts=(1, 2), steps=3, seed=7, guidance=2.0,
                          batch_size=2)
    assert set(out) == {"1", "2"}
    assert seen[:3] == [(2, 3, 7, 2.0), (2, 3, 9, 2.0), (1, 3, 11, 2.0)]  # batches of 2, seed advances by offset
    judge_generator(Spy(), conditioner, Judge(), per_count=1, counts=(1,))
    assert seen[-1] == (1, 25, 0, None)  # no guidance keyword: the generator's own


def test_conditioner_for_a_generator_reads_what_it_was_trained_on(scene_generator):
    from cliplab.generation import TextConditioner

    gen, _, cond = scene_generator
    assert (cond.space, cond.model.config.name) == (gen.info["space"], gen.info["text_model"])
    other = TextConditioner.for_generator(type("G", (), {"info": {"text_model": "shapes-tiny",
                                                                  "space": "penultimate"}})())
    assert other.space == "penultimate" and other.dim == other.model.config.text.width
