"""FDP (parts done): edit-distance candidates against a brute-force edit enumeration, the 1/(d+0.1) target, the
KL distractor loss, balanced BCE against a brute-force loop, the DB kernel, the focus bias's invariances, mAP."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cliplab
from cliplab.scenetext import fdp
from cliplab.scenetext.dataset import DICTIONARY

DOC = Path(__file__).resolve().parents[1] / "docs/methods/fdp.md"
LETTERS = "abcdefghijklmnopqrstuvwxyz#"


def edits1(word: str) -> set[str]:
    """Every string one insertion, deletion or substitution away (brute force)."""
    splits = [(word[:i], word[i:]) for i in range(len(word) + 1)]
    out = {a + b[1:] for a, b in splits if b}
    out |= {a + c + b[1:] for a, b in splits if b for c in LETTERS}
    out |= {a + c + b for a, b in splits for c in LETTERS}
    return out


def brute_neighbours(query: str, dictionary, radius: int) -> dict[str, int]:
    ring, seen, dist = {query}, {query: 0}, 0
    while dist < radius:
        dist += 1
        ring = {e for w in ring for e in edits1(w)} - set(seen)
        seen.update({w: dist for w in ring})
    return {w: d for w, d in seen.items() if w in set(dictionary) | {query}}


def test_levenshtein_known_values():
    assert fdp.levenshtein("cat", "cut") == 1 and fdp.levenshtein("cat", "cats") == 1
    assert fdp.levenshtein("kitten", "sitting") == 3 and fdp.levenshtein("", "abc") == 3
    assert fdp.levenshtein("###", "fish") == 4 and fdp.levenshtein("tree", "free") == 1


@pytest.mark.parametrize("query", ["cat", "fox", "tree", "moon", "the", "sunday", "bird"])
def test_candidates_match_brute_force(query):
    dictionary = list(DICTIONARY) + ["sundae", "monday", "sunny"]
    got = fdp.distracted_candidates(query, dictionary)
    brute = brute_neighbours(query, dictionary, fdp.edit_budget(query))
    expected = sorted(brute.items(), key=lambda wd: (wd[1], wd[0]))[:5]
    expected += [(fdp.PAD, len(query) if "#" not in query else 0)] * (5 - len(expected))
    assert got == expected
    assert got[0] == (query, 0)


def test_candidate_keywords_and_budget():
    assert fdp.edit_budget("hello") == 1 and fdp.edit_budget("sunday") == 2
    assert fdp.distracted_candidates("sunday", ["sundae", "monday"]) == [("sunday", 0), ("sundae", 1), ("monday", 2),
                                                                         ("###", 6), ("###", 6)]
    got = fdp.distracted_candidates("cat", DICTIONARY, k=3, pad="@@")
    assert len(got) == 3 and got == [("cat", 0), ("at", 1), ("bat", 1)]
    assert fdp.distracted_candidates("zzz", ["cat"], k=2, pad="@@") == [("zzz", 0), ("@@", 3)]


def test_target_formula():
    d = torch.tensor([[0.0, 1, 1, 3, 3]])
    w = 1 / (d + 0.1)
    assert torch.allclose(fdp.candidate_target(d), w.exp() / w.exp().sum(), atol=1e-7)
    assert torch.allclose(fdp.candidate_target([0, 2], eps=1.0), torch.softmax(torch.tensor([1.0, 1 / 3]), -1))
    assert fdp.candidate_target(d)[0, 0] > 0.999  # the query itself dominates: 1/0.1 = 10 vs 1/1.1


def test_distractor_loss_is_kl_to_the_target():
    g = torch.Generator().manual_seed(0)
    img, cand = torch.randn(3, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    t = fdp.candidate_target(torch.tensor([[0.0, 1, 1, 3, 3]] * 3))
    logits = 7.0 * torch.einsum("bd,bkd->bk", F.normalize(img, dim=-1), F.normalize(cand, dim=-1))
    p = logits.log_softmax(-1)
    ref = (t * (t.log() - p)).sum() / 3
    assert torch.allclose(fdp.distractor_loss(img, cand, t, 7.0), ref, atol=1e-6)
    # moving the image towards the query's own text lowers the loss (sign check)
    closer = img + 3 * cand[:, 0]
    assert fdp.distractor_loss(closer, cand, t, 7.0) < fdp.distractor_loss(img, cand, t, 7.0)


def brute_balanced_bce(logits, gt, mask, ratio):
    pos, neg = [], []
    for x, y, m in zip(logits.flatten().tolist(), gt.flatten().tolist(), mask.flatten().tolist()):
        if not m:
            continue
        loss = -(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))
        (pos if y == 1 else neg).append(loss)
    kept = sorted(neg, reverse=True)[:min(len(neg), int(len(pos) * ratio))]
    assert len(kept) <= ratio * len(pos)
    return (sum(pos) + sum(kept)) / (len(pos) + len(kept) + 1e-6)


@pytest.mark.parametrize("ratio", [3.0, 1.0])
def test_balanced_bce_matches_brute_force(ratio):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 8, 8, generator=g)
    gt = (torch.rand(2, 8, 8, generator=g) < 0.1).float()
    mask = (torch.rand(2, 8, 8, generator=g) < 0.9).float()
    got = fdp.balanced_bce(logits, gt, mask, negative_ratio=ratio)
    assert abs(float(got) - brute_balanced_bce(logits, gt, mask, ratio)) < 1e-5
    assert abs(float(fdp.balanced_bce(logits, gt)) - brute_balanced_bce(logits, gt, torch.ones_like(gt), 3.0)) < 1e-5


def test_db_kernel():
    # 20 x 10 box: offset int(200 * 0.84 / 60.001 + 0.5) = 3
    assert fdp.shrink_box((10, 20, 30, 30)) == (13, 23, 27, 27)
    assert fdp.shrink_box((0, 0, 2, 40)) is None and fdp.shrink_box((0, 0, 2, 2)) == (0, 0, 2, 2)  # offset 1 eats it; 0
    # 40 x 24 box: offset int(960 * 0.84 / 128.001 + 0.5) = 6, kernel (14, 14, 42, 26); patch centres 4, 12, ...
    k = fdp.text_kernel([(8, 8, 48, 32)], 64, 8)
    assert k.sum() == 3 and k[2, 2:5].all()
    assert fdp.text_kernel([(8, 8, 48, 32)], 64, 8, ratio=1.0).sum() == 15  # no shrink: 5 x 3 centres in the box
    assert fdp.text_kernel([(0, 0, 2, 2)], 64, 8).sum() == 0


@pytest.fixture(scope="module")
def model():
    return cliplab.load("shapes-tiny").eval()


def test_focus_bias_invariances(model):
    from cliplab.data.synthetic import SceneWorld

    px = torch.stack([model.preprocess(SceneWorld(seed=0).sample(i).image) for i in range(2)])
    hook = fdp.FocusBias(model.visual.transformer.blocks[0].ln_1.normalized_shape[0])
    with torch.no_grad():
        plain = model.encode_image(px, output="tokens")
        assert torch.allclose(model.encode_image(px, hooks=fdp.FocusBias(192, enabled=False), output="tokens").pooled,
                              plain.pooled, atol=1e-5)
        # sigmoid(map) = 1 on every patch: the class row gets +1 on every key, a softmax shift, so no change at all
        hook.head.weight.zero_()
        hook.head.bias.fill_(1e4)
        same = model.encode_image(px, hooks=hook, output=("tokens", "hidden"))
        assert torch.allclose(same.pooled, plain.pooled, atol=1e-5)
        # the map is read from the residual stream entering the last block
        hook.head.weight.normal_()
        hook.head.bias.zero_()
        out = model.encode_image(px, hooks=hook, output=("tokens", "hidden"))
        assert torch.allclose(hook.map, hook.head(hook.ln(out.hidden[-2][:, 1:])).squeeze(-1), atol=1e-5)
        assert hook.map.shape == (2, 64)
        # a non-constant map changes the class token only: patch tokens are untouched
        assert not torch.allclose(out.pooled, plain.pooled, atol=1e-4)
        assert torch.allclose(out.tokens[:, 1:], plain.tokens[:, 1:], atol=1e-5)


def test_mean_average_precision():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5]])
    relevant = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]])
    assert abs(fdp.mean_average_precision(scores, relevant) - ((1 + 2 / 3) / 2 + 1) / 2) < 1e-6


def test_docs_page_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert blocks
    ns: dict = {"__name__": "docs_fdp"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{DOC.name}[block {i}]", "exec"), ns)
