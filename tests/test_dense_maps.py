"""Dense patch-text similarity maps (naive, MaskCLIP, SCLIP) and the training-free segmenter built on them: each
map equals a hand computation from the tower's hidden states and weights, on tiny random models of every vision
family (ViT with a conv stem + max-skip, SigLIP, ResNet)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cliplab
from conftest import randomize_
from cliplab.data.synthetic import SceneWorld
from cliplab.dense import (FolderSegmentation, SyntheticSegmentation, correlative_attention, evaluate_segmentation,
                           label_features, mask_image, segment, similarity_maps, upsample_maps)
from cliplab.dense.maps import patch_features
from cliplab.models.preprocess import Preprocessor


def _stem_model():
    cfg = cliplab.get_config("test-tiny")
    vision = dataclasses.replace(cfg.vision, image_size=64, patch_size=8, stem_channels=(8, 16, 32),
                                 stem_max_skip=True)
    model = cliplab.create_model(cfg.replace(name="stem-skip-tiny", vision=vision), seed=0).eval()
    with torch.no_grad():  # every parameter perturbed: zero-initialised biases would hide a dropped bias
        return randomize_(model)


@pytest.fixture(scope="module")
def stem_model():
    return _stem_model()


@pytest.fixture(scope="module")
def siglip_model():
    return cliplab.create_model("siglip-tiny", seed=0).eval()


def _pixels(model, n=2, seed=0):
    s = model.config.vision.image_size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


def _texts(model, k=5, seed=1):
    return torch.randn(k, model.config.embed_dim, generator=torch.Generator().manual_seed(seed))


def _hand_cosine(patches, texts, grid):
    sims = F.normalize(patches, dim=-1) @ F.normalize(texts, dim=-1).t()
    return sims.transpose(1, 2).reshape(patches.shape[0], texts.shape[0], *grid)


def _hand_last_block(model, pixels, mix_values):
    """The last block rebuilt from ``output="hidden"`` and raw weights: ``x + out(mix(v(ln_1 x)))`` then the MLP,
    ``ln_post``, ``proj``, plus the max-skip's per-patch term read off the naive tokens."""
    visual = model.visual
    blk = visual.transformer.blocks[-1]
    w = visual.cfg.width
    out = model.encode_image(pixels, output=("hidden", "tokens"))
    x = out.hidden[-2]
    h = F.layer_norm(x, (w,), blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
    qkv = F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias)
    q, k, v = qkv[..., :w], qkv[..., w:2 * w], qkv[..., 2 * w:]
    x = x + F.linear(mix_values(q, k, v), blk.attn.out.weight, blk.attn.out.bias)
    h2 = F.layer_norm(x, (w,), blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
    x = x + F.linear(F.gelu(F.linear(h2, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    def readout(y):
        return F.linear(F.layer_norm(y, (w,), visual.ln_post.weight, visual.ln_post.bias, visual.ln_post.eps),
                        visual.proj.weight)[:, 1:]
    skip = out.tokens[:, 1:] - readout(out.hidden[-1])  # naive tokens = readout(last output) + skip term
    return readout(x) + skip


def _per_head_csa(q, k, v, heads):
    """SCLIP's correlative self-attention written per head with explicit softmaxes (full-width q, k, v)."""
    b, n, w = q.shape
    d = w // heads
    qs, ks, vs = (t.view(b, n, heads, d).transpose(1, 2) for t in (q, k, v))
    a = torch.softmax(torch.einsum("bhid,bhjd->bhij", qs, qs) / d**0.5, -1) + \
        torch.softmax(torch.einsum("bhid,bhjd->bhij", ks, ks) / d**0.5, -1)
    return torch.einsum("bhij,bhjd->bhid", a, vs).transpose(1, 2).reshape(b, n, w)


# --- the three maps, against hand computations ---------------------------------------------------------------------
@pytest.mark.parametrize("which", ["stem", "siglip"])
def test_naive_maps_are_the_cosine_of_the_token_outputs(which, stem_model, siglip_model):
    model = stem_model if which == "stem" else siglip_model
    pixels, texts = _pixels(model), _texts(model)
    with torch.no_grad():
        out = model.encode_image(pixels, output="tokens")
        grid = out.extras["grid"]
        expected = _hand_cosine(out.tokens[:, 1:], texts, grid)
        got = similarity_maps(model, pixels, texts, "naive", size=grid)
    assert got.shape == (2, 5, *grid)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_maskclip_is_the_value_path_of_the_last_block(stem_model):
    pixels, texts = _pixels(stem_model), _texts(stem_model)
    with torch.no_grad():
        patches = _hand_last_block(stem_model, pixels, lambda q, k, v: v)
        expected = _hand_cosine(patches, texts, (8, 8))
        got = similarity_maps(stem_model, pixels, texts, "maskclip", size=(8, 8))
        naive = similarity_maps(stem_model, pixels, texts, "naive", size=(8, 8))
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)
    assert (got - naive).abs().max() > 1e-2  # a different map from the naive one (attention mixing removed)


def test_sclip_is_correlative_self_attention_in_the_last_block(stem_model):
    pixels, texts = _pixels(stem_model), _texts(stem_model)
    heads = stem_model.config.vision.heads
    with torch.no_grad():
        patches = _hand_last_block(stem_model, pixels, lambda q, k, v: _per_head_csa(q, k, v, heads))
        got = similarity_maps(stem_model, pixels, texts, "sclip", size=(8, 8))
    torch.testing.assert_close(got, _hand_cosine(patches, texts, (8, 8)), atol=2e-5, rtol=0)


def test_correlative_attention_closed_forms():
    g = torch.Generator().manual_seed(0)
    n, d = 6, 8
    v = torch.randn(1, 2, n, d, generator=g)
    # queries: large orthogonal rows -> softmax(q q^T) is the identity; keys zero -> softmax(k k^T) uniform
    q = 40.0 * torch.eye(n, d).expand(1, 2, n, d)
    k = torch.zeros(1, 2, n, d)
    torch.testing.assert_close(correlative_attention(q, k, v), v + v.mean(-2, keepdim=True), atol=1e-5, rtol=0)
    # equal rows everywhere: both maps uniform, each row of the sum adds up to 2
    same = torch.randn(1, 2, 1, d, generator=g).expand(1, 2, n, d)
    torch.testing.assert_close(correlative_attention(same, same, v), 2 * v.mean(-2, keepdim=True).expand_as(v),
                               atol=1e-5, rtol=0)


def test_sclip_with_zero_queries_and_keys_averages_the_values():
    """The model-level closed form: with the last block's q and k projections zeroed, every token's attention
    output is ``out(2 * mean_j v_j)``."""
    model = _stem_model()
    blk = model.visual.transformer.blocks[-1]
    w = model.visual.cfg.width
    with torch.no_grad():
        blk.attn.qkv.weight[: 2 * w].zero_()
        blk.attn.qkv.bias[: 2 * w].zero_()
        pixels, texts = _pixels(model), _texts(model)
        patches = _hand_last_block(model, pixels, lambda q, k, v: 2 * v.mean(1, keepdim=True).expand_as(v))
        got = similarity_maps(model, pixels, texts, "sclip", size=(8, 8))
    torch.testing.assert_close(got, _hand_cosine(patches, texts, (8, 8)), atol=2e-5, rtol=0)


def test_siglip_variants_read_out_through_the_probe_heads_value_path(siglip_model):
    """SigLIP (no class token, probe head): MaskCLIP's patches = the head's value path + MLP of the rebuilt block."""
    m = siglip_model
    visual, blk = m.visual, m.visual.transformer.blocks[-1]
    pixels = _pixels(m)
    with torch.no_grad():
        x = m.encode_image(pixels, output="hidden").hidden[-2]
        x = x + blk.attn.out(F.linear(blk.ln_1(x), blk.attn.qkv.weight[2 * 64:], blk.attn.qkv.bias[2 * 64:]))
        x = x + blk.mlp(blk.ln_2(x))
        y = visual.ln_post(x)
        expected = visual.head.finish(visual.head.attn.out(F.linear(y, visual.head.attn.qkv.weight[2 * 64:],
                                                                    visual.head.attn.qkv.bias[2 * 64:])))
        got, grid = patch_features(m, pixels, "maskclip")
    assert grid == (4, 4) and got.shape == (2, 16, 64)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_resnet_naive_is_maskclip_and_sclip_is_refused():
    model = cliplab.create_model("test-tiny-resnet", seed=0).eval()
    pixels, texts = _pixels(model, n=1), _texts(model, k=3)
    with torch.no_grad():
        naive = similarity_maps(model, pixels, texts, "naive")
        mask = similarity_maps(model, pixels, texts, "maskclip")
    assert naive.shape == (1, 3, 64, 64)
    assert torch.equal(naive, mask)
    with pytest.raises(ValueError, match="ResNet"):
        similarity_maps(model, pixels, texts, "sclip")


# --- shapes and upsampling --------------------------------------------------------------------------------------------
def test_upsampling_keeps_a_constant_map_and_the_grid_values_at_cell_centres():
    const = torch.full((2, 3, 4, 4), 0.37)
    up = upsample_maps(const, (32, 48))
    assert up.shape == (2, 3, 32, 48)
    torch.testing.assert_close(up, torch.full_like(up, 0.37), atol=1e-7, rtol=0)
    grid = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    up = upsample_maps(grid, (36, 36))  # 9 px cells: pixel 9 i + 4 is cell i's centre, where the grid value sits
    torch.testing.assert_close(up[0, 0, 4::9, 4::9], grid[0, 0], atol=1e-5, rtol=0)
    assert not torch.allclose(up[0, 0, 0::9, 0::9], grid[0, 0], atol=1e-3)  # elsewhere it interpolates


def test_shapes_methods_and_errors(stem_model):
    pixels, texts = _pixels(stem_model, n=3), _texts(stem_model, k=7)
    with torch.no_grad():
        for method in ("naive", "maskclip", "sclip"):
            maps = similarity_maps(stem_model, pixels, texts, method)
            assert maps.shape == (3, 7, 64, 64) and maps.dtype == torch.float32
            assert maps.abs().max() <= 1 + 1e-5
            assert similarity_maps(stem_model, pixels, texts, method, size=(20, 30)).shape == (3, 7, 20, 30)
        with pytest.raises(ValueError, match="unknown dense method"):
            similarity_maps(stem_model, pixels, texts, "gradcam")
        with pytest.raises(ValueError, match=r"text_features must be \[K, 64\]"):
            similarity_maps(stem_model, pixels, texts[:, :10], "naive")


# --- segmentation -------------------------------------------------------------------------------------------------
def test_segment_is_the_argmax_of_the_maps_under_each_background_rule(stem_model):
    pixels = _pixels(stem_model)
    labels = ["circle", "square", "star"]
    with torch.no_grad():
        with_bg = label_features(stem_model, ["background", *labels], "single")
        maps = similarity_maps(stem_model, pixels, with_bg, "maskclip")
        res = segment(stem_model, pixels, labels, templates="single")
        assert res.labels == ("background", *labels)
        assert torch.equal(torch.stack(res.masks), maps.argmax(1))
        only = similarity_maps(stem_model, pixels, label_features(stem_model, labels, "single"), "maskclip")
        best, which = only.max(1)
        thr = float(best.median())
        res_t = segment(stem_model, pixels, labels, background="threshold", threshold=thr, templates="single")
        expected = torch.where(best <= thr, 0, which + 1)  # a tie goes to the background
        assert torch.equal(torch.stack(res_t.masks), expected)
        assert 0 < (expected == 0).float().mean() < 1
        res_n = segment(stem_model, pixels, labels, background="none", templates="single")
        assert torch.equal(torch.stack(res_n.masks), which + 1)
    for areas in res.areas():
        assert list(areas) == ["background", *labels] and abs(sum(areas.values()) - 1) < 1e-9


def test_segment_masks_take_each_images_own_size(stem_model):
    world = SceneWorld(image_size=64, seed=5)
    small, wide = world.sample(0).image, world.sample(1).image.resize((120, 50))
    res = segment(stem_model, [small, wide], ["circle", "ring"], method="sclip")
    assert [tuple(m.shape) for m in res.masks] == [(64, 64), (50, 120)]
    assert [tuple(m.shape) for m in res.maps] == [(3, 64, 64), (3, 50, 120)]
    # the 64 px image is the model's input as it is: its maps are the pixels' maps
    pre = Preprocessor(dataclasses.replace(stem_model.preprocessor.config, image_size=64))  # test-tiny's says 32
    direct = segment(stem_model, pre(small)[None], ["circle", "ring"], method="sclip")
    torch.testing.assert_close(res.maps[0], direct.maps[0], atol=1e-6, rtol=0)


def test_segment_refuses_bad_arguments(stem_model):
    px = _pixels(stem_model, n=1)
    with pytest.raises(ValueError, match="distinct"):
        segment(stem_model, px, ["a", "A"])
    with pytest.raises(ValueError, match="background's own prompt"):
        segment(stem_model, px, ["background", "a"])
    with pytest.raises(ValueError, match="threshold"):
        segment(stem_model, px, ["a"], background="threshold")
    with pytest.raises(ValueError, match="background must be"):
        segment(stem_model, px, ["a"], background="auto")


def test_evaluation_counts_what_segment_predicts(stem_model):
    data = SyntheticSegmentation(SceneWorld(image_size=64, seed=2), n=6, by="colour")
    res = evaluate_segmentation(stem_model, data, method="naive", batch_size=4)
    seg = segment(stem_model, [data[i].image for i in range(6)], data.classes[1:], method="naive")
    pred = torch.stack(seg.masks).numpy()
    label = np.stack([data[i].label for i in range(6)])
    assert res["images"] == 6 and res["classes"] == list(data.classes)
    assert res["pixel_acc"] == pytest.approx(float((pred == label).mean()), abs=1e-12)
    assert 0 <= res["miou_foreground"] <= 1 and 0 <= res["miou"] <= 1


def test_mask_png_reads_back_as_a_segmentation_folder(tmp_path, stem_model):
    img = SceneWorld(image_size=64, seed=3).sample(0).image
    res = segment(stem_model, [img], ["circle", "square"], background="none")
    img.save(tmp_path / "a.png")
    mask_image(res.masks[0]).save(tmp_path / "a.mask.png")
    (tmp_path / "classes.txt").write_text("background\ncircle\nsquare\n")
    back = FolderSegmentation(tmp_path)[0]
    assert np.array_equal(back.label, res.masks[0].numpy())
    assert isinstance(Image.open(tmp_path / "a.mask.png").getpixel((0, 0)), int)
