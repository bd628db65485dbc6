"""MoCoOp: experts equal their hand templates at init, gates sum to one over the top-k, one expert is CoOp exactly,
the gate targets and the text-to-text loss against brute force, keywords reaching the core, the router separating the
hidden size against a control, the routed classifier from its file, the CLI path and the docs example."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cliplab
from cliplab.zeroshot import LearnedPrompts, RoutedPromptClassifier, ZeroShotClassifier, encode_prompts
from cliplab.zeroshot import coop, mocoop
from cliplab.zeroshot import prompt_learning as pl

ROOT = Path(__file__).resolve().parents[1]
GROUPS = mocoop.SYNTHETIC_TEMPLATE_GROUPS


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


@pytest.fixture(scope="module")
def model():
    return cliplab.load("shapes-tiny").eval()


@pytest.fixture(scope="module")
def task_features(model):
    """4 classes (2 colours x 2 shapes), sizes small/medium/large cycling: 9 shots, 6 test images per class."""
    task = pl.synthetic_prompt_task(shots=9, n_test=6, colours=["red", "blue"], shapes=["circle", "square"], seed=1)
    return (task, pl.image_features(model, task.train_images), torch.tensor(task.train_labels),
            pl.image_features(model, task.test_images), torch.tensor(task.test_labels))


def test_experts_are_their_hand_templates_at_init(model, task_features):
    names = task_features[0].classnames + ["very long green hexagon name"]
    mix = mocoop.mocoop_prompts(model, names, GROUPS)
    assert mix.num_experts == 3 and mix.router is not None and torch.equal(mix.correction, torch.zeros_like(mix.correction))
    _, feats, _ = pl.learned_class_features(model, mix)
    for k, group in enumerate(GROUPS.values()):
        ref = encode_prompts(model, [group[0].format(c) for c in names])
        assert torch.equal(feats[k], ref)
        e = mix.experts[k]
        assert (e.n_before, e.n_after, e.suffix) == (2, 0, ".")
    # a template with words after {} puts context on both sides of the name
    both = mocoop.mocoop_prompts(model, names, [["a {} in a picture."], ["one {}."]])
    assert (both.experts[0].n_before, both.experts[0].n_after) == (1, 3)
    _, feats, _ = pl.learned_class_features(model, both)
    assert torch.equal(feats[0], encode_prompts(model, [f"a {c} in a picture." for c in names]))


def test_gates_sum_to_one_over_the_top_two(model, task_features):
    _, xtr, _, _, _ = task_features
    mix = mocoop.mocoop_prompts(model, ["red circle", "blue square"], GROUPS, seed=3)
    with torch.no_grad():
        mix.router.weight.normal_(0, 1.0)
        logits, gates = mix.gates(xtr)
    assert torch.allclose(gates.sum(-1), torch.ones(len(xtr))) and ((gates > 0).sum(-1) == 2).all()
    top = logits.topk(2, dim=-1)
    assert torch.allclose(gates.gather(1, top.indices), top.values.softmax(-1))
    # the mixture's logits: the gate-weighted sum of the two chosen experts' normalised class embeddings
    with torch.no_grad():
        feats = mix.expert_features(model)
        out = mix(model, xtr[:3])
    img = F.normalize(xtr[:3], dim=-1)
    for b in range(3):
        text = sum(gates[b, k] * feats[k] for k in range(3))
        assert torch.allclose(out[b], mix.logit_scale * text @ img[b], atol=1e-5)


def test_one_expert_is_coop(model, task_features):
    task, xtr, ytr, xte, _ = task_features
    kw = dict(steps=4, lr=0.05, batch_size=8, seed=2)
    moe = mocoop.train_mocoop(model, task.classnames, xtr, ytr, [["a photo of a {}."]], text_weight=0.0,
                              correction=False, **kw)
    ref = coop.train_coop(model, task.classnames, xtr, ytr, ctx_init="a photo of a", **kw)
    assert torch.equal(moe.prompts.experts[0].ctx, ref.prompts.experts[0].ctx)
    assert moe.fit.parts["gate"] == [0.0] * 4  # one expert: the gate is 1 and its loss 0
    with torch.no_grad():
        assert torch.equal(moe.prompts(model, xte), ref.prompts(model, xte))


def test_gate_targets_and_text_loss_against_brute_force():
    g = torch.Generator().manual_seed(0)
    protos = F.normalize(torch.randn(4, 5, 8, generator=g), dim=-1)   # [G, C, D]
    img = torch.randn(6, 8, generator=g)
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    t = mocoop.gate_targets(img, protos, y)
    for b in range(6):
        sims = torch.stack([F.normalize(img[b], dim=0) @ protos[k, y[b]] for k in range(4)])
        boost = torch.zeros(4)
        boost[sims.topk(2).indices] = 10.0
        assert torch.allclose(t[b], (sims + boost).softmax(0), atol=1e-6)
    feats = F.normalize(torch.randn(4, 5, 8, generator=g), dim=-1)
    ref = torch.stack([F.cross_entropy(2.0 * feats[k] @ protos[k].t(), torch.arange(5)) for k in range(4)]).mean()
    assert torch.allclose(mocoop.text_to_text_loss(feats, protos, scale=2.0), ref, atol=1e-6)
    assert mocoop.text_to_text_loss(protos, protos, 50.0) < 0.01  # experts at their prototypes: (near) zero
    logits = torch.randn(6, 4, generator=g, requires_grad=True)
    assert torch.allclose(mocoop.gate_loss(logits, t), -(t * logits.log_softmax(-1)).sum(-1).mean())


def test_regulariser_over_all_classes_reaches_the_experts(model, task_features):
    task, xtr, ytr, _, _ = task_features
    base = task.classnames
    extra = base + ["green star", "pink ring"]
    mix = mocoop.mocoop_prompts(model, base, GROUPS)
    train_p = mocoop.group_prototypes(model, base, GROUPS)
    all_p = mocoop.group_prototypes(model, extra, GROUPS)
    assert all_p.shape == (3, 6, model.config.embed_dim) and torch.equal(all_p[:, :4], train_p)
    loss = mocoop.mocoop_loss(model, mix, train_p, text_weight=1.0, gate_weight=0.0, reg_classnames=extra,
                              reg_prototypes=all_p)
    feats = mix.expert_features(model)
    logits, extras = mix.logits_from(xtr[:4], feats)
    terms = loss(mix, xtr[:4], ytr[:4], {"expert_feats": feats, "extras": extras})
    assert set(terms) == {"text"}
    with torch.no_grad():  # brute force: every expert's features over all six class names
        full = torch.stack([pl.encode_prompt_embeddings(model, *pl.PromptLearner(
            model, extra, ctx_init=next(iter(GROUPS.values()))[k].replace(".", "").strip(), suffix=".")())
            for k in range(1)])
    ref = mocoop.text_to_text_loss(F.normalize(full, dim=-1), all_p[:1])
    one = mocoop.text_to_text_loss(mix_feats_over(model, mix, extra)[:1], all_p[:1])
    assert torch.allclose(one, ref, atol=1e-5)
    assert torch.allclose(terms["text"], mocoop.text_to_text_loss(mix_feats_over(model, mix, extra), all_p),
                          atol=1e-5)
    terms["text"].backward()
    assert all(e.ctx.grad is not None and e.ctx.grad.abs().sum() > 0 for e in mix.experts)


def mix_feats_over(model, mix, names):
    """Each expert's normalised class features over ``names`` (its own context, other class names)."""
    with torch.no_grad():
        out = []
        for e in mix.experts:
            learner = pl.PromptLearner(model, names, n_before=e.n_before, n_after=e.n_after, suffix=e.suffix)
            learner.ctx.copy_(e.ctx)
            out.append(pl.encode_prompt_embeddings(model, *learner()))
        return F.normalize(torch.stack(out) + mix.correction, dim=-1)


def test_train_mocoop_passes_every_keyword(model, monkeypatch, task_features):
    task, xtr, ytr, _, _ = task_features
    seen = {}
    real = {n: getattr(mocoop, n) for n in ("mocoop_prompts", "mocoop_loss", "fit_prompts")}

    def spy(name):
        def fn(*a, **kw):
            seen[name] = kw
            if name == "fit_prompts":
                kw = {**kw, "steps": 1}
            return real[name](*a, **kw)
        return fn

    for n in real:
        monkeypatch.setattr(mocoop, n, spy(n))
    mocoop.train_mocoop(model, task.classnames, xtr, ytr, GROUPS, all_classnames=task.classnames + ["pink ring"],
                        text_weight=2.0, gate_weight=3.0, text_scale=4.0, top_k=1, correction=False, steps=6, lr=0.1,
                        batch_size=7, optimizer="adamw", momentum=0.8, weight_decay=0.02, warmup_steps=1,
                        warmup_lr=1e-3, seed=5, log_every=0)
    assert seen["mocoop_prompts"] == {"top_k": 1, "correction": False, "seed": 5}
    assert seen["mocoop_loss"]["text_weight"] == 2.0 and seen["mocoop_loss"]["gate_weight"] == 3.0
    assert seen["mocoop_loss"]["text_scale"] == 4.0
    assert seen["mocoop_loss"]["reg_classnames"] == task.classnames + ["pink ring"]
    assert seen["fit_prompts"] == {"steps": 6, "lr": 0.1, "batch_size": 7, "optimizer": "adamw", "momentum": 0.8,
                                   "weight_decay": 0.02, "warmup_steps": 1, "warmup_lr": 1e-3, "seed": 5,
                                   "extra_loss": seen["fit_prompts"]["extra_loss"], "log_every": 0}


def test_router_separates_the_hidden_size(model, task_features):
    """Effect: the class names never mention size; the gate supervision from the size template groups teaches the
    router to route by size. Control: the same run without the gate loss."""
    task, xtr, ytr, xte, _ = task_features
    kw = dict(steps=30, lr=1.0, batch_size=36, seed=0, text_weight=0.0)
    run = mocoop.train_mocoop(model, task.classnames, xtr, ytr, GROUPS, **kw)
    control = mocoop.train_mocoop(model, task.classnames, xtr, ytr, GROUPS, gate_weight=0.0, **kw)
    trained = mocoop.router_agreement(run.prompts, xte, task.test_style)
    untrained = mocoop.router_agreement(control.prompts, xte, task.test_style)
    assert trained >= 0.85 and untrained <= 0.6, (trained, untrained)


def test_routed_classifier_from_its_file(model, task_features, tmp_path):
    task, xtr, ytr, xte, _ = task_features
    mix = mocoop.mocoop_prompts(model, task.classnames, GROUPS, seed=4)
    with torch.no_grad():
        mix.router.weight.normal_(0, 1.0)
        mix.correction.normal_(0, 0.1)
        mix.experts[1].ctx.add_(0.01)
        ref = mix(model, xte)
    path = LearnedPrompts.from_mixture(mix, "mocoop", model).save(tmp_path / "m.safetensors")
    clf = ZeroShotClassifier.from_learned_prompts(model, path)
    assert isinstance(clf, RoutedPromptClassifier) and clf.expert_weights.shape[0] == 3
    assert torch.allclose(clf.predict(xte), ref, atol=1e-5)
    with pytest.raises(ValueError, match="learned-prompts file"):
        clf.save(tmp_path / "x.safetensors")


def test_cli_train_mocoop_then_classify(tmp_path):
    from click.testing import CliRunner

    from cliplab.cli import main

    out = tmp_path / "moe"
    r = CliRunner().invoke(main, ["train", "--preset", "mocoop", "-o", str(out), "--steps", "2", "--set", "shots=1",
                                  "--set", "n_test=1", "--set", 'colours=["red", "blue"]', "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    path = out / "prompts.safetensors"
    assert summary["prompts"] == str(path) and summary["classes"] == 16 and "router_agreement" in summary
    learned = LearnedPrompts.load(path)
    assert learned.method == "mocoop" and len(learned.experts) == 3 and learned.router_weight is not None
    img = tmp_path / "a.png"
    pl.synthetic_prompt_task(shots=1, n_test=0, colours=["red"], shapes=["star"]).train_images[0].save(img)
    r = CliRunner().invoke(main, ["classify", str(img), "--prompts", str(path), "-k", "1", "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["results"][0]["top"][0]["label"] in learned.classnames


def test_docs_example_runs():
    text = (ROOT / "docs" / "methods" / "mocoop.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    exec(compile(blocks[0], "docs/methods/mocoop.md", "exec"), {})
