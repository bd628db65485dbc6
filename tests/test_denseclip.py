"""DenseCLIP (cliplab.dense.denseclip): exact properties of the prompting, the decoder's gate, the score maps and the
losses; saving; every keyword reaching the core; and the effect of the score-map loss + context prompting against a
same-compute control on the shipped model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cliplab
from cliplab.dense import SyntheticSegmentation
from cliplab.dense.denseclip import (DenseCLIPConfig, DenseCLIPSegmenter, dense_features, encode_segmentation,
                                     evaluate_segmenter, fit_denseclip, score_map)
from cliplab.models import CheckpointError


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


@pytest.fixture(scope="module")
def clip():
    return cliplab.load("shapes-tiny")


@pytest.fixture(scope="module")
def shapes():
    return SyntheticSegmentation(n=8, offset=500, by="shape")


@pytest.fixture(scope="module")
def feats(clip, shapes):
    with torch.no_grad():
        return dense_features(clip, clip.preprocessor.batch([s.image for s in shapes]))


def _seg(clip, classes, **kw):
    torch.manual_seed(0)
    return DenseCLIPSegmenter(clip, DenseCLIPConfig(classes, **kw)).eval()


# --- exact properties -----------------------------------------------------------------------------------------------
def test_gamma_zero_gives_the_plain_prompt_embeddings_bit_for_bit(clip, shapes, feats):
    template = "a photo of a {}."
    seg = _seg(clip, shapes.classes, n_ctx=0, template=template)
    g, z, _ = feats
    plain = clip.encode_text(clip.tokenize([template.format(c) for c in shapes.classes])).float()
    with torch.no_grad():
        t = seg.text_embeddings()
        assert torch.equal(t, plain)
        update = seg.decoder(t.expand(len(z), -1, -1), torch.cat([g[:, None], z], 1))
        assert update.abs().min() > 0  # the decoder does say something: the gate is what keeps it out
        at_init = seg.contextual_text(t, g, z)
        assert not torch.equal(at_init, plain.expand_as(at_init))
        assert (at_init - plain).abs().max() < 1e-3  # gamma = 1e-4: a small nudge at the start
        seg.gamma.zero_()
        assert torch.equal(seg.contextual_text(t, g, z), plain.expand(len(z), -1, -1))


def test_gamma_zero_with_context_tokens_gives_t(clip, shapes, feats):
    seg = _seg(clip, shapes.classes, n_ctx=4)
    g, z, _ = feats
    with torch.no_grad():
        seg.gamma.zero_()
        t = seg.text_embeddings()
        assert torch.equal(seg.contextual_text(t, g, z), t.expand(len(z), -1, -1))


def test_gamma_is_per_channel_and_initialised_as_configured(clip, shapes):
    seg = _seg(clip, shapes.classes, gamma_init=3e-3)
    assert seg.gamma.shape == (clip.config.embed_dim,) and torch.all(seg.gamma == torch.tensor(3e-3))


def test_context_tokens_sit_at_positions_1_to_n_and_the_eot_moves(clip, shapes):
    n = 3
    seg = _seg(clip, shapes.classes, n_ctx=n)
    ids = clip.tokenize(list(shapes.classes)).ids
    eot = clip.text.eot_index(ids)
    ids = ids[:, : int(eot.max()) + 1]
    with torch.no_grad():
        embeds, shifted = seg.prompt_embeddings()
        tok = clip.text.token_embed(ids)
        assert torch.equal(embeds[:, 0], tok[:, 0])  # SOT stays first
        assert torch.equal(embeds[:, 1 : 1 + n], seg.ctx.expand(len(ids), -1, -1))
        assert torch.equal(embeds[:, 1 + n :], tok[:, 1:])
        assert torch.equal(shifted, eot + n)
        # context vectors equal to real words' embeddings make the prompt that sentence: the tower pools at the
        # moved EOT and reads the context in its place
        words = clip.tokenize(["a photo of"]).ids[0, 1:4]
        seg.ctx.copy_(clip.text.token_embed(words))
        sentence = clip.encode_text(clip.tokenize([f"a photo of {c}" for c in shapes.classes])).float()
        torch.testing.assert_close(seg.text_embeddings(), sentence, rtol=0, atol=1e-5)


def test_too_many_context_tokens_is_a_clear_error(clip, shapes):
    with pytest.raises(ValueError, match="context length"):
        DenseCLIPSegmenter(clip, DenseCLIPConfig(shapes.classes, n_ctx=75))


def test_score_map_is_the_cosine_by_hand():
    g = torch.Generator().manual_seed(0)
    z, text = torch.randn(2, 6, 5, generator=g), torch.randn(2, 4, 5, generator=g)
    s = score_map(z, text, (2, 3))
    assert s.shape == (2, 4, 2, 3)
    for b in range(2):
        for k in range(4):
            for n in range(6):
                cos = float(z[b, n] @ text[b, k] / (z[b, n].norm() * text[b, k].norm()))
                assert abs(float(s[b, k, n // 3, n % 3]) - cos) < 1e-6
    # a shared [K, D] text is the same as repeating it per image
    assert torch.equal(score_map(z, text[0], (2, 3)), score_map(z, text[0].expand(2, -1, -1), (2, 3)))


def test_forward_score_maps_are_patch_text_cosines(clip, shapes, feats):
    seg = _seg(clip, shapes.classes)
    g, z, grid = feats
    with torch.no_grad():
        out = seg.forward_features(g, z, grid)
        text = seg.contextual_text(seg.text_embeddings(), g, z)
    hand = torch.einsum("bnd,bkd->bkn", F.normalize(z, dim=-1), F.normalize(text, dim=-1)).reshape(out.score.shape)
    torch.testing.assert_close(out.score, hand, rtol=0, atol=1e-6)
    assert out.logits.shape == (len(z), len(shapes.classes), *grid) == out.score.shape


def test_loss_is_head_ce_plus_weighted_score_ce(clip, shapes, feats):
    g, z, grid = feats
    labels = torch.from_numpy(np.stack([s.label for s in shapes]))
    labels[:, :3] = 255  # ignored pixels count nowhere
    seg = _seg(clip, shapes.classes, aux_weight=0.3, tau=0.05)
    with torch.no_grad():
        out = seg.forward_features(g, z, grid)
        total, parts = seg.loss(out, labels)
    up = dict(size=labels.shape[-2:], mode="bilinear", align_corners=False)
    head = F.cross_entropy(F.interpolate(out.logits, **up), labels, ignore_index=255)
    aux = F.cross_entropy(F.interpolate(out.score / 0.05, **up), labels, ignore_index=255)
    torch.testing.assert_close(total, head + 0.3 * aux)
    assert parts["head"] == pytest.approx(float(head)) and parts["aux"] == pytest.approx(float(aux))
    no_aux = _seg(clip, shapes.classes, aux_weight=0.0)
    with torch.no_grad():
        out = no_aux.forward_features(g, z, grid)
        total, parts = no_aux.loss(out, labels)
    assert "aux" not in parts
    torch.testing.assert_close(total, F.cross_entropy(F.interpolate(out.logits, **up), labels, ignore_index=255))


def test_without_score_concat_the_head_sees_only_z(clip, shapes, feats):
    seg = _seg(clip, shapes.classes, score_concat=False)
    assert seg.head[0].in_channels == clip.config.embed_dim
    full = _seg(clip, shapes.classes)
    assert full.head[0].in_channels == clip.config.embed_dim + len(shapes.classes)


def test_resnet_through_its_tokens_view():
    torch.manual_seed(0)
    rn = cliplab.create_model("test-tiny-resnet")
    data = SyntheticSegmentation(n=6, offset=0, by="colour")
    pixels = rn.preprocessor.batch([s.image for s in data])
    seg = fit_denseclip(rn, data, steps=2, batch_size=3, n_ctx=2)
    with torch.no_grad():
        out = seg(pixels)
        tokens = rn.encode_image(pixels, output="tokens").tokens
        text = seg.contextual_text(seg.text_embeddings(), tokens[:, 0], tokens[:, 1:])
    assert out.score.shape == (6, len(data.classes), 2, 2)
    torch.testing.assert_close(out.score, score_map(tokens[:, 1:], text, (2, 2)), rtol=0, atol=1e-6)
    assert seg.predict(pixels).shape == (6, 64, 64)


# --- saving and the command line -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory, shapes):
    clip = cliplab.load("shapes-tiny")
    seg = fit_denseclip(clip, shapes, steps=3, batch_size=4, n_ctx=2, decoder_layers=1, head_width=16)
    return seg, seg.save(tmp_path_factory.mktemp("denseclip") / "seg")


def test_save_and_load_round_trip(saved, shapes, tmp_path):
    seg, directory = saved
    back = DenseCLIPSegmenter.load(directory)
    assert back.config == seg.config and back.config.source == "shapes-tiny"
    for k, v in seg.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    images = [s.image for s in shapes]
    assert all(np.array_equal(a, b) for a, b in zip(seg.segment(images), back.segment(images)))
    with pytest.raises(CheckpointError, match="denseclip.json"):
        DenseCLIPSegmenter.load(tmp_path)


def test_segment_command_runs_a_saved_segmenter(saved, shapes, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from cliplab.cli import main

    seg, directory = saved
    paths = []
    for i, s in enumerate(shapes[:2]):
        image = s.image.resize((96, 80))  # not square: masks come back at the image's own size, uncropped
        image.save(tmp_path / f"img{i}.png")
        paths.append(tmp_path / f"img{i}.png")
    r = CliRunner().invoke(main, ["segment", *map(str, paths), "--method", "denseclip", "--checkpoint",
                                  str(directory), "-o", str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0, r.output
    expected = seg.segment([Image.open(p).convert("RGB") for p in paths])
    for p, want in zip(paths, expected):
        mask = np.asarray(Image.open(tmp_path / "out" / f"{p.stem}.mask.png"))
        assert mask.shape == (80, 96) and np.array_equal(mask, want)
    res = seg.segmentation_result([Image.open(p).convert("RGB") for p in paths])
    assert res.labels == shapes.classes and all(np.array_equal(m.numpy(), w) for m, w in zip(res.masks, expected))
    bad = CliRunner().invoke(main, ["segment", str(paths[0]), "--labels", "cat,dog", "--method", "denseclip",
                                    "--checkpoint", str(directory), "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "trained on circle" in bad.output
    bad = CliRunner().invoke(main, ["segment", str(paths[0]), "--labels", "cat", "--checkpoint", str(directory)])
    assert bad.exit_code == 2 and "--checkpoint DIR goes with --method denseclip" in bad.output


# --- keywords reach the core ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoded(clip, shapes):
    return encode_segmentation(clip, shapes)


def _own(seg):
    return {k: v.clone() for k, v in seg.own_state().items()}


def test_fit_keywords_reach_the_core(clip, shapes, encoded, capsys):
    kw = dict(encoded=encoded, n_ctx=2, decoder_layers=1, head_width=16)
    a = fit_denseclip(clip, shapes, steps=4, batch_size=3, seed=1, **kw)
    assert len(a.history) == 4 and {h["batch"] for h in a.history} == {3}
    assert a.ctx.shape[0] == 2 and len(a.decoder.layers) == 1 and a.head[0].out_channels == 16
    same = fit_denseclip(clip, shapes, steps=4, batch_size=3, seed=1, **kw)
    other = fit_denseclip(clip, shapes, steps=4, batch_size=3, seed=2, **kw)
    assert all(torch.equal(v, same.own_state()[k]) for k, v in a.own_state().items())
    assert not torch.equal(a.head[0].weight, other.head[0].weight)
    # lr reaches the optimiser: lr=0 leaves the seed's initialisation untouched
    torch.manual_seed(1)
    init = _own(DenseCLIPSegmenter(clip, DenseCLIPConfig(shapes.classes, n_ctx=2, decoder_layers=1,
                                                        head_width=16, source="shapes-tiny")))
    still = fit_denseclip(clip, shapes, steps=2, batch_size=3, seed=1, lr=0.0, **kw)
    assert all(torch.equal(v, init[k]) for k, v in still.own_state().items())
    moved = fit_denseclip(clip, shapes, steps=2, batch_size=3, seed=1, lr=1e-2, **kw)
    assert not torch.equal(moved.head[0].weight, init["head.0.weight"])
    decayed = fit_denseclip(clip, shapes, steps=2, batch_size=3, seed=1, lr=1e-2, weight_decay=0.5, **kw)
    assert not torch.equal(decayed.head[0].weight, moved.head[0].weight)
    assert fit_denseclip(clip, shapes, steps=1, batch_size=3, aux_weight=0, **kw).config.aux_weight == 0
    fit_denseclip(clip, shapes, steps=2, batch_size=3, progress=True, **kw)
    assert "denseclip step 2/2" in capsys.readouterr().out
    cfg = DenseCLIPConfig(shapes.classes, n_ctx=1, head_width=8)
    assert fit_denseclip(clip, shapes, cfg, steps=1, encoded=encoded).config.n_ctx == 1


def test_backbone_lr_mult_trains_the_image_tower_only_when_asked(shapes):
    clip = cliplab.load("shapes-tiny")
    before = {k: v.clone() for k, v in clip.visual.state_dict().items()}
    fit_denseclip(clip, shapes, steps=1, batch_size=2, n_ctx=1, decoder_layers=1, head_width=8)
    assert all(torch.equal(v, before[k]) for k, v in clip.visual.state_dict().items())
    fit_denseclip(clip, shapes, steps=1, batch_size=2, n_ctx=1, decoder_layers=1, head_width=8,
                  backbone_lr_mult=0.1)
    assert not torch.equal(clip.visual.state_dict()["proj.weight"], before["proj.weight"])
    assert all(torch.equal(v, w) for v, w in zip(clip.text.state_dict().values(),
                                                 cliplab.load("shapes-tiny").text.state_dict().values()))


def test_predict_segment_and_evaluate_keywords(clip, shapes, encoded):
    seg = fit_denseclip(clip, shapes, steps=2, batch_size=3, encoded=encoded, n_ctx=1, head_width=8)
    pixels = encoded.pixels[:3]
    assert seg.predict(pixels, size=(16, 24)).shape == (3, 16, 24)
    with torch.no_grad():
        out = seg(pixels)
    up = dict(size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.equal(seg.predict(pixels, use="score"), F.interpolate(out.score, **up).argmax(1))
    assert torch.equal(seg.predict(pixels, use="head"), F.interpolate(out.logits, **up).argmax(1))
    images = [s.image for s in shapes]
    assert seg.segment(images[:2], size=(10, 12))[0].shape == (10, 12)
    calls = []
    hook = seg.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    by_two = seg.segment(images, batch_size=2)
    hook.remove()
    assert calls == [2, 2, 2, 2]
    assert all(np.array_equal(a, b) for a, b in zip(by_two, seg.segment(images, batch_size=8)))
    score_masks = seg.segment(images, use="score")
    assert any(not np.array_equal(a, b) for a, b in zip(score_masks, by_two))
    # evaluation: samples vs encoded features agree; keywords change what is measured
    on_samples = evaluate_segmenter(seg, shapes)
    assert on_samples == evaluate_segmenter(seg, encoded)
    assert evaluate_segmenter(seg, shapes, use="score") == evaluate_segmenter(seg, encoded, use="score")
    assert evaluate_segmenter(seg, shapes, use="score") != on_samples
    assert evaluate_segmenter(seg, encoded, include_background=False)["miou"] != on_samples["miou"]
    assert evaluate_segmenter(seg, shapes, batch_size=3) == on_samples
    with pytest.raises(ValueError, match="use must be"):
        seg.predict(pixels, use="logits")


# --- effect against same-compute controls --------------------------------------------------------------------------
def test_score_map_loss_makes_the_score_maps_segment(clip):
    """Same frozen features, images, batches, seed and steps for both arms. The score-map loss (with the learnable
    context and the decoder it trains) turns the score maps into a segmenter; without it they stay at the
    training-free level. (The head's own mIoU shows no such gain: see docs/methods/denseclip.md.)"""
    train = SyntheticSegmentation(n=96, offset=1000, by="shape")
    test = SyntheticSegmentation(n=48, offset=200_000, by="shape")
    enc_train, enc_test = encode_segmentation(clip, train), encode_segmentation(clip, test)
    run = dict(steps=80, batch_size=8, seed=0, encoded=enc_train)
    full = fit_denseclip(clip, train, **run)
    no_aux = fit_denseclip(clip, train, aux_weight=0.0, **run)
    torch.manual_seed(0)
    zero_shot = DenseCLIPSegmenter(clip, DenseCLIPConfig(train.classes, n_ctx=0, context_decoder=False,
                                                         template="a photo of a {}."))
    miou = {name: evaluate_segmenter(seg, enc_test, use="score")["miou"] for name, seg in [
        ("full_score", full), ("no_aux_score", no_aux), ("zero_shot_score", zero_shot)]}
    assert miou["full_score"] > miou["no_aux_score"] + 0.08, miou
    assert miou["full_score"] > miou["zero_shot_score"] + 0.08, miou
