"""The contrastive trainer: it learns, resumes bit-exactly, freezes, checkpoints safely; losses match their formulas;
the synthetic data path equals the model's preprocessing."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cliplab
from cliplab.data import SceneWorld, write_image_folder
from cliplab.models import ConfigError
from cliplab.models.tokenizer import TruncationWarning
from cliplab.train import (BatchOutput, DataConfig, TrainConfig, Trainer, WarmupCosine, get_loss, get_preset,
                           get_sampler, get_source, list_losses, list_presets, list_samplers, param_groups,
                           register_loss, synthetic_tags)
from cliplab.train.data import TrainBatches
from cliplab.train.losses import LOSSES, Loss


def micro_model() -> dict:
    """A very small CLIP on 64 px scenes (16 px patches, width 32): a few ms of compute per step."""
    cfg = cliplab.get_config("test-tiny").to_dict()
    cfg.update(name="micro", embed_dim=32)
    cfg["vision"].update(image_size=64, patch_size=16, width=32, mlp_dim=128)
    cfg["text"].update(width=32, mlp_dim=128)
    cfg["preprocess"]["image_size"] = 64
    return cfg


def micro_config(tmp_path, **changes) -> TrainConfig:
    base = dict(model=micro_model(), batch_size=32, steps=6, lr=2e-3, warmup_steps=20, weight_decay=0.1,
                log_every=1, checkpoint_every=0, keep_checkpoints=0, threads=1, progress=False,
                out_dir=str(tmp_path / "run"), seed=0)
    base.update(changes)
    return TrainConfig(**base)


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- learning --------------------------------------------------------------------------------------------------------
def test_loss_goes_down_on_a_tiny_run(tmp_path):
    cfg = micro_config(tmp_path, steps=150, log_every=25)
    result = Trainer(cfg).fit()
    losses = result.losses
    assert len(losses) == 150 and result.steps == list(range(1, 151))
    first, last = np.mean(losses[:10]), np.mean(losses[-25:])
    assert first > 0.95 * math.log(32)  # chance level at the start
    assert last < 0.8 * first and last < math.log(32) - 0.5, (first, last)
    # the metrics log: one record per log interval with the required fields and the loss's own values
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [25, 50, 75, 100, 125, 150]
    for key in ("loss", "lr", "temperature", "samples_per_s", "loss_i2t", "acc_t2i", "grad_norm", "truncated"):
        assert key in records[-1]
    assert records[-1]["loss"] == pytest.approx(last)
    assert result.final_dir is not None
    reloaded = cliplab.load(result.final_dir)
    assert state_equal(reloaded.state_dict(), result.model.state_dict())


# --- resume ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path, loss):
    n = 6
    data = DataConfig(caption="mix", long_prob=0.5)
    cfg = micro_config(tmp_path, steps=n, checkpoint_every=n // 2, loss=loss, data=data, out_dir=str(tmp_path / "a"))
    full = Trainer(cfg).fit()
    assert len(full.losses) == n

    # resume from an explicit checkpoint directory into another out dir
    half = tmp_path / "a" / "checkpoints" / f"step-{n // 2:07d}"
    resumed = Trainer(cfg.replace(out_dir=str(tmp_path / "b"))).fit(resume=half)
    assert resumed.start_step == n // 2 and resumed.steps == list(range(n // 2 + 1, n + 1))
    assert resumed.losses == full.losses[n // 2:]  # exact float equality
    assert state_equal(resumed.model.state_dict(), full.model.state_dict())

    # resume=True picks the newest checkpoint of the out dir
    (tmp_path / "c" / "checkpoints").mkdir(parents=True)
    shutil.copytree(half, tmp_path / "c" / "checkpoints" / half.name)
    again = Trainer(cfg.replace(out_dir=str(tmp_path / "c"))).fit(resume=True)
    assert again.losses == full.losses[n // 2:]
    if loss == "siglip":  # the loss module's own parameter was trained and restored
        t = Trainer(cfg.replace(out_dir=str(tmp_path / "d")))
        t.load_checkpoint(tmp_path / "a" / "checkpoints" / f"step-{n:07d}")
        assert t.loss_fn.bias.item() != -10.0


def test_checkpoint_files_load_with_weights_only(tmp_path):
    cfg = micro_config(tmp_path, steps=2, loss="siglip", freeze=["visual.ln_pre.*"])
    trainer = Trainer(cfg)
    trainer.fit()
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000002"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["step"] == 2 and state["data"] == {"step": 2, "samples": 64}
    assert set(state) >= {"optimizer", "scheduler", "loss", "sampler", "rng", "config"}
    assert torch.equal(state["loss"]["state"]["bias"], trainer.loss_fn.bias.detach())
    assert TrainConfig.from_dict(state["config"]) == cfg
    model = cliplab.load(ckpt / "model")
    assert state_equal(model.state_dict(), trainer.model.state_dict())
    assert state_equal(cliplab.load(tmp_path / "run" / "final").state_dict(), trainer.model.state_dict())


# --- freezing and parameter groups -----------------------------------------------------------------------------------
def test_frozen_parameters_stay_bit_identical(tmp_path):
    cfg = micro_config(tmp_path, steps=3, freeze=["text.*"])
    trainer = Trainer(cfg)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.fit()
    after = dict(trainer.model.named_parameters())
    text = [k for k in before if k.startswith("text.")]
    rest = [k for k in before if not k.startswith("text.")]
    assert text and rest
    assert all(torch.equal(before[k], after[k]) for k in text)
    changed = [k for k in rest if not torch.equal(before[k], after[k])]
    assert changed == rest
    with pytest.raises(ValueError, match="match no parameter"):
        Trainer(micro_config(tmp_path, freeze=["txt.*"]))


def test_weight_decay_groups():
    model = cliplab.create_model(TrainConfig(model=micro_model()).model_config(), seed=0)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: {names[id(p)] for p in g["params"]} for g in param_groups(model, 0.1)}
    no_decay, decay = groups["no_decay"], groups["decay"]
    assert {"logit_scale", "text.token_embed.weight", "text.pos_embed", "visual.pos_embed",
            "visual.class_embedding", "visual.ln_pre.weight", "text.transformer.blocks.0.attn.qkv.bias"} <= no_decay
    assert {"visual.patch_embed.weight", "visual.proj.weight", "text.transformer.blocks.1.mlp.fc1.weight"} <= decay
    assert not decay & no_decay and len(decay | no_decay) == len(names)


def test_warmup_cosine_schedule():
    s = WarmupCosine(1.0, total=110, warmup=10, min_lr=0.1)
    assert [s(i) for i in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert s(9) == pytest.approx(1.0) and s(10) == pytest.approx(1.0)
    assert s(109) == pytest.approx(0.1) and s(60) == pytest.approx(0.55, abs=0.01)
    assert all(s(i) >= s(i + 1) for i in range(10, 109))


# --- losses ----------------------------------------------------------------------------------------------------------
def _features(n=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_clip_loss_equals_brute_force_cross_entropy(smoothing):
    img, txt = _features()
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    loss, logs = get_loss("clip", label_smoothing=smoothing)(BatchOutput(img, txt, scale))
    sim = [[float(img[i] @ txt[j]) * math.exp(float(scale)) for j in range(5)] for i in range(5)]

    def ce(rows):  # -sum_j q_j log softmax(row)_j with q = (1 - eps) onehot + eps / n
        total = 0.0
        for i, row in enumerate(rows):
            lse = math.log(sum(math.exp(v) for v in row))
            for j, v in enumerate(row):
                q = (1 - smoothing) * (i == j) + smoothing / len(row)
                total -= q * (v - lse)
        return total / len(rows)

    i2t = ce(sim)
    t2i = ce([list(col) for col in zip(*sim)])
    assert loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-12)
    assert logs["loss_i2t"] == pytest.approx(i2t, rel=1e-12) and logs["loss_t2i"] == pytest.approx(t2i, rel=1e-12)


def test_siglip_loss_equals_its_formula():
    img, txt = _features(n=3, d=4, seed=1)
    log_scale = torch.tensor(math.log(10.0), dtype=torch.float64)
    fn = get_loss("siglip", init_bias=-2.0).double()
    loss, logs = fn(BatchOutput(img, txt, log_scale))
    want = 0.0
    for i in range(3):
        for j in range(3):
            z = 10.0 * float(img[i] @ txt[j]) - 2.0
            y = 1.0 if i == j else -1.0
            want -= math.log(1 / (1 + math.exp(-y * z)))
    assert loss.item() == pytest.approx(want / 3, rel=1e-12)
    assert logs["bias"] == -2.0
    assert [n for n, _ in fn.named_parameters()] == ["bias"]


def test_loss_registry():
    assert {"clip", "siglip"} <= set(list_losses())
    with pytest.raises(KeyError) as err:
        get_loss("infonce")
    assert "clip" in str(err.value) and "siglip" in str(err.value)

    @register_loss("test-constant")
    class Constant(Loss):
        def forward(self, out):
            return out.image_features.sum() * 0 + 1.0, {"c": 1.0}

    try:
        assert "test-constant" in list_losses()
        loss, logs = get_loss("test-constant")(BatchOutput(*_features(), torch.tensor(0.0)))
        assert loss.item() == 1.0 and logs == {"c": 1.0}
    finally:
        LOSSES._items.pop("test-constant")


# --- data ------------------------------------------------------------------------------------------------------------
def test_synthetic_pixels_equal_model_preprocess():
    model = cliplab.create_model(TrainConfig(model=micro_model()).model_config(), seed=0)
    src = get_source("synthetic", model.preprocessor, seed=3, offset=100)
    assert src.fast
    world = SceneWorld(image_size=64, seed=3)
    idx = [0, 5, 17, 2]
    want = torch.stack([model.preprocess(world.render(world.sample(100 + i))) for i in idx])
    assert torch.equal(src.pixels(idx), want)
    slow = get_source("synthetic", model.preprocessor, seed=3, offset=100, fast=False)
    assert not slow.fast and torch.equal(slow.pixels(idx), want)
    short, long = src.captions(idx)
    assert short == [world.sample(100 + i).short_caption for i in idx]
    assert long == [world.sample(100 + i).long_caption for i in idx]


def test_shape_variant_stream_keeps_groups_in_one_batch(tmp_path):
    model = cliplab.create_model(TrainConfig(model=micro_model()).model_config(), seed=0)
    src = get_source("synthetic", model.preprocessor, seed=3, shape_variants=4)
    world = SceneWorld(image_size=64, seed=3)
    batch = get_sampler("sequential", None, 16, seed=0).batch(5)
    scenes = [src.scene(i) for i in batch]
    for g in range(4):
        group = scenes[4 * g: 4 * g + 4]
        assert group[0] == world.sample(batch[4 * g] // 4)  # the group's first member is the stream's scene
        layout = {(s.brightness, s.background, s.clutter, s.word, s.word_pos,
                   tuple((o.colour, o.size, o.texture, o.x, o.y) for o in s.objects)) for s in group}
        assert len(layout) == 1  # ... and the others differ from it in shapes alone
        assert len({s.short_caption for s in group}) == 4
    fresh = get_source("synthetic", model.preprocessor, seed=3, shape_variants=4)
    assert [fresh.scene(i) for i in reversed(batch)] == scenes[::-1]  # any item builds on its own
    with pytest.raises(ValueError, match="shape_variants"):
        get_source("synthetic", model.preprocessor, shape_variants=0)
    base = TrainConfig(model=micro_model(), data={"options": {"shape_variants": 4}}, sampler="sequential",
                       batch_size=16, steps=2, progress=False)
    for change, message in [({"sampler": "random"}, "use sampler 'sequential'"), ({"batch_size": 18}, "multiple of 4"),
                            ({"data": {"options": {"shape_variants": 4, "num_scenes": 30}}}, "size 30")]:
        with pytest.raises(ConfigError, match=message):
            Trainer(base.replace(out_dir=str(tmp_path / "x"), **change))


def test_caption_choice_and_truncation_counting():
    model = cliplab.create_model(TrainConfig(model=micro_model()).model_config(), seed=0)
    src = get_source("synthetic", model.preprocessor, num_scenes=1000)
    sampler = get_sampler("random", src.size, 64, seed=0)
    batches = TrainBatches(src, sampler, model.tokenizer, steps=10, caption="mix", long_prob=0.5, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TruncationWarning)
        b = batches[3]
    assert 0 < int(b.is_long.sum()) < 64
    assert b.n_truncated > 0 and not b.truncated[~b.is_long].any()
    short, long = src.captions(b.indices)
    assert b.texts == [lc if u else sc for u, sc, lc in zip(b.is_long.tolist(), short, long)]
    again = batches[3]
    assert again.indices == b.indices and torch.equal(again.ids, b.ids) and torch.equal(again.pixels, b.pixels)
    only_short = TrainBatches(src, sampler, model.tokenizer, steps=10, caption="short")[3]
    assert not only_short.is_long.any() and only_short.indices == b.indices


def test_folder_source_reads_captions_csv(tmp_path):
    world = SceneWorld(image_size=64, seed=1)
    write_image_folder(world, tmp_path / "imgs", 5)
    model = cliplab.create_model(TrainConfig(model=micro_model()).model_config(), seed=0)
    src = get_source("folder", model.preprocessor, path=str(tmp_path / "imgs"))
    assert src.size == 5
    assert torch.equal(src.pixels([4, 1]), torch.stack([model.preprocess(world.sample(i).render()) for i in (4, 1)]))
    assert src.captions([2]) == ([world.sample(2).short_caption], [world.sample(2).long_caption])


def test_samplers():
    assert {"random", "sequential"} <= set(list_samplers())
    r = get_sampler("random", 10, 4, seed=1)
    seen = r.batch(0) + r.batch(1) + r.batch(2)[:2]  # first epoch: positions 0..9
    assert sorted(seen) == list(range(10)) and seen != list(range(10))
    assert get_sampler("random", 10, 4, seed=1).batch(1) == r.batch(1)
    assert get_sampler("sequential", 10, 4).batch(2) == [8, 9, 0, 1]
    inf = get_sampler("random", None, 8, seed=0, block=16)
    assert sorted(inf.batch(0) + inf.batch(1)) == list(range(16)) and min(inf.batch(2)) >= 16
    with pytest.raises(KeyError, match="sequential"):
        get_sampler("shuffle", 10, 4)


# --- config, presets, CLI --------------------------------------------------------------------------------------------
def test_config_json_round_trip_and_overrides(tmp_path):
    cfg = get_preset("shapes-tiny")
    cfg.save(tmp_path / "c.json")
    assert TrainConfig.load(tmp_path / "c.json") == cfg
    cfg2 = cfg.with_overrides(["lr=3e-4", "data.caption=long", 'freeze=["text.*"]', "loss_kwargs.label_smoothing=0.1",
                               "model.text.layers=2"])
    assert cfg2.lr == 3e-4 and cfg2.data.caption == "long" and cfg2.freeze == ["text.*"]
    assert cfg2.loss_kwargs == {**cfg.loss_kwargs, "label_smoothing": 0.1} and cfg2.model_config().text.layers == 2
    with pytest.raises(ValueError, match="unknown"):
        cfg.with_overrides(["learning_rate=1"])
    assert {"tiny-smoke", "shapes-tiny"} <= set(list_presets())
    shapes = cliplab.get_config("shapes-tiny")
    assert (shapes.vision.width, shapes.vision.layers, shapes.vision.heads, shapes.text.vocab_size) == (192, 6, 3, 49408)
    assert shapes.vision.stem_channels == (32, 64, 128) and shapes.vision.stem_max_skip
    assert cfg.precision == "bf16" and cfg.data.caption == "mix" and cfg.loss == "clip+stc"
    assert cfg.loss_kwargs["tags"] == synthetic_tags() and cfg.loss_kwargs["tags_from"] == "source"


def test_cli_train_preset_and_config(tmp_path):
    from cliplab.cli import main

    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["train", "--preset", "tiny-smoke", "--out", str(out), "--steps", "2", "--set", "progress=false",
            "--set", "threads=1", "--set", "batch_size=8"]
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    assert (out / "final" / "cliplab.json").exists() and (out / "checkpoints" / "step-0000002" / "state.pt").exists()
    r = runner.invoke(main, ["train", "--config", str(out / "config.json"), "--steps", "3", "--resume"])
    assert r.exit_code == 0, r.output
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [2, 3]
    r = runner.invoke(main, ["train", "--preset", "nope"])
    assert r.exit_code == 2 and "tiny-smoke" in r.output


def test_text_length_buckets_give_the_same_features(tmp_path):
    trainer = Trainer(micro_config(tmp_path, data=DataConfig(caption="mix")))
    batch = trainer.batches[0]
    assert 0 < int(batch.is_long.sum()) < len(batch)
    calls = []
    encode = trainer.model.encode_text
    trainer.model.encode_text = lambda ids: calls.append(ids.shape[0]) or encode(ids)
    with torch.no_grad():
        got = trainer._encode_text(batch.ids)
    del trainer.model.encode_text
    assert len(calls) == 2 and sum(calls) == len(batch)  # split into a short and a long bucket
    with torch.no_grad():
        want = trainer.model.encode_text(batch.ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fresh_run_refuses_an_out_dir_with_checkpoints(tmp_path):
    cfg = micro_config(tmp_path, steps=1)
    Trainer(cfg).fit()
    with pytest.raises(ValueError, match="resume"):
        Trainer(cfg).fit()
    assert Trainer(cfg.replace(steps=2)).fit(resume=True).steps == [2]


def test_loader_workers_build_the_same_batches(tmp_path):
    losses = [Trainer(micro_config(tmp_path / str(w), steps=3, data=DataConfig(caption="mix", num_workers=w)))
              .fit().losses for w in (0, 1)]
    assert losses[0] == losses[1]


def test_registry_discovery_surfaces_errors_and_retries():
    """A plug-in package that fails to import raises on every lookup until it imports, instead of leaving a silent
    "unknown name"; once it succeeds, discovery never runs again."""
    from cliplab.train.registry import Registry

    calls = []

    def discover():
        calls.append(1)
        if len(calls) == 1:
            raise ImportError("broken plug-in")
        registry.register("found")(object)

    registry = Registry("thing", discover=discover)
    with pytest.raises(ImportError, match="broken plug-in"):
        registry.get("found")
    assert registry.get("found") is object and registry.names() == ["found"] and len(calls) == 2
    assert "other" not in registry and len(calls) == 2
