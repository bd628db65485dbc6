"""GRAIN (cliplab.zeroshot.grain, cliplab.zeroshot.matching): the descriptor-sentence rules, the Hungarian matcher
against brute force, box-op closed forms, the losses' matching invariance, keywords reaching the core, the doc's
example, and a short from-scratch run against the CLIP-only control (same data, steps and seed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cliplab.data.synthetic import SceneWorld
from cliplab.zeroshot import grain as G
from cliplab.zeroshot import matching as M

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods" / "grain.md"


# ---------------------------------------------------------------------------------------------- descriptor sentences


@pytest.mark.parametrize("descriptor, sentence", [
    ("a long beak", "which is a long beak"),
    ("an orange breast", "which is an orange breast"),
    ("antennae on its head", "which is antennae on its head"),  # the official code's string-prefix quirk
    ("used for cutting", "which is used for cutting"),
    ("has a red circle", "which has a red circle"),
    ("often found in water", "which often found in water"),
    ("typically grey", "which typically grey"),
    ("may have stripes", "which may have stripes"),
    ("can fly", "which can fly"),
    ("red wings", "which has red wings"),
    ("black and white feathers", "which has black and white feathers"),
])
def test_descriptor_sentence_follows_the_papers_rules(descriptor, sentence):
    assert G.make_descriptor_sentence(descriptor) == sentence


def test_strict_articles_tests_whole_words_only():
    assert G.make_descriptor_sentence("antennae", strict_articles=True) == "which has antennae"
    assert G.make_descriptor_sentence("a beak", strict_articles=True) == "which is a beak"
    assert G.make_descriptor_sentence("an eye", strict_articles=True) == "which is an eye"


def _fake_encoder(dim: int = 16):
    """Deterministic text -> vector (a seeded random vector per string): a stand-in text tower for exact checks."""
    def encode(texts):
        rows = []
        for t in texts:
            g = torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(t)) % (2**31))
            rows.append(torch.randn(dim, generator=g) * 3)
        return torch.stack(rows)
    return encode


def test_class_embeddings_are_the_mean_of_normalised_description_prompts():
    enc = _fake_encoder()
    templates = ("a photo of a {}.", "a {}.")
    descs = [["has a red circle", "a blue square"], ["green wings"]]
    w = G.class_text_embeddings(enc, ["zorp", "dax"], descs, templates)
    prompts0 = ["a photo of a zorp. which has a red circle", "a photo of a zorp. which is a blue square",
                "a zorp. which has a red circle", "a zorp. which is a blue square"]
    assert G.description_prompts("zorp", descs[0], templates) == prompts0
    assert torch.allclose(w[0], F.normalize(enc(prompts0), dim=-1).mean(0), atol=1e-6)
    assert torch.allclose(w[1], F.normalize(enc(["a photo of a dax. which has green wings",
                                                 "a dax. which has green wings"]), dim=-1).mean(0), atol=1e-6)
    plain = G.class_text_embeddings(enc, ["zorp"], None, templates, renormalize=True)
    assert torch.allclose(plain[0], F.normalize(F.normalize(enc(["a photo of a zorp.", "a zorp."]), dim=-1).mean(0),
                                                dim=0), atol=1e-6)
    strict = G.class_text_embeddings(enc, ["x"], [["antennae"]], ("{}",), strict_articles=True)
    assert torch.allclose(strict[0], F.normalize(enc(["x which has antennae"]), dim=-1)[0], atol=1e-6)
    with pytest.raises(ValueError, match="descriptor lists"):
        G.class_text_embeddings(enc, ["a", "b"], [["x"]])


# ---------------------------------------------------------------------------------------------- matcher and box ops


def _random_boxes(n: int, g: torch.Generator) -> torch.Tensor:
    c = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
    return torch.cat([c, wh], dim=-1)


def test_hungarian_matcher_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        q, t = 5, 1 + trial % 5
        pred, tgt = _random_boxes(q, g), _random_boxes(t, g)
        cost = M.match_cost(pred, tgt)
        i, j = M.hungarian_match(pred, tgt)
        bi, bj, best = M.brute_force_match(cost)
        assert len(i) == t and sorted(j.tolist()) == list(range(t))
        assert abs(float(cost[i, j].sum()) - best) < 1e-5
        assert torch.equal(i, bi) and torch.equal(j, bj)  # random costs: the optimum is unique


def test_match_cost_is_5_l1_minus_2_giou_without_class_term():
    g = torch.Generator().manual_seed(1)
    pred, tgt = _random_boxes(4, g), _random_boxes(3, g)
    for a in range(4):
        for b in range(3):
            giou = M.generalized_box_iou(M.box_cxcywh_to_xyxy(pred[a:a + 1]), M.box_cxcywh_to_xyxy(tgt[b:b + 1]))[0, 0]
            ref = 5 * (pred[a] - tgt[b]).abs().sum() - 2 * giou
            assert abs(float(M.match_cost(pred, tgt)[a, b] - ref)) < 1e-5
    assert torch.allclose(M.match_cost(pred, tgt, cost_l1=1, cost_giou=0), torch.cdist(pred, tgt, p=1))


def test_box_ops_closed_forms():
    g = torch.Generator().manual_seed(2)
    b = _random_boxes(6, g)
    assert torch.allclose(M.box_xyxy_to_cxcywh(M.box_cxcywh_to_xyxy(b)), b, atol=1e-6)
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert torch.allclose(M.generalized_box_iou(a, a), torch.ones(1, 1))
    # disjoint unit boxes one apart: IoU 0, enclosing 3, union 2 -> -1/3
    assert torch.allclose(M.generalized_box_iou(a, torch.tensor([[2.0, 0.0, 3.0, 1.0]])), torch.tensor([[-1 / 3]]))
    # nested: IoU = 1/4 and the enclosing box is the union
    assert torch.allclose(M.generalized_box_iou(torch.tensor([[0.0, 0.0, 2.0, 2.0]]), a), torch.tensor([[0.25]]))
    assert torch.allclose(M.box_iou(a, torch.tensor([[0.5, 0.0, 1.5, 1.0]]))[0], torch.tensor([[1 / 3]]))
    with pytest.raises(ValueError, match="cxcywh"):
        M.generalized_box_iou(torch.tensor([[1.0, 1.0, 0.0, 0.0]]), a)


# ---------------------------------------------------------------------------------------------- losses


def _fake_output(b=3, r=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    boxes = torch.stack([_random_boxes(r, g) for _ in range(b)])
    return G.GrainOutput(boxes, torch.randn(b, r, d, generator=g), torch.randn(b, d, generator=g), [boxes])


def test_losses_invariant_to_region_query_order_and_zero_on_perfect_boxes():
    out = _fake_output()
    g = torch.Generator().manual_seed(5)
    targets = [out.boxes[0, [3, 1]] + 0.01, out.boxes[1, [0]], _random_boxes(4, g)]
    ids = [torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([3, 0, 4, 1])]
    desc, caps, scale = torch.randn(5, 8, generator=g), torch.randn(3, 8, generator=g), torch.tensor(10.0)
    base = G.grain_losses(out, caps, targets, ids, desc, scale)
    perm = torch.tensor([4, 2, 0, 3, 1])
    shuffled = G.GrainOutput(out.boxes[:, perm], out.region_embeds[:, perm], out.image_embeds, [out.boxes[:, perm]])
    again = G.grain_losses(shuffled, caps, targets, ids, desc, scale)
    for k in ("clip", "box", "region", "loss"):
        assert abs(float(base[k] - again[k])) < 1e-5, k
    exact = [out.boxes[b, [4, 2]] for b in range(3)]
    indices = [M.hungarian_match(p, t) for p, t in zip(out.boxes, exact)]
    assert float(G.box_loss(out.boxes, exact, indices)) < 1e-6
    assert all(i.tolist() == [2, 4] and j.tolist() == [1, 0] for i, j in indices)


def test_box_and_region_losses_by_hand():
    out = _fake_output(b=2, r=3, d=4, seed=3)
    targets = [out.boxes[0, [1]] + torch.tensor([0.02, -0.01, 0.03, 0.0]), out.boxes[1, [0, 2]]]
    indices = [(torch.tensor([1]), torch.tensor([0])), (torch.tensor([0, 2]), torch.tensor([0, 1]))]
    src = torch.cat([out.boxes[0, [1]], out.boxes[1, [0, 2]]])
    tgt = torch.cat(targets)
    giou = torch.diagonal(M.generalized_box_iou(M.box_cxcywh_to_xyxy(src), M.box_cxcywh_to_xyxy(tgt)))
    ref = ((src - tgt).abs().sum() + (1 - giou).sum()) / 3
    assert abs(float(G.box_loss(out.boxes, targets, indices) - ref)) < 1e-6
    desc = torch.randn(3, 4, generator=torch.Generator().manual_seed(9))
    ids = [torch.tensor([2]), torch.tensor([0, 1])]
    regions = torch.cat([out.region_embeds[0, [1]], out.region_embeds[1, [0, 2]]])
    logits = 7.0 * F.normalize(regions, dim=-1) @ F.normalize(desc, dim=-1).T
    ref = F.cross_entropy(logits, torch.tensor([2, 0, 1]))
    got = G.region_description_loss(out.region_embeds, indices, ids, desc, torch.tensor(7.0))
    assert abs(float(got - ref)) < 1e-6
    img, txt = torch.randn(4, 6), torch.randn(4, 6)
    lg = 3.0 * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    ref = (F.cross_entropy(lg, torch.arange(4)) + F.cross_entropy(lg.T, torch.arange(4))) / 2
    assert abs(float(G.clip_loss(img, txt, torch.tensor(3.0)) - ref)) < 1e-6


def test_region_annotations_are_the_scenes_exact_boxes():
    scene = SceneWorld(64, seed=0).sample(3)
    boxes, descs = G.region_annotations(scene)
    assert len(descs) == len(boxes) <= 5
    x0, y0, x1, y1 = M.box_cxcywh_to_xyxy(boxes[0]).mul(64).round().tolist()
    ox0, oy0, ox1, oy1 = scene.objects[0].box
    assert (x0, y0, x1, y1) == (max(0, ox0), max(0, oy0), min(64, ox1), min(64, oy1))
    o = scene.objects[0]
    assert descs[0].endswith(f"{o.colour} {o.shape}" if o.texture == "plain" else f"{o.colour} {o.texture} {o.shape}")


# ---------------------------------------------------------------------------------------------- the model and training


@pytest.fixture(scope="module")
def small():
    data = G.build_grain_data(192, SceneWorld(64, seed=0))
    held = G.build_grain_data(48, SceneWorld(64, seed=0), offset=500_000)
    return data, held


@pytest.fixture(scope="module")
def trained(small):
    data, _ = small
    cfg = G.GrainConfig(steps=30, batch_size=16, train_scenes=192, warmup_steps=5, dropout=0.0)
    grain, grain_hist = G.train_grain(cfg, data=data)
    control, control_hist = G.train_grain(cfg.control(), data=data)
    return grain, grain_hist, control, control_hist


@torch.no_grad()
def _heldout_losses(model, held) -> dict:
    """GRAIN's box and region-description losses of ``model`` on held-out scenes (its own text tower)."""
    used = sorted({d for ids in held.description_ids for d in ids})
    desc = model.encode_texts([held.descriptions[d] for d in used])
    row = {d: r for r, d in enumerate(used)}
    ids = [torch.tensor([row[d] for d in ds]) for ds in held.description_ids]
    caps = model.encode_texts(held.captions)
    terms = G.grain_losses(model(held.pixels), caps, held.boxes, ids, desc, model.logit_scale.exp())
    return {k: float(v) for k, v in terms.items()}


def test_global_query_is_the_image_embedding(small):
    data, _ = small
    model = G.new_grain_model(G.GrainConfig(dropout=0.0)).eval()
    px = data.pixels[:3]
    with torch.no_grad():
        out = model(px)
        assert out.boxes.shape == (3, 5, 4) and out.region_embeds.shape == (3, 5, 64)
        assert ((out.boxes > 0) & (out.boxes < 1)).all()
        assert torch.equal(model.encode_image(px), out.image_embeds)
        # the decoder's memory is the tower's patch tokens after ln_post and the projection, CLS dropped
        tokens = model.clip.encode_image(px, output="tokens").tokens
        assert torch.equal(model.patch_tokens(px), tokens[:, 1:])
        # one image's outputs do not depend on the other images of the batch
        assert torch.allclose(model(px[1:2]).image_embeds, out.image_embeds[1:2], atol=1e-5)


def test_save_and_load_round_trip(tmp_path, small):
    data, _ = small
    model = G.new_grain_model(G.GrainConfig(decoder_layers=1, num_regions=3, dropout=0.0)).eval()
    back = G.load_grain(model.save(tmp_path / "m"))
    with torch.no_grad():
        a, b = model(data.pixels[:2]), back(data.pixels[:2])
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.image_embeds, b.image_embeds)
    assert back.head.num_regions == 3 and len(back.head.layers) == 1
    with pytest.raises(FileNotFoundError, match="GrainModel.save"):
        G.load_grain(tmp_path)
    # the classifier path: GRAIN's class weights, the global query as image features, keywords passed through
    task = G.part_class_task(n_per_class=1)
    clf = G.grain_classifier(back, task.classnames, task.descriptors, templates=("{}",), renormalize=True,
                             strict_articles=True)
    ref = G.class_text_embeddings(back.encode_texts, task.classnames, task.descriptors, ("{}",), True, True)
    assert torch.allclose(clf.weights, ref, atol=1e-6)
    top = clf.classify(task.pixels[:2], topk=1)
    with torch.no_grad():
        expect = (back.encode_image(task.pixels[:2], normalize=True) @ ref.T).argmax(-1)
    assert [task.classnames.index(r[0][0]) for r in top] == expect.tolist()


def test_decoder_layout_region_queries_first_global_query_last():
    """The official layout: queries ``0..R-1`` are regions (boxes through the sigmoid MLP, embeddings through
    ``obj_proj``), query ``R`` is global (``img_proj``); memory is LN(W_in tokens); every output after the final LN."""
    torch.manual_seed(0)
    head = G.QueryDecoderHead(feature_dim=12, embed_dim=10, width=16, heads=2, layers=2, num_regions=3,
                              dropout=0.0).eval()
    tokens = torch.randn(2, 7, 12)
    with torch.no_grad():
        memory = head.memory_norm(tokens @ head.input_proj.weight.T)
        x = torch.zeros(2, 4, 16)
        pos = head.query_embed.expand(2, -1, -1)
        for layer in head.layers:
            x = layer(x, memory, pos)
        h = head.norm(x)
        out = head(tokens)
    assert torch.allclose(out.image_embeds, h[:, 3] @ head.img_proj, atol=1e-6)
    assert torch.allclose(out.region_embeds, h[:, :3] @ head.obj_proj, atol=1e-6)
    assert torch.allclose(out.boxes, head.box_head(h[:, :3]).sigmoid(), atol=1e-6)
    assert len(out.layer_boxes) == 2 and torch.equal(out.layer_boxes[-1], out.boxes)


def test_grain_losses_fall_and_beat_the_control(trained, small):
    """30 steps of batch 16: the box and region-description losses fall, and on held-out scenes GRAIN's boxes fit
    better than the control's (same architecture, data, batches and seed, CLIP loss only). After 30 steps the region
    loss does not yet generalise (held-out 4.33 vs 4.41, chance ~4.4), and box IoU and the zero-shot comparison need
    longer runs: experiments/grain_effect.py."""
    grain, gh, control, ch = trained
    _, held = small
    assert gh.mean("box", last=6) < gh.mean("box", first=6) - 0.15
    assert gh.mean("region", last=6) < gh.mean("region", first=6) - 0.3
    assert "box" not in ch.terms[0] and "region" not in ch.terms[0]
    assert ch.terms[0]["clip"] == pytest.approx(gh.terms[0]["clip"], abs=1e-5)  # same init and first batch
    g, c = _heldout_losses(grain, held), _heldout_losses(control, held)
    assert g["box"] < c["box"] - 0.1, (g, c)  # measured 1.89 vs 2.11


def test_keywords_reach_the_core(monkeypatch, small):
    data, held = small
    seen: dict = {}
    real_losses, real_match = G.grain_losses, G.hungarian_match

    def spy_losses(*args, **kwargs):
        seen["losses"] = kwargs
        return real_losses(*args, **kwargs)

    def spy_match(pred, tgt, cost_l1=5.0, cost_giou=2.0):
        seen.setdefault("match", set()).add((cost_l1, cost_giou))
        return real_match(pred, tgt, cost_l1, cost_giou)

    monkeypatch.setattr(G, "grain_losses", spy_losses)
    monkeypatch.setattr(G, "hungarian_match", spy_match)
    cfg = G.GrainConfig(steps=1, batch_size=4, train_scenes=8, clip_weight=0.5, box_weight=2.0, region_weight=3.0,
                        cost_l1=4.0, cost_giou=7.0, aux_loss=True, decoder_layers=3, decoder_heads=2,
                        decoder_width=32, num_regions=6, dropout=0.0)
    model, _ = G.train_grain(cfg, data=data)
    assert seen["losses"] == {"clip_weight": 0.5, "box_weight": 2.0, "region_weight": 3.0, "cost_l1": 4.0,
                              "cost_giou": 7.0, "aux_loss": True}
    assert seen["match"] == {(4.0, 7.0)}
    head = model.head
    assert len(head.layers) == 3 and head.num_regions == 6 and head.query_embed.shape == (7, 32)
    assert head.layers[0].self_attn.num_heads == 2
    seen.clear()
    G.box_mean_iou(model, held, cost_l1=1.5, cost_giou=0.5)
    assert seen["match"] == {(1.5, 0.5)}

    captured = {}

    def spy_weights(encode, classnames, descriptors=None, templates=G.DEFAULT_TEMPLATES, renormalize=False,
                    strict_articles=False):
        captured.update(descriptors=descriptors, templates=templates, renormalize=renormalize,
                        strict_articles=strict_articles)
        return torch.randn(len(classnames), 64)

    monkeypatch.setattr(G, "class_text_embeddings", spy_weights)
    task = G.part_class_task(n_per_class=2)
    G.zero_shot_accuracy(model, task, descriptions=False, templates=("{}",), renormalize=True, strict_articles=True)
    assert captured == {"descriptors": None, "templates": ("{}",), "renormalize": True, "strict_articles": True}
    G.zero_shot_accuracy(model, task)
    assert captured["descriptors"] == task.descriptors and captured["templates"] == G.DEFAULT_TEMPLATES


def test_preset_runner_passes_options_and_saves(monkeypatch, tmp_path, small):
    data, _ = small
    seen = {}
    real = G.train_grain

    def spy(config, **kwargs):
        seen["config"] = config
        return real(config, data=data, **kwargs)

    monkeypatch.setattr(G, "train_grain", spy)
    summary = G.run_grain_preset("grain-tiny", tmp_path / "run", control=True, n_per_class=1, heldout=4, steps=2,
                                 batch_size=4, decoder_layers=1, seed=3)
    cfg = seen["config"]
    assert (cfg.steps, cfg.batch_size, cfg.decoder_layers, cfg.seed, cfg.box_weight, cfg.region_weight) == \
        (2, 4, 1, 3, 0.0, 0.0)
    assert summary["control"] and summary["steps"] == 2 and 0 <= summary["zero_shot_descriptions"] <= 1
    assert len(G.load_grain(summary["out"]).head.layers) == 1
    with pytest.raises(ValueError, match="unknown GRAIN preset"):
        G.run_grain_preset("grain-huge")
    with pytest.raises(TypeError, match="unexpected keyword"):
        G.run_grain_preset(stepz=3)


def test_coarse_captions_drop_colours_and_the_caption_option_reaches_the_data(monkeypatch):
    assert G.coarse_caption("a small red circle to the left of two blue squares") == \
        "a small circle to the left of two squares"
    data = G.build_grain_data(6, caption="no-colour")
    full = G.build_grain_data(6)
    assert data.descriptions == full.descriptions and data.captions == [G.coarse_caption(c) for c in full.captions]
    assert data.captions != full.captions
    with pytest.raises(ValueError, match="caption must be"):
        G.build_grain_data(2, caption="long")
    seen = {}

    class Stop(Exception):
        pass

    def spy(n, world=None, offset=0, max_boxes=5, caption="short"):
        seen.update(n=n, seed=world.seed, caption=caption)
        raise Stop

    monkeypatch.setattr(G, "build_grain_data", spy)
    with pytest.raises(Stop):
        G.train_grain(G.GrainConfig(train_scenes=40, world_seed=7, caption="no-colour"))
    assert seen == {"n": 40, "seed": 7, "caption": "no-colour"}


def test_aux_loss_adds_every_earlier_layers_matched_box_loss():
    out = _fake_output(b=2, r=4, d=8, seed=4)
    g = torch.Generator().manual_seed(6)
    earlier = torch.stack([_random_boxes(4, g) for _ in range(2)])
    out.layer_boxes = [earlier, out.boxes]
    targets = [_random_boxes(2, g), _random_boxes(3, g)]
    ids = [torch.tensor([0, 1]), torch.tensor([2, 0, 1])]
    args = (out, torch.randn(2, 8), targets, ids, torch.randn(3, 8), torch.tensor(5.0))
    plain = G.grain_losses(*args)
    aux = G.grain_losses(*args, aux_loss=True)
    extra = G.box_loss(earlier, targets, [M.hungarian_match(p, t) for p, t in zip(earlier, targets)])
    assert abs(float(aux["box"] - plain["box"] - extra)) < 1e-5
    assert abs(float(aux["region"] - plain["region"])) < 1e-6  # the region loss uses the last layer's matching


def test_part_class_task_images_show_exactly_their_parts():
    task = G.part_class_task(n_per_class=3)
    assert task.classnames == ["zorp", "blick", "dax", "wug", "fep", "toma"] and task.pixels.shape == (18, 3, 64, 64)
    assert task.descriptors[0] == ["has a red circle", "has a blue square"]
    assert G.description_prompts("zorp", task.descriptors[0], ("a photo of a {}.",))[0] == \
        "a photo of a zorp. which has a red circle"
    assert task.labels.bincount().tolist() == [3] * 6


def test_doc_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert blocks, "docs/methods/grain.md has no python example"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)
    assert 0.0 <= namespace["accuracy"] <= 1.0


def test_cli_train_preset_grain_tiny(tmp_path):
    """``cliplab train --preset grain-tiny`` trains, saves a loadable model and reports its figures; --set keys reach
    the preset; flags that do not apply are refused."""
    import json

    from click.testing import CliRunner

    from cliplab.cli import main
    from cliplab.zeroshot.grain import load_grain

    out = tmp_path / "grain"
    args = ["train", "--preset", "grain-tiny", "--steps", "2", "--set", "n_per_class=1", "--set", "heldout=4",
            "--set", "batch_size=8", "-o", str(out), "--json"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 2 and summary["out"] == str(out) and 0.0 <= summary["box_mean_iou"] <= 1.0
    assert load_grain(out) is not None
    listed = CliRunner().invoke(main, ["train", "--list-presets"], catch_exceptions=False)
    assert "grain-tiny" in listed.output
    refused = CliRunner().invoke(main, ["train", "--preset", "grain-tiny", "--data", "x.csv"])
    assert refused.exit_code == 2 and "--data" in refused.output
    unknown = CliRunner().invoke(main, ["train", "--preset", "grain-tiny", "--set", "nonsense=1", "-o", str(out)])
    assert unknown.exit_code == 2 and "--set" in unknown.output
