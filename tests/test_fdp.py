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


# --- prompts, the FDP model, training -------------------------------------------------------------------------


def test_kmeans2_is_a_fixed_point_and_anchored():
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(6, 4, generator=g) + 4, torch.randn(9, 4, generator=g) - 4])
    labels = fdp.kmeans2(x, first=7)
    assert labels[7] == 0 and labels[:6].eq(labels[0]).all() and labels[6:].eq(0).all() and labels[0] == 1
    xn = F.normalize(x, dim=-1)
    centres = torch.stack([xn[labels == c].mean(0) for c in (0, 1)])
    assert torch.equal(torch.cdist(xn, centres).argmin(-1), labels)  # Lloyd's fixed point: nearest centre


def test_routing_and_prompt_lengths(model):
    words = ["the", "and", "cat", "tree", "moon"]
    route = fdp.route_queries(model, words)
    assert route[0] is True and len(route) == 5
    f = fdp.FDP(model, words, n_function=2, n_content=3)
    assert f.vocabulary[-1] == fdp.PAD and f.is_function[0]
    for name, n in (("function", 2), ("content", 3)):
        learner = f.prompts[name]
        assert learner.n_ctx == n and learner.n_before == n
        assert all(f.is_function[f.index[w]] == (name == "function") for w in learner.classnames)


def test_prompt_features_equal_the_text_path(model):
    f = fdp.FDP(model, ["the", "cat", "tree"])
    x_id = model.tokenize(["X"]).ids[0, 1]
    with torch.no_grad():
        for learner in f.prompts.values():
            learner.ctx.copy_(model.text.token_embed.weight[x_id].expand_as(learner.ctx))
        got = f.word_features()
        for w in f.vocabulary:
            n = f.prompts["function" if f.is_function[f.index[w]] else "content"].n_ctx
            ref = model.encode_text(model.tokenize([" ".join(["X"] * n + [w])]))[0]
            assert torch.allclose(got[f.index[w]], ref, atol=1e-5), w


def test_cached_last_block_equals_the_hooked_forward(model):
    from cliplab.data.synthetic import SceneWorld

    px = torch.stack([model.preprocess(SceneWorld(seed=1).sample(i).image) for i in range(3)])
    f = fdp.FDP(model, ["cat"])
    with torch.no_grad():
        f.focus.head.weight.normal_()
        stream, skip = f.frozen_features(px)
        ours = f.image_from_stream(stream, skip)
        assert torch.allclose(ours, model.encode_image(px, hooks=f.focus).pooled, atol=1e-5)
        # identity at initialisation: the zero-initialised cross-attention adds nothing
        assert torch.allclose(f.fuse(ours), ours, atol=0)
        off = fdp.FDP(model, ["cat"], focus=False)
        assert torch.allclose(off.encode_images(px), F.normalize(model.encode_image(px), dim=-1), atol=1e-5)


def small_scenes(n, seed):
    from cliplab.scenetext.dataset import SceneTextWorld

    return SceneTextWorld(seed=seed, cluttered=True).scenes(n)


def test_train_keywords_reach_the_loop(monkeypatch):
    model = cliplab.load("shapes-tiny").eval()
    seen = {}
    real_adam, real_kernel = torch.optim.Adam, fdp.text_kernel

    def adam(groups, **kw):
        seen["groups"], seen["adam"] = [(len(g["params"]), g["lr"]) for g in groups], kw
        return real_adam(groups, **kw)

    def kernel(boxes, image_size, grid, ratio=0.4):
        seen["ratio"] = ratio
        return real_kernel(boxes, image_size, grid, ratio)

    monkeypatch.setattr(torch.optim, "Adam", adam)
    monkeypatch.setattr(fdp, "text_kernel", kernel)
    scenes = small_scenes(12, 5)
    before = {n: p.clone() for n, p in model.named_parameters()}
    f, log = fdp.train_fdp(model, scenes, vocabulary=DICTIONARY, steps=3, batch_size=4, lr=0.01, image_lr=0.02,
                           weight_decay=0.5, kernel_ratio=0.7, image_parts=("mlp",), distractor=False, seed=2)
    assert len(log) == 3 and all(row[3] == 0 for row in log) and all(row[4] > 0 for row in log)
    assert all(abs(row[1] - sum(row[2:])) < 1e-5 for row in log)  # total = CE + KL + BCE
    assert seen["ratio"] == 0.7 and seen["adam"]["weight_decay"] == 0.5
    last = len(model.visual.transformer.blocks) - 1
    assert seen["groups"][0][1] == 0.01 and seen["groups"][1] == (4, 0.02)  # mlp: fc1, fc2 weights and biases
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(f"visual.transformer.blocks.{last}.mlp.") for n in changed)
    assert f.vocabulary[:-1] == list(DICTIONARY)
    _, log2 = fdp.train_fdp(model, scenes, steps=2, batch_size=4, focus=False, seed=2)  # switches need no fresh model
    assert all(row[4] == 0 and row[3] > 0 and abs(row[1] - sum(row[2:])) < 1e-5 for row in log2)
    _, log3 = fdp.train_fdp(model, scenes, steps=2, batch_size=4, map_loss=False)
    assert all(row[4] == 0 for row in log3)
    with pytest.raises(ValueError, match="image_parts"):
        fdp.train_fdp(model, scenes, steps=1, image_parts=("conv",))


@pytest.fixture(scope="module")
def trained_pair():
    """FDP and the same training without the map loss (same scenes, seed, steps)."""
    train, held = small_scenes(64, 11), small_scenes(32, 12)
    runs = {}
    for name, kw in (("fdp", {}), ("no_map", {"map_loss": False})):
        m = cliplab.load("shapes-tiny").eval()
        runs[name] = (m, *fdp.train_fdp(m, train, vocabulary=DICTIONARY, steps=25, batch_size=16, seed=0, **kw))
    return runs, held


def test_effect_focus_map_finds_text_against_control(trained_pair):
    runs, held = trained_pair
    with_map = fdp.focus_map_auc(runs["fdp"][1], held)
    without = fdp.focus_map_auc(runs["no_map"][1], held)
    # measured under load: 0.83 vs 0.44 (seed 0); with seed 1 0.85 vs 0.77, so the margin is seed-dependent
    assert with_map > 0.78 and with_map > without + 0.1, (with_map, without)


def test_frozen_parts_stay_and_save_load_round_trip(trained_pair, tmp_path):
    runs, held = trained_pair
    m, f, _ = runs["fdp"]
    fresh = cliplab.load("shapes-tiny")
    trained = {id(p) for p in f.image_parameters()}
    for (name, p), (_, q) in zip(m.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q) == (id(p) not in trained), name
    f.save(tmp_path / "fdp.pt")
    back = fdp.FDP.load(tmp_path / "fdp.pt")
    assert back.vocabulary == f.vocabulary and back.focus.enabled and back.image_parts == f.image_parts
    px = fdp.scene_pixels(m, held[:6])
    q = fdp.gallery_queries(held[:6], DICTIONARY)
    assert torch.allclose(back.scores(back.encode_images(px), q), f.scores(f.encode_images(px), q), atol=1e-5)
    with pytest.raises(ValueError, match="vocabulary"):
        f.scores(f.encode_images(px), ["zebra"])


def test_retrieval_report_and_confusers():
    from cliplab.scenetext.dataset import TextScene

    scenes = [TextScene(None, w, (), None, True) for w in (("cat",), ("cut",), ("dog",))]
    scores = torch.tensor([[0.2, 0.9, 0.1]])  # the confuser "cut" outranks "cat" for the query "cat"
    rep = fdp.retrieval_report(scores, ["cat"], scenes)
    assert rep["confuser_outranks_true_rate"] == 1.0 and abs(rep["mAP"] - 0.5) < 1e-9
    assert fdp.gallery_queries(scenes, ["dog", "cat", "fox"]) == ["dog", "cat"]


def test_focus_map_auc_brute_force(model):
    from cliplab.scenetext.dataset import SceneTextWorld

    scenes = SceneTextWorld(seed=3, cluttered=True).scenes(3)
    f = fdp.FDP(model, ["cat"])
    stream, _ = f.frozen_features(fdp.scene_pixels(model, scenes))
    with torch.no_grad():
        score = f.focus.predict(stream).flatten().tolist()
    truth = torch.stack([fdp.text_kernel(s.boxes, 64, 8, ratio=1.0) for s in scenes]).flatten().tolist()
    pairs = [(p, n) for p, t in zip(score, truth) if t for n, u in zip(score, truth) if not u]
    ref = sum((p > n) + 0.5 * (p == n) for p, n in pairs) / len(pairs)
    assert abs(fdp.focus_map_auc(f, scenes) - ref) < 1e-6
    with pytest.raises(ValueError, match="focus"):
        fdp.focus_map_auc(fdp.FDP(model, ["cat"], focus=False), scenes)
