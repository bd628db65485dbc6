"""UniME (:mod:`cliplab.objectives.unime`): the filtered top-k hard-negative loss against a brute-force reference,
the similarity-distribution distillation's closed forms, keyword pass-through, and stage 1's effect with the real
all-MiniLM-L6-v2 teacher on held-out Flickr8k captions."""

from __future__ import annotations

import collections
import csv
import math
import re

import pytest
import torch
import torch.nn.functional as F

import cliplab
import cliplab.objectives.unime as unime
from cliplab.objectives.unime import (UniMEKDLoss, UniMELoss, distill_text, hard_negative_indices, hard_negative_loss,
                                      similarity_kd_loss, teacher_agreement)
from cliplab.train import BatchOutput, get_loss, get_preset
from cliplab.train.data import Batch
from conftest import REPO, shared_path


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


def random_sim(b: int, n: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, 8, generator=g), dim=-1)
    y = F.normalize(x[: min(b, n or b)] + 0.8 * torch.randn(min(b, n or b), 8, generator=g), dim=-1)
    if n and n > b:
        y = torch.cat([y, F.normalize(torch.randn(n - b, 8, generator=g), dim=-1)])
    return x @ y.t()


def brute_force(sim: torch.Tensor, k: int, margin: float, temperature: float):
    """Per row: the candidates, the chosen negatives and the loss, computed one by one."""
    chosen, losses = [], []
    for i in range(sim.shape[0]):
        pos = sim[i, i].item()
        cands = [j for j in range(sim.shape[1]) if j != i and sim[i, j].item() <= pos + margin]
        cands.sort(key=lambda j: -sim[i, j].item())
        negs = cands[:k]
        chosen.append(set(negs))
        logits = torch.tensor([pos] + [sim[i, j].item() for j in negs], dtype=torch.float64) / temperature
        losses.append(-(logits[0] - torch.logsumexp(logits, 0)).item())
    return chosen, sum(losses) / len(losses)


# --- stage 2: the filtered top-k cross-entropy ------------------------------------------------------------------------
@pytest.mark.parametrize("b,n,k,margin", [(12, 12, 8, 0.1), (6, 6, 8, 0.1), (10, 14, 3, -0.05), (9, 9, 4, 0.0)])
def test_hard_negatives_and_loss_equal_brute_force(b, n, k, margin):
    sim = random_sim(b, n, seed=b + n + k)
    indices, valid = hard_negative_indices(sim, k=k, margin=margin)
    chosen, expected = brute_force(sim, k, margin, 0.02)
    assert indices.shape == (b, min(k, n - 1))
    for i in range(b):
        assert set(indices[i][valid[i]].tolist()) == chosen[i]  # the top-k of the survivors, no more, no fewer
    assert hard_negative_loss(sim, k=k, margin=margin, temperature=0.02).item() == pytest.approx(expected, rel=1e-5)


def test_false_negative_above_the_positive_plus_margin_is_dropped():
    sim = torch.tensor([[0.50, 0.65, 0.59, 0.20],  # 0.65 > 0.5 + 0.1: a false negative; 0.59 stays
                        [0.10, 0.90, 0.95, 0.30],  # 0.95 is within the margin: a hard negative
                        [0.30, 0.20, 0.40, 0.10],
                        [0.70, 0.10, 0.20, 0.30]])  # 0.70 > 0.4: dropped
    indices, valid = hard_negative_indices(sim, k=2, margin=0.1)
    assert indices.tolist() == [[2, 3], [2, 3], [0, 1], [2, 1]]
    assert torch.equal(valid, torch.ones(4, 2, dtype=torch.bool))
    # a row whose candidates are all filtered keeps only its positive: loss 0, the filtered ones never come back
    sim2 = torch.tensor([[0.1, 0.9], [0.0, 0.5]])
    idx, ok = hard_negative_indices(sim2, k=1, margin=0.1)
    assert ok.tolist() == [[False], [True]]
    per_row = [0.0, F.softplus(torch.tensor((0.0 - 0.5) / 0.02)).item()]
    assert hard_negative_loss(sim2, k=1, margin=0.1).item() == pytest.approx(sum(per_row) / 2, rel=1e-5, abs=1e-8)


def test_a_repeated_caption_is_filtered_only_by_a_negative_margin():
    """A caption repeated in the batch scores exactly like the positive (S_ij == S_ii): the code's filter (drop
    S_ij > S_ii + 0.1) keeps it as a hard negative; only a margin below zero (the issue's wording) drops it. This is
    what experiments/unime_fn_filter.py measures."""
    x = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    y = x.clone()
    y[2] = y[1]  # image 1's caption repeats as text 2
    sim = x @ y.t()
    sim[2, 2] = 1.0  # image 2 matches its own text best
    kept = lambda margin: set(hard_negative_indices(sim, k=3, margin=margin)[0][1][  # noqa: E731
        hard_negative_indices(sim, k=3, margin=margin)[1][1]].tolist())
    assert sim[1, 2] == sim[1, 1] and 2 in kept(0.1) and 2 in kept(math.inf)
    assert 2 not in kept(-1e-4) and 2 not in kept(-0.1)


def test_no_filter_and_all_negatives_is_infonce():
    sim = random_sim(10, seed=3)
    full = F.cross_entropy(sim / 0.05, torch.arange(10))
    assert torch.allclose(hard_negative_loss(sim, k=9, margin=math.inf, temperature=0.05), full, atol=1e-6)
    assert torch.allclose(hard_negative_loss(sim, k=50, margin=math.inf, temperature=0.05), full, atol=1e-6)


def test_gradient_flows_through_the_kept_scores_only():
    sim = random_sim(6, seed=4).requires_grad_(True)
    hard_negative_loss(sim, k=2, margin=0.1, temperature=1.0).backward()  # no saturated softmax
    indices, valid = hard_negative_indices(sim.detach(), k=2, margin=0.1)
    used = torch.zeros(6, 6, dtype=torch.bool)
    used[torch.arange(6), torch.arange(6)] = True
    for i in range(6):
        used[i, indices[i][valid[i]]] = True
    assert (sim.grad[~used] == 0).all() and (sim.grad[used] != 0).all()


def batch_output(n: int = 8, seed: int = 0, texts: list[str] | None = None) -> BatchOutput:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, 16, generator=g), dim=-1)
    txt = F.normalize(img + torch.randn(n, 16, generator=g), dim=-1)
    texts = texts or [f"caption {i}" for i in range(n)]
    batch = Batch(step=0, indices=list(range(n)), pixels=torch.zeros(0), ids=torch.zeros(0), texts=texts,
                  is_long=torch.zeros(n, dtype=torch.bool), truncated=torch.zeros(n, dtype=torch.bool))
    return BatchOutput(img, txt, torch.tensor(math.log(1 / 0.07)), batch)


def test_unime_loss_passes_every_keyword():
    out = batch_output(10)
    sim = out.similarity()
    for kw in [dict(k=3, margin=0.05, temperature=0.1), dict(k=9, margin=math.inf, temperature=0.02)]:
        loss, logs = get_loss("unime", **kw)(out)
        assert loss.item() == pytest.approx(hard_negative_loss(sim, **kw).item(), rel=1e-6)
    loss, _ = UniMELoss(k=4, margin=0.0, temperature=None)(out)  # the model's scale
    assert loss.item() == pytest.approx(hard_negative_loss(sim, k=4, margin=0.0, scale=1 / 0.07).item(), rel=1e-6)
    loss, logs = UniMELoss(k=4, margin=0.0, temperature=0.1, symmetric=True)(out)
    t2i = hard_negative_loss(sim.t(), k=4, margin=0.0, temperature=0.1)
    assert loss.item() == pytest.approx((hard_negative_loss(sim, k=4, margin=0.0, temperature=0.1) + t2i).item() / 2)
    assert logs["hn_t2i"] == pytest.approx(t2i.item())
    _, logs = UniMELoss(k=9, margin=-2.0)(out)
    assert logs["filtered"] == 1.0  # every candidate lies above "positive - 2"
    with pytest.raises(ValueError, match="k must be"):
        UniMELoss(k=0)


def test_preset_trains_a_few_steps(tmp_path):
    cfg = get_preset("unime-tiny")
    assert cfg.loss == "unime" and cfg.loss_kwargs == {"k": 8, "margin": 0.1, "temperature": 0.02}
    from cliplab.train import Trainer

    cfg = cfg.replace(steps=3, batch_size=16, log_every=1, checkpoint_every=0, keep_checkpoints=0, progress=False,
                      out_dir=str(tmp_path / "run"))
    result = Trainer(cfg).fit()
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    log = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"hn_i2t"' in log and '"filtered"' in log


# --- stage 1: distillation of the similarity distributions -----------------------------------------------------------
def test_kd_is_zero_when_similarities_agree_and_matches_the_closed_form():
    s, t = random_sim(7, seed=1), random_sim(7, seed=2)
    assert similarity_kd_loss(s, s.clone(), 0.05).item() == pytest.approx(0.0, abs=1e-6)
    p_t, p_s = F.softmax(t / 0.05, 1), F.softmax(s / 0.05, 1)
    expected = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    assert similarity_kd_loss(s, t, 0.05).item() == pytest.approx(expected.item(), rel=1e-5)
    # the masked diagonal is left out of both distributions: the same as deleting it
    eye = torch.eye(7, dtype=torch.bool)
    off = lambda m: m[~eye].view(7, 6)  # noqa: E731
    assert similarity_kd_loss(s, t, 0.05, mask=eye).item() == pytest.approx(
        similarity_kd_loss(off(s), off(t), 0.05).item(), rel=1e-5)
    assert similarity_kd_loss(s, s.clone(), 0.05, mask=eye).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_gradient_reaches_the_student_only():
    s, t = random_sim(5, seed=1).requires_grad_(True), random_sim(5, seed=2).requires_grad_(True)
    similarity_kd_loss(s, t, 0.1).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


class StubTeacher:
    """A TextEmbedder stand-in: fixed random vectors per text; records what it was asked to encode."""

    name, default_pooling, dim = "stub", "mean", 6

    def __init__(self):
        self.calls: list[list[str]] = []

    def encode(self, texts, pooling=None, normalize=False, batch_size=64, progress=False):
        self.calls.append(list(texts))
        rows = [torch.randn(6, generator=torch.Generator().manual_seed(sum(map(ord, t)))) for t in texts]
        out = torch.stack(rows)
        return F.normalize(out, dim=-1) if normalize else out


def test_kd_loss_passes_teacher_and_temperature():
    out = batch_output(6)
    teacher = StubTeacher()
    loss, logs = get_loss("unime-kd", teacher=teacher, temperature=0.3)(out)
    t = teacher.encode(out.batch.texts, normalize=True)
    eye = torch.eye(6, dtype=torch.bool)
    s = out.text_features
    assert loss.item() == pytest.approx(similarity_kd_loss(s @ s.t(), t @ t.t(), 0.3, mask=eye).item(), rel=1e-6)
    assert teacher.calls[0] == out.batch.texts and logs["kd"] == pytest.approx(loss.item())
    assert UniMEKDLoss().teacher_name == "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def tiny_model():
    return cliplab.load("shapes-tiny").float()


def test_distill_text_passes_every_keyword(tiny_model, monkeypatch):
    model = cliplab.load("shapes-tiny").float()
    teacher = StubTeacher()
    seen = []
    real = unime.similarity_kd_loss
    monkeypatch.setattr(unime, "similarity_kd_loss", lambda s, t, temperature: seen.append(temperature) or
                        real(s, t, temperature))
    texts = [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square", "cross", "star")]
    before = {n: p.clone() for n, p in model.named_parameters()}
    losses = distill_text(model, teacher, texts, texts[::-1], steps=3, batch_size=5, lr=0.0, temperature=0.7, seed=1)
    assert len(losses) == 3 and seen == [0.7] * 3
    asked = [t for call in teacher.calls for t in call]
    assert len(teacher.calls[0]) == 5 and len(asked) == len(set(asked))  # batches of 5; each text encoded once
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # lr=0 reached the optimiser
    again = distill_text(model, StubTeacher(), texts, texts[::-1], steps=3, batch_size=5, lr=0.0, temperature=0.7,
                         seed=1)
    other = distill_text(model, StubTeacher(), texts, texts[::-1], steps=3, batch_size=5, lr=0.0, temperature=0.7,
                         seed=2)
    assert again == losses and other != losses  # the seed picks the batches
    distill_text(model, teacher, texts, texts[::-1], steps=1, batch_size=5, lr=1e-2, temperature=0.7)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("text.") for n in changed)  # only the text tower trains
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="aligned"):
        distill_text(model, teacher, texts, texts[:3])


def flickr_pairs():
    held_images = {r["image"] for r in csv.DictReader(open(shared_path("flickr8k-1k", "captions.csv")))}
    by_image = collections.defaultdict(list)
    for r in csv.DictReader(open(shared_path("flickr8k-1k", "all_captions.csv"))):
        by_image[r["image"]].append(r["caption"])
    train = [(c[0], c[1]) for im, c in sorted(by_image.items()) if im not in held_images and len(c) >= 2][:300]
    held_out = [by_image[im][0] for im in sorted(held_images)][:120]
    return train, held_out


def test_distillation_raises_teacher_agreement_over_infonce_control(minilm):
    """Stage 1's effect: the same steps, data, seed and temperature, with the teacher's soft in-batch distribution
    (KD) vs one-hot targets (in-batch InfoNCE, no teacher): agreement with MiniLM on held-out captions."""
    train, held_out = flickr_pairs()
    queries, positives = [a for a, _ in train], [b for _, b in train]
    start = teacher_agreement(cliplab.load("shapes-tiny").float(), minilm, held_out)
    arms = {}
    for name, teacher in (("kd", minilm), ("control", None)):
        model = cliplab.load("shapes-tiny").float()
        distill_text(model, teacher, queries, positives, steps=30, batch_size=32, lr=1e-3, temperature=0.1, seed=0)
        arms[name] = teacher_agreement(model, minilm, held_out)
    assert arms["kd"] > arms["control"] + 0.04 and arms["kd"] > start + 0.1, (start, arms)


def test_doc_example_runs():
    text = (REPO / "docs" / "methods" / "unime.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    exec(compile(blocks[0], "docs/methods/unime.md", "exec"), {})
