"""CoOp and the shared prompt-learning parts: the hand-prompt identity at init (bit-for-bit), the token layouts, only
the context training, the learned-prompts file, keywords reaching the core, the effect against zero-shot, the CLI path
(train -> classify / eval zeroshot) and the docs example."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import cliplab
from cliplab.zeroshot import LearnedPrompts, ZeroShotClassifier
from cliplab.zeroshot import coop
from cliplab.zeroshot import prompt_learning as pl

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["red circle", "blue square", "green star", "yellow hexagon", "very long purple diamond with many words"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


@pytest.fixture(scope="module")
def model():
    return cliplab.load("shapes-tiny").eval()


@pytest.fixture(scope="module")
def task_features(model):
    """8 classes named with colour words the model never saw (4 colours x 2 shapes), 8 shots, 4 test images each."""
    task = pl.synthetic_prompt_task(shots=8, n_test=4, names="unseen-colours", colours=["red", "green", "blue", "pink"],
                                    shapes=["circle", "square"], seed=0)
    return (task, pl.image_features(model, task.train_images), torch.tensor(task.train_labels),
            pl.image_features(model, task.test_images), torch.tensor(task.test_labels))


def test_init_from_a_phrase_is_the_hand_prompt_bit_for_bit(model, task_features):
    names = NAMES + [f"name {i}" for i in range(60)]  # more than one row slice of the plain text path
    prompts = coop.coop_prompts(model, names, ctx_init="a photo of a")
    assert prompts.experts[0].n_ctx == 4
    learned = ZeroShotClassifier.from_learned_prompts(model, prompts)
    hand = ZeroShotClassifier.from_classnames(model, names, ["a photo of a {}."])
    assert torch.equal(learned.weights, hand.weights)
    assert learned.logit_scale == hand.logit_scale == pl.model_logit_scale(model)
    x = task_features[3]
    assert torch.equal(learned.predict(x), hand.predict(x))
    # the training-time logits (one autograd pass) agree to float rounding
    assert torch.allclose(prompts(model, x[:5]), hand.predict(x[:5]), atol=1e-4)
    # CoOp's interpretation reads the init words back
    assert [w[0] for w in prompts.experts[0].nearest_words(model)] == ["a", "photo", "of", "a"]


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_layouts_put_class_tokens_and_context_where_they_belong(model, position):
    learner = pl.PromptLearner(model, NAMES, n_ctx=4, class_position=position, seed=3)
    embeds, eot = learner()
    table = model.text.token_embed.weight.detach()
    n_before = {"end": 4, "middle": 2, "front": 0}[position]
    assert (learner.n_before, learner.n_after) == (n_before, 4 - n_before)
    for c, name in enumerate(NAMES):
        name_ids = model.tokenize([name]).ids[0]
        name_ids = name_ids[1: int((name_ids != 0).sum()) - 1]
        ref = model.tokenize([learner.layout()[c]])
        assert int(eot[c]) == int(ref.eot_index[0])  # the EOT index of the text layout
        start = 1 + n_before
        assert torch.equal(learner.ids[c, start: start + len(name_ids)], name_ids)
        assert torch.equal(embeds[c, start: start + len(name_ids)], table[name_ids])
        slots = list(range(1, 1 + n_before)) + list(range(start + len(name_ids), start + len(name_ids) + 4 - n_before))
        for j, p in enumerate(slots):
            assert torch.equal(embeds[c, p], learner.ctx[j].detach())
        fixed = [p for p in range(int(eot[c]) + 1) if p not in slots]
        assert torch.equal(embeds[c, fixed], table[learner.ids[c, fixed]])
        assert learner.ids[c, start + len(name_ids) + 4 - n_before] == model.tokenize(["."]).ids[0, 1]


def test_class_specific_context_is_per_class(model):
    learner = pl.PromptLearner(model, NAMES[:3], n_ctx=2, class_specific=True, seed=1)
    assert learner.ctx.shape == (3, 2, model.text.token_embed.weight.shape[1])
    embeds, _ = learner()
    for c in range(3):
        assert torch.equal(embeds[c, 1:3], learner.ctx[c].detach())
    with pytest.raises(ValueError, match="class_position"):
        pl.PromptLearner(model, NAMES, class_position="left")


def test_only_the_context_trains(model, task_features):
    _, xtr, ytr, _, _ = task_features
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    run = coop.train_coop(model, [f"c{i}" for i in range(8)], xtr, ytr, n_ctx=4, steps=3, lr=0.01)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    init = coop.coop_prompts(model, [f"c{i}" for i in range(8)], n_ctx=4)
    assert not torch.equal(run.prompts.experts[0].ctx, init.experts[0].ctx)
    # a backward pass through the learner reaches the context and nothing of the model's
    for p in model.parameters():
        p.grad = None
    prompts = coop.coop_prompts(model, ["red circle", "blue square"], n_ctx=4)
    model.requires_grad_(False)
    try:
        torch.nn.functional.cross_entropy(prompts(model, xtr[:4]), torch.tensor([0, 1, 0, 1])).backward()
    finally:
        for k, p in model.named_parameters():
            p.requires_grad_(flags[k])
    assert prompts.experts[0].ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_learned_prompts_file_round_trip(model, tmp_path):
    prompts = coop.coop_prompts(model, NAMES, n_ctx=3, class_position="middle", seed=2)
    path = pl.LearnedPrompts.from_mixture(prompts, "coop", model, info={"k": 1}).save(tmp_path / "p.safetensors")
    raw = path.read_bytes()
    header = json.loads(raw[8: 8 + int.from_bytes(raw[:8], "little")])  # a safetensors header, not a pickle
    assert set(header) >= {"expert.0.ctx", "__metadata__"}
    loaded = LearnedPrompts.load(path)
    assert loaded.method == "coop" and loaded.classnames == NAMES and loaded.model == "shapes-tiny"
    assert loaded.info == {"k": 1}
    a = ZeroShotClassifier.from_learned_prompts(model, prompts)
    b = ZeroShotClassifier.from_learned_prompts(model, path)
    assert torch.equal(a.weights, b.weights)
    # reordering by class names, and refusing other classes
    c = ZeroShotClassifier.from_learned_prompts(model, path, classnames=NAMES[::-1])
    assert torch.equal(c.weights, a.weights.flip(0)) and c.classnames == NAMES[::-1]
    with pytest.raises(ValueError, match="other classes"):
        ZeroShotClassifier.from_learned_prompts(model, path, classnames=NAMES[:2])
    ZeroShotClassifier.from_classnames(model, NAMES[:2]).save(tmp_path / "zs.safetensors")
    with pytest.raises(ValueError, match="not a learned-prompts file"):
        LearnedPrompts.load(tmp_path / "zs.safetensors")


def test_train_coop_passes_every_keyword(model, monkeypatch, task_features):
    _, xtr, ytr, _, _ = task_features
    seen = {}
    real_prompts, real_fit = coop.coop_prompts, coop.fit_prompts

    def spy_prompts(*a, **kw):
        seen["prompts"] = kw
        return real_prompts(*a, **kw)

    def spy_fit(*a, **kw):
        seen["fit"] = kw
        return real_fit(*a, **{**kw, "steps": 1})

    monkeypatch.setattr(coop, "coop_prompts", spy_prompts)
    monkeypatch.setattr(coop, "fit_prompts", spy_fit)
    names = [f"c{i}" for i in range(8)]
    coop.train_coop(model, names, xtr, ytr, n_ctx=3, ctx_init=None, class_position="front", class_specific=True,
                    init_std=0.05, steps=7, lr=0.3, batch_size=5, optimizer="adamw", momentum=0.5,
                    weight_decay=0.01, warmup_steps=2, warmup_lr=1e-4, seed=9, log_every=0)
    assert seen["prompts"] == {"ctx_init": None, "class_position": "front", "class_specific": True,
                               "init_std": 0.05, "seed": 9}
    assert seen["fit"] == {"steps": 7, "lr": 0.3, "batch_size": 5, "optimizer": "adamw", "momentum": 0.5,
                           "weight_decay": 0.01, "warmup_steps": 2, "warmup_lr": 1e-4, "seed": 9, "log_every": 0}


def test_preset_passes_task_and_training_options(model, monkeypatch, tmp_path):
    seen = {}
    real_task = pl.synthetic_prompt_task

    def spy_task(**kw):
        seen["task"] = kw
        return real_task(**{**kw, "shots": 1, "n_test": 1})

    def spy_train(*a, **kw):
        seen["train"] = kw
        return real_train(*a, **{**kw, "steps": 1})

    real_train = coop.train_coop
    monkeypatch.setattr(pl, "synthetic_prompt_task", spy_task)
    monkeypatch.setattr(coop, "train_coop", spy_train)
    out = pl.run_prompt_preset("coop", model, tmp_path, shots=3, n_test=2, names="unseen-colours",
                               colours=["red", "blue"], shapes=["ring"], seed=4, n_ctx=2, lr=0.5, steps=9)
    assert seen["task"] == {"shots": 3, "n_test": 2, "names": "unseen-colours", "colours": ["red", "blue"],
                            "shapes": ["ring"], "seed": 4}
    assert seen["train"] == {"n_ctx": 2, "lr": 0.5, "steps": 9}
    assert out["prompts"] == str(tmp_path / "prompts.safetensors") and Path(out["prompts"]).is_file()


def test_sixteen_context_vectors_beat_zero_shot(model, task_features):
    """Effect (tiny): class names with unseen colour words; the hand prompt can only read the shape."""
    task, xtr, ytr, xte, yte = task_features
    zero_shot = pl.accuracy(ZeroShotClassifier.from_classnames(model, task.classnames, ["a photo of a {}."])
                            .predict(xte), yte)
    run = coop.train_coop(model, task.classnames, xtr, ytr, n_ctx=16, steps=40, lr=0.02, batch_size=64, seed=0)
    learned = pl.accuracy(run.classifier().predict(xte), yte)
    stub = pl.accuracy(coop.coop_classifier(model, coop.coop_prompts(model, task.classnames, 16)).predict(xte), yte)
    assert zero_shot <= 0.5 and stub <= 0.5
    assert learned >= zero_shot + 0.3, (learned, zero_shot)
    probe = pl.fit_linear_probe(xtr, ytr, len(task.classnames))
    assert pl.accuracy(probe(xte).detach(), yte) > 0.8  # the baseline reported beside it works too


def test_top_k_gates_and_linear_probe_closed_forms():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5], [3.0, 3.0, 0.0, -2.0]])
    gates, idx = pl.top_k_gates(logits, 2)
    assert torch.allclose(gates.sum(-1), torch.ones(2)) and ((gates > 0).sum(-1) == 2).all()
    assert torch.allclose(gates[0, [1, 3]], torch.tensor([2.0, 1.5]).softmax(-1))
    assert torch.equal(pl.top_k_gates(logits, 9)[0], logits.softmax(-1))  # k capped at K
    assert pl.sample_few_shot([0, 0, 0, 1, 1, 2], 2, seed=0) == sorted(pl.sample_few_shot([0, 0, 0, 1, 1, 2], 2))
    assert len(pl.sample_few_shot([0, 0, 0, 1, 1, 2], 2)) == 5


def _cli(args):
    from click.testing import CliRunner

    from cliplab.cli import main

    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_cli_train_writes_prompts_that_classify_and_eval_use(model, tmp_path):
    out = tmp_path / "coop.safetensors"
    r = _cli(["train", "--preset", "coop", "-o", str(out), "--steps", "2", "--set", "shots=1", "--set", "n_test=1",
              "--set", "n_ctx=4", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["prompts"] == str(out) and summary["steps"] == 2 and summary["classes"] == 64
    learned = LearnedPrompts.load(out)
    assert learned.method == "coop" and learned.experts[0]["ctx"].shape[0] == 4
    from cliplab.data.synthetic import zero_shot_task

    task = zero_shot_task("colour_shape", 1, seed=5)
    images = []
    for i in (0, 9):
        images.append(str(tmp_path / f"{i}.png"))
        task.images[i].save(images[-1])
    r = _cli(["classify", *images, "--prompts", str(out), "-k", "1", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    clf = ZeroShotClassifier.from_learned_prompts(model, out)
    expected = [clf.classify([p], topk=1)[0][0][0] for p in images]
    assert [res["top"][0]["label"] for res in data["results"]] == expected
    assert data["prompts"]["method"] == "coop"
    r = _cli(["classify", *images, "--prompts", str(out), "--labels", "red circle,blue square"])
    assert r.exit_code == 2 and "other classes" in r.output
    r = _cli(["eval", "zeroshot", "--set", "kind=colour_shape", "--set", "n_per_class=1", "--prompts", str(out),
              "--no-cache", "-o", str(tmp_path / "ev"), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["prompts"]["source"] == "learned prompts" and res["num_classes"] == 64
    feats = pl.image_features(model, zero_shot_task("colour_shape", 1, seed=0).images)
    top1 = pl.accuracy(ZeroShotClassifier.from_learned_prompts(model, out, classnames=res["classnames"])
                       .predict(feats), range(64))
    assert res["metrics"]["top1"] == pytest.approx(top1)


def test_docs_example_runs():
    text = (ROOT / "docs" / "methods" / "coop.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    exec(compile(blocks[0], "docs/methods/coop.md", "exec"), {})
