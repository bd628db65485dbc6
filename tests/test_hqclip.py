"""HQ-CLIP's objective (:mod:`cliplab.objectives.hqclip`): short-tag classification (``clip+stc``) and hard-negative
identification (``hqclip``), and the synthetic source's hard-negative captions and exact tags that feed them."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
import torch.nn.functional as F

import cliplab
from cliplab.objectives.hqclip import HQCLIPLoss, caption_tags, clip_with_tag_classification
from cliplab.models import ConfigError
from cliplab.train import (BatchOutput, CLIPLoss, DataConfig, TrainConfig, Trainer, get_loss, list_losses,
                           synthetic_tags)
from cliplab.models.tokenizer import TruncationWarning
from cliplab.train.data import Batch

TAGS = ["circle", "cross", "red", "small", "dotted"]


def batch_output(texts: list[str], dim: int = 16, seed: int = 0) -> BatchOutput:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(len(texts), dim, generator=g), dim=-1)
    txt = F.normalize(torch.randn(len(texts), dim, generator=g), dim=-1)
    batch = Batch(step=0, indices=list(range(len(texts))), pixels=torch.zeros(0), ids=torch.zeros(0), texts=texts,
                  is_long=torch.zeros(len(texts), dtype=torch.bool), truncated=torch.zeros(len(texts), dtype=torch.bool))
    return BatchOutput(img, txt, torch.tensor(math.log(1 / 0.07)), batch)


class _Model(torch.nn.Module):  # what attach() reads of a model
    def __init__(self, embed_dim: int):
        super().__init__()
        self.config = type("Config", (), {"embed_dim": embed_dim})()


def attached(weight: float = 1.0, dim: int = 16, **kw) -> HQCLIPLoss:
    torch.manual_seed(0)
    loss = clip_with_tag_classification(TAGS, weight=weight, **kw)
    loss.attach(_Model(dim))
    return loss


def test_caption_tags_reads_whole_words_and_plurals():
    texts = ["Two crosses and a small RED circle.", "circles", "a circled crossbow", "three dotted stars", ""]
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]])
    assert torch.equal(caption_tags(texts, TAGS), expected.float())


def test_registered_and_validated():
    import subprocess
    import sys

    # a fresh interpreter that never imports cliplab.objectives finds the loss by name (registry discovery)
    code = "from cliplab.train import get_loss; print(type(get_loss('clip+stc', tags=['red'])).__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "HQCLIPLoss", out.stderr
    assert "clip+stc" in list_losses()
    alias = get_loss("clip+stc", tags=TAGS)
    assert isinstance(alias, HQCLIPLoss) and alias.hni_weight == 0 and not alias.uses_negatives
    for bad in ([], ["red", "Red"], ["two words"]):
        with pytest.raises(ValueError, match="tags must"):
            clip_with_tag_classification(bad)
    with pytest.raises(RuntimeError, match="attach"):
        clip_with_tag_classification(TAGS).tag_logits(torch.zeros(1, 4))


def test_clip_stc_is_hqclip_without_hni_and_passes_every_keyword():
    """``clip+stc`` is one way to say ``hqclip(hni_weight=0)``: the same keywords, the same defaults."""
    alias, direct = get_loss("clip+stc", tags=TAGS), HQCLIPLoss(TAGS, hni_weight=0.0)
    assert repr(alias) == repr(direct)  # extra_repr lists every setting (tags_from, weights, temperature)
    kw = dict(stc_weight=0.3, temperature=0.2, label_smoothing=0.1, tags_from="caption")
    loss = get_loss("clip+stc", tags=TAGS, **kw)
    assert (loss.stc_weight, loss.temperature, loss.contrastive.label_smoothing, loss.tags_from) == (
        0.3, 0.2, 0.1, "caption")
    assert get_loss("clip+stc", tags=TAGS, weight=2.5).stc_weight == 2.5  # the older spelling (shapes-tiny's preset)
    with pytest.raises(ValueError, match="not both"):
        get_loss("clip+stc", tags=TAGS, weight=1.0, stc_weight=1.0)
    with pytest.raises(ValueError, match="needs tags"):
        get_loss("clip+stc", tags=None)


def test_zero_weight_is_exactly_the_clip_loss():
    out = batch_output(["a red circle", "two crosses", "a small dotted circle"])
    loss, logs = attached(weight=0.0)(out)
    clip, _ = CLIPLoss()(out)
    assert torch.equal(loss, clip) and logs["stc"] > 0


def test_tag_term_matches_a_brute_force_binary_cross_entropy():
    texts = ["a red circle", "two crosses", "a small dotted circle", "four squares"]
    out = batch_output(texts)
    loss_fn = attached(weight=0.5, temperature=0.1)
    w, b = loss_fn.head.weight.detach(), loss_fn.head.bias.detach()
    total = 0.0
    for i, text in enumerate(texts):
        words = text.split()
        for j, tag in enumerate(TAGS):
            z = float(out.image_features[i] @ w[j]) / 0.1 + float(b[j])
            y = any(word in (tag, tag + "s", tag + "es") for word in words)
            total += -math.log(1 / (1 + math.exp(-z))) if y else -math.log(1 - 1 / (1 + math.exp(-z)))
    with torch.no_grad():
        loss, logs = loss_fn(out)
        clip, _ = CLIPLoss()(out)
    assert logs["stc"] == pytest.approx(total / len(texts), rel=1e-5)
    assert float(loss) == pytest.approx(float(clip) + 0.5 * total / len(texts), rel=1e-5)


def test_head_trains_and_resumes_exactly(tmp_path):
    """In the trainer: the head (a loss-module parameter, created by attach) is optimised, saved in checkpoints, and
    a resumed run reproduces the uninterrupted one's losses."""
    model = cliplab.get_config("test-tiny").to_dict()
    model["vision"].update(image_size=64, patch_size=16)
    model["preprocess"]["image_size"] = 64
    cfg = TrainConfig(model=model, batch_size=16, steps=4, lr=1e-3, warmup_steps=2, log_every=1, checkpoint_every=2,
                      keep_checkpoints=0, threads=1, progress=False, out_dir=str(tmp_path / "a"), seed=0,
                      loss="clip+stc", loss_kwargs={"tags": synthetic_tags()})
    full = Trainer(cfg)
    head0 = full.loss_fn.head.weight.detach().clone()
    torch.manual_seed(123)  # the global RNG's state must not matter: the head is seeded from the run's seed
    assert torch.equal(Trainer(cfg.replace(out_dir=str(tmp_path / "x"))).loss_fn.head.weight, head0)
    assert head0.shape == (len(synthetic_tags()), model["embed_dim"])
    result = full.fit()
    assert not torch.equal(full.loss_fn.head.weight.detach(), head0)  # trained
    half = tmp_path / "a" / "checkpoints" / "step-0000002"
    assert "head.weight" in torch.load(half / "state.pt", weights_only=True)["loss"]["state"]
    resumed = Trainer(cfg.replace(out_dir=str(tmp_path / "b"))).fit(resume=half)
    assert resumed.losses == result.losses[2:]  # exact: the head was restored with the optimiser
    other = cfg.replace(out_dir=str(tmp_path / "d"), loss_kwargs={"tags": synthetic_tags()[::-1]})
    with pytest.raises(ValueError, match="trained for tags"):  # same head shape, rows meaning other tags
        Trainer(other).load_checkpoint(half)


# --- hard-negative identification -----------------------------------------------------------------------------------
TEXTS = ["a red circle", "two crosses", "a small dotted circle", "four squares"]


def with_negatives(out: BatchOutput, rows: list[int], seed: int = 1) -> BatchOutput:
    g = torch.Generator().manual_seed(seed)
    neg = F.normalize(torch.randn(len(rows), out.image_features.shape[1], generator=g), dim=-1)
    out.batch.extras.update(negative_rows=torch.tensor(rows, dtype=torch.long),
                            negative_texts=[f"negative of {r}" for r in rows])
    return dataclasses.replace(out, negative_text_features=neg)


def test_hqclip_without_its_terms_is_exactly_the_clip_loss():
    out = batch_output(TEXTS)
    loss, logs = HQCLIPLoss(tags=None, hni_weight=0.0)(out)
    assert torch.equal(loss, CLIPLoss()(out)[0]) and "hni" not in logs and "stc" not in logs
    assert isinstance(get_loss("hqclip", tags=None), HQCLIPLoss)
    with pytest.raises(ValueError, match="weights must be >= 0"):
        HQCLIPLoss(hni_weight=-1.0)


def test_hard_negative_term_matches_a_brute_force_softmax():
    rows = [0, 2, 3]
    out = with_negatives(batch_output(TEXTS), rows)
    img, txt, neg = out.image_features, out.text_features, out.negative_text_features
    scale = 1 / 0.07
    total = 0.0
    for i in range(len(TEXTS)):  # each image against every caption and every negative of the batch
        z = [scale * float(img[i] @ c) for c in [*txt, *neg]]
        total += math.log(sum(math.exp(v) for v in z)) - z[i]
    wins = [float(img[r] @ txt[r]) > float(img[r] @ neg[k]) for k, r in enumerate(rows)]
    with torch.no_grad():
        loss, logs = HQCLIPLoss(tags=None, hni_weight=0.7)(out)
        clip, _ = CLIPLoss()(out)
    assert logs["hni"] == pytest.approx(total / len(TEXTS), rel=1e-5)
    assert float(loss) == pytest.approx(float(clip) + 0.7 * total / len(TEXTS), rel=1e-5)
    assert logs["hni_acc"] == pytest.approx(sum(wins) / len(wins))


def test_hard_negative_term_without_negatives_is_the_image_to_text_term():
    out = with_negatives(batch_output(TEXTS), [])
    for smoothing in (0.0, 0.1):
        _, logs = HQCLIPLoss(tags=None, label_smoothing=smoothing)(out)
        assert logs["hni"] == logs["loss_i2t"]  # no extra columns: the same cross-entropy
        assert "hni_acc" not in logs  # nothing to count (a NaN would spoil the log window's mean)
    with pytest.raises(ValueError, match="needs negative captions"):
        HQCLIPLoss(tags=None)(batch_output(TEXTS))  # a batch from a source without negatives


def test_tag_texts_from_the_source_replace_the_caption_words():
    tag_texts = ["small plain red circle", "medium striped blue cross large dotted green cross", "small dotted "
                 "yellow circle", "large plain red square"]
    out = batch_output(TEXTS)
    out.batch.extras["tag_texts"] = tag_texts
    caption_only = batch_output(tag_texts)  # same features (same seed), the tag texts as captions
    loss_fn = attached(tags_from="source")
    with torch.no_grad():
        assert loss_fn(out)[1]["stc"] == loss_fn(caption_only)[1]["stc"] != loss_fn(batch_output(TEXTS))[1]["stc"]
        # tags_from="caption" ignores the source's tags; clip+stc's default is hqclip's ("source")
        assert attached(tags_from="caption")(out)[1]["stc"] == attached()(batch_output(TEXTS))[1]["stc"]
        assert attached()(out)[1]["stc"] == loss_fn(out)[1]["stc"]
        hq = HQCLIPLoss(TAGS, hni_weight=0.0)
        torch.manual_seed(0)
        hq.attach(_Model(16))
        assert hq(out)[1]["stc"] == loss_fn(out)[1]["stc"]
    with pytest.raises(ValueError, match="tags_from"):
        HQCLIPLoss(TAGS, tags_from="image")


def _shape_words(text: str) -> tuple[list[str], list[str]]:
    """The text's words with every shape word (singular or plural) replaced by "SHAPE", and the shapes named."""
    from cliplab.data.synthetic.vocabulary import SHAPES

    forms = {f: s for s in SHAPES for f in (s, s + "s", s + "es")}
    words = re.findall(r"[a-z]+", text.lower())
    return [("SHAPE" if w in forms else w) for w in words], sorted({forms[w] for w in words if w in forms})


def tiny_model_config() -> dict:
    model = cliplab.get_config("test-tiny").to_dict()
    model["vision"].update(image_size=64, patch_size=16)
    model["preprocess"]["image_size"] = 64
    return model


def test_synthetic_source_gives_shape_negatives_of_the_caption_each_row_uses(tmp_path):
    cfg = TrainConfig(model=tiny_model_config(), data=DataConfig(caption="mix", options={"hard_negatives": ["shape"]}),
                      batch_size=32, steps=2, precision="fp32", threads=1, progress=False, out_dir=str(tmp_path),
                      loss="hqclip", loss_kwargs={"tags": None})
    trainer = Trainer(cfg)
    batch = trainer.batches[0]
    ex = batch.extras
    assert ex["negative_rows"].tolist() == list(range(32))  # every scene has a shape it can take
    assert batch.is_long.any() and not batch.is_long.all()
    for k, r in enumerate(ex["negative_rows"].tolist()):
        pos, neg = batch.texts[r], ex["negative_texts"][k]
        (pos_words, pos_shapes), (neg_words, neg_shapes) = _shape_words(pos), _shape_words(neg)
        assert pos_words == neg_words  # the same caption (short stays short, long stays long) ...
        assert pos_shapes != neg_shapes and len(set(neg_shapes) - set(pos_shapes)) == 1  # ... with one shape swapped
        scene = trainer.source.scene(batch.indices[r])
        assert set(neg_shapes) - set(pos_shapes) <= set(trainer.source.world.shapes) - {o.shape for o in scene.objects}
    with pytest.warns(TruncationWarning):  # long negatives are cut at 77 tokens, like their captions
        assert torch.equal(ex["negative_ids"], trainer.model.tokenizer(ex["negative_texts"]).ids)
    tags = ex["tag_texts"][0].split()
    scene = trainer.source.scene(batch.indices[0])
    assert sorted(tags) == sorted(w for o in scene.objects for w in (o.size, o.texture, o.colour, o.shape))
    fresh = Trainer(cfg.replace(out_dir=str(tmp_path / "fresh")))  # a pure function of the step (as on resume)
    assert fresh.batches[0].extras["negative_texts"] == ex["negative_texts"]
    # the trainer encodes captions and negatives in one call; each negative is encoded as on its own
    with torch.no_grad():
        out = trainer.forward(batch)
        alone = F.normalize(trainer.model.encode_text(ex["negative_ids"]), dim=-1)
    assert out.negative_text_features.shape == (32, trainer.model.config.embed_dim)
    torch.testing.assert_close(out.negative_text_features, alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="hard_negatives must be"):
        Trainer(cfg.replace(data={"options": {"hard_negatives": ["position"]}}))
    with pytest.raises(ValueError, match="num_negatives must be"):
        Trainer(cfg.replace(data={"options": {"hard_negatives": ["shape"], "num_negatives": 0}}))


@pytest.mark.parametrize("attribute,options", [("colour", {}), ("texture", {}), ("shape", {"shape_variants": 4})])
def test_no_negative_equals_a_caption_of_the_batch(tmp_path, attribute, options):
    """Long captions name colours in their last sentence, past token 77, so most of their colour negatives are cut to
    the caption itself; making a striped group plain only drops a word of a short caption ("two crosses" is still
    true); with shape variants, a shape-replaced caption can be another image's caption. Such negatives are dropped:
    an image is never asked to reject a text identical to a positive or less specific than its own caption."""
    from cliplab.train.data import _only_drops_words

    options = {"hard_negatives": [attribute], "num_negatives": 3, **options}
    cfg = TrainConfig(model=tiny_model_config(), data=DataConfig(caption="mix", options=options), batch_size=32,
                      steps=4, threads=1, progress=False, out_dir=str(tmp_path), loss="hqclip",
                      loss_kwargs={"tags": None}, sampler="sequential" if "shape_variants" in options else "random")
    trainer = Trainer(cfg)
    kept = 0
    for step in range(4):
        batch = trainer.batches[step]
        ex = batch.extras
        ids, rows = ex["negative_ids"], ex["negative_rows"]
        assert not (ids[:, None, :] == batch.ids[None]).all(-1).any()
        assert len({(int(r), tuple(i.tolist())) for r, i in zip(rows, ids)}) == len(rows)  # no repeats in a row
        assert not any(_only_drops_words(batch.texts[r], t) for r, t in zip(rows.tolist(), ex["negative_texts"]))
        kept += len(rows)
    assert kept > 32  # most rows keep negatives
    assert _only_drops_words("two striped crosses", "two crosses")
    assert not _only_drops_words("two striped crosses", "two dotted crosses")


def test_losses_that_need_negatives_get_them_and_others_do_not(tmp_path):
    cfg = TrainConfig(model=tiny_model_config(), data=DataConfig(caption="short", options={"hard_negatives": ["shape"]}),
                      batch_size=8, steps=1, threads=1, progress=False, out_dir=str(tmp_path))
    with torch.no_grad():
        assert Trainer(cfg).forward(Trainer(cfg).batches[0]).negative_text_features is None  # clip: not encoded
    with pytest.raises(ConfigError, match="needs hard-negative captions"):  # at construction, not at step 1
        Trainer(cfg.replace(data={"options": {}}, loss="hqclip", loss_kwargs={"tags": None}))
    assert not CLIPLoss().uses_negatives and not HQCLIPLoss(hni_weight=0).uses_negatives


def test_hard_negative_run_resumes_exactly(tmp_path):
    options = {"hard_negatives": ["shape", "colour"], "num_negatives": 2}
    cfg = TrainConfig(model=tiny_model_config(), data=DataConfig(caption="mix", options=options), batch_size=16,
                      steps=4, lr=1e-3, warmup_steps=2, log_every=1, checkpoint_every=2, keep_checkpoints=0,
                      threads=1, progress=False, out_dir=str(tmp_path / "a"), loss="hqclip",
                      loss_kwargs={"tags": synthetic_tags(), "hni_weight": 1.0})
    full = Trainer(cfg).fit()
    assert all("hni" in r and "hni_acc" in r for r in full.records)
    resumed = Trainer(cfg.replace(out_dir=str(tmp_path / "b"))).fit(
        resume=tmp_path / "a" / "checkpoints" / "step-0000002")
    assert resumed.losses == full.losses[2:]


def test_several_negatives_per_caption_and_only_for_short_captions(tmp_path):
    options = {"hard_negatives": ["shape", "colour"], "num_negatives": 3, "negatives_for": "short"}
    cfg = TrainConfig(model=tiny_model_config(), data=DataConfig(caption="mix", options=options), batch_size=32,
                      steps=1, threads=1, progress=False, out_dir=str(tmp_path))
    trainer = Trainer(cfg)
    batch = trainer.batches[0]
    rows = batch.extras["negative_rows"].tolist()
    short_rows = [r for r in range(32) if not batch.is_long[r]]
    assert rows == [r for r in short_rows for _ in range(3)]  # three per short caption, none for the long ones
    for r in short_rows:
        negatives = [t for t, row in zip(batch.extras["negative_texts"], rows) if row == r]
        assert len(set(negatives)) == 3 and batch.texts[r] not in negatives
        scene = trainer.source.scene(batch.indices[r])
        world = trainer.source.world
        options = {f.short_caption for a in ("shape", "colour") for f in world.attribute_replacements(scene, a)}
        assert set(negatives) <= options


# --- effect ----------------------------------------------------------------------------------------------------------
def test_tag_head_learns_to_name_held_out_colours(tmp_path):
    """Effect, on a tiny max-skip model (200 steps, ~30 s): the head trained only through the tag term reads the colour
    tag of held-out single-object images far above chance, where the same head before training is at chance. (The
    shape effect needs the full recipe: 31.8% -> 64.0% zero-shot shape, ``docs/methods/hqclip.md``.)"""
    import dataclasses

    from cliplab.data.synthetic import zero_shot_task
    from cliplab.data.synthetic.vocabulary import COLOURS

    cfg = cliplab.get_config("test-tiny")
    vision = dataclasses.replace(cfg.vision, image_size=64, patch_size=8, stem_channels=(8, 16, 32), stem_max_skip=True)
    model = cfg.replace(name="maxskip-tiny", vision=vision).to_dict()
    model["preprocess"]["image_size"] = 64
    tags = synthetic_tags()
    run = TrainConfig(model=model, data=DataConfig(source="synthetic", caption="short"), batch_size=64, steps=200,
                      lr=1e-3, warmup_steps=20, threads=1, progress=False, log_every=50, checkpoint_every=0,
                      keep_checkpoints=0, out_dir=str(tmp_path / "run"), seed=0, loss="clip+stc",
                      loss_kwargs={"tags": tags, "tags_from": "caption"})  # caption tags, as measured in the doc
    trainer = Trainer(run)
    task = zero_shot_task("colour", 25, seed=1)
    columns = [tags.index(c) for c in COLOURS]

    def colour_accuracy() -> float:
        with torch.no_grad():
            features = trainer.model.eval().encode_images(task.images, normalize=True)
            logits = trainer.loss_fn.tag_logits(features)[:, columns]
        return float((logits.argmax(1) == torch.tensor(task.labels)).float().mean())

    before = colour_accuracy()
    trainer.model.train()
    trainer.fit()
    after = colour_accuracy()
    assert before < 0.3 and after > 0.8, (before, after)


def test_hard_negative_identification_teaches_the_attribute_its_negatives_change(tmp_path):
    """Effect, on a tiny max-skip model (two 400-step runs of batch 32): trained with texture negatives (HNI only, no
    tags), the model prefers held-out scenes' own captions over their texture-replaced ones far more often than the
    same loss without negatives, which can tell a batch's captions apart by shape and colour and so learns little
    texture."""
    import numpy as np

    from cliplab.data.synthetic import SceneWorld

    attribute = "texture"
    cfg = cliplab.get_config("test-tiny")
    vision = dataclasses.replace(cfg.vision, image_size=64, patch_size=8, stem_channels=(8, 16, 32), stem_max_skip=True)
    model = cfg.replace(name="maxskip-tiny", vision=vision).to_dict()
    model["preprocess"]["image_size"] = 64
    world = SceneWorld(image_size=64, seed=1)  # held out: training streams draw from seed 0
    pairs = []
    for i in range(300):
        scene = world.sample(i)
        foil = world.replace_attribute(scene, attribute, np.random.default_rng(i))
        if foil is not None and foil.short_caption != scene.short_caption:
            pairs.append((scene.image, scene.short_caption, foil.short_caption))
    assert len(pairs) > 150

    def preference(name: str, loss: str, loss_kwargs: dict, options: dict) -> float:
        run = TrainConfig(model=model, data=DataConfig(source="synthetic", caption="short", options=options),
                          batch_size=32, steps=400, lr=2e-3, warmup_steps=20, threads=1, progress=False,
                          log_every=50, checkpoint_every=0, keep_checkpoints=0, out_dir=str(tmp_path / name),
                          seed=0, loss=loss, loss_kwargs=loss_kwargs)
        trainer = Trainer(run)
        trainer.fit()
        m = trainer.model.eval()
        with torch.no_grad():
            img = m.encode_images([p[0] for p in pairs], normalize=True)
            own = m.encode_texts([p[1] for p in pairs], normalize=True)
            foil = m.encode_texts([p[2] for p in pairs], normalize=True)
        return float(((img * own).sum(1) > (img * foil).sum(1)).float().mean())

    # the control has HNI's term without negatives (short captions, negatives only for long ones): the same doubled
    # image-to-text cross-entropy, so the difference is the negatives' own
    control = preference("control", "hqclip", {"tags": None}, {"hard_negatives": [attribute], "negatives_for": "long"})
    hni = preference("hni", "hqclip", {"tags": None}, {"hard_negatives": [attribute], "num_negatives": 3})
    print(f"held-out preference for the true {attribute}: control {control:.3f}, with negatives {hni:.3f}")
    assert hni > control + 0.1, (control, hni)


def test_doc_example_runs():
    from conftest import REPO

    text = (REPO / "docs" / "methods" / "hqclip.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    exec(compile(blocks[0], "docs/methods/hqclip.md", "exec"), {})
