"""Vision token reduction (cliplab.vision_tokens): a reducer that keeps everything is the plain forward bit for bit
at every layer; ToMe's merge arithmetic and index maps on constructed inputs; FLOP accounting against the plain
formula and against FlopCounterMode on a real reduced forward; an effect check of ToMe on the shipped model against
a random-drop control at the same token count."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from conftest import randomize_
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import cliplab
from cliplab.models.flops import image_flops
from cliplab.vision_tokens import (
    IndexMap,
    KeepTopK,
    TokenReducer,
    ToMe,
    bipartite_assignment,
    encode_image_reduced,
    matching_flops,
    merge_tokens,
    reduced_image_flops,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "vision_tokens.md"


def _stem_skip_config():
    cfg = cliplab.get_config("test-tiny")
    vision = dataclasses.replace(cfg.vision, image_size=64, stem_channels=(8, 16, 32), stem_max_skip=True)
    return cfg.replace(name="stem-skip-tiny", vision=vision)


@pytest.fixture(scope="module", params=["test-tiny", "stem-skip", "siglip-tiny"])
def tiny(request):
    cfg = _stem_skip_config() if request.param == "stem-skip" else request.param
    model = randomize_(cliplab.create_model(cfg, seed=0), seed=1).eval()
    size = model.config.vision.image_size
    return model, torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))


def _keep_all_reducers(layer: int):
    reducers = [ToMe(0), ToMe(ratio=0.0, metric="tokens"), KeepTopK(0.0, "norm")]
    if layer >= 1:
        reducers += [ToMe(ratio=0.0, metric="keys", proportional=True)]
    return reducers



class _TextRecorder(TokenReducer):
    """Keeps everything; records the text rows and the batch size each call saw."""

    def __init__(self):
        self.calls = []

    def reduce(self, tokens, attention, keys, text, *, sizes):
        self.calls.append((tokens.shape[0], None if text is None else text.clone()))
        return tokens, torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1).clone()


@torch.no_grad()
def test_large_batches_run_in_the_plain_forwards_slices(monkeypatch):
    """Pooled-only calls slice the batch as ``encode_image`` does, so keep-everything gives its bits even where it
    slices; per-image text rows follow their images into the slices."""
    import cliplab.models.towers as towers

    model = randomize_(cliplab.create_model("test-tiny", seed=0), seed=1).eval()
    n_pos = model.config.vision.num_positions
    monkeypatch.setattr(towers, "SLICE_TOKENS", 3 * n_pos)  # slices of 3 images
    pixels = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    text = torch.arange(8.0).unsqueeze(1).expand(-1, model.config.embed_dim)
    rec = _TextRecorder()
    out = encode_image_reduced(model, pixels, rec, layer=1, text=text)
    assert [c[0] for c in rec.calls] == [3, 3, 2]
    assert torch.cat([c[1] for c in rec.calls])[:, 0].tolist() == list(range(8))
    assert torch.equal(out.pooled, model.encode_image(pixels))
    assert out.extras["index_map"].assign.shape == (8, model.config.vision.grid_size ** 2)
    shared = torch.ones(model.config.embed_dim)  # one text for all images goes to every slice whole
    rec = _TextRecorder()
    encode_image_reduced(model, pixels, rec, layer=1, text=shared)
    assert all(torch.equal(c[1], shared) for c in rec.calls)
    rec = _TextRecorder()  # rich outputs are never sliced
    encode_image_reduced(model, pixels, rec, layer=1, output="tokens")
    assert [c[0] for c in rec.calls] == [8]

@torch.no_grad()
def test_keep_everything_is_the_plain_forward_bit_for_bit(tiny):
    model, pixels = tiny
    plain = model.encode_image(pixels)
    plain_tokens = model.encode_image(pixels, output="tokens").tokens
    depth = model.config.vision.layers
    for layer in [*range(depth + 1), list(range(depth + 1))]:
        for reducer in _keep_all_reducers(layer if isinstance(layer, int) else 0):
            out = encode_image_reduced(model, pixels, reducer, layer, output="tokens")
            assert torch.equal(out.pooled, plain), (layer, reducer)
            assert torch.equal(out.tokens, plain_tokens), (layer, reducer)
            n = plain_tokens.shape[1] - 1
            assert out.extras["index_map"].assign.equal(torch.arange(n).expand(pixels.shape[0], -1))


@torch.no_grad()
def test_keep_top_k_by_cls_attention_keeps_everything_at_ratio_zero():
    model = randomize_(cliplab.create_model("test-tiny", seed=0), seed=1).eval()
    pixels = torch.randn(2, 3, 32, 32)
    out = encode_image_reduced(model, pixels, KeepTopK(0.0), [1, 2], output="tokens")
    assert torch.equal(out.pooled, model.encode_image(pixels))
    assert torch.equal(out.tokens, model.encode_image(pixels, output="tokens").tokens)


def test_merging_two_identical_tokens_gives_that_token_with_size_two():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, 6, 16, generator=g)
    tokens[0, 3] = tokens[0, 2]  # A token 2 and B token 3 are identical: the most similar pair
    merged, step = ToMe(1, metric="tokens")(tokens)
    assert step.tolist() == [[0, 1, 2, 2, 3, 4]]
    assert torch.equal(merged[0, 2], tokens[0, 2])
    assert torch.equal(merged[0, [0, 1, 3, 4]], tokens[0, [0, 1, 4, 5]])
    index_map = IndexMap.identity(1, 6).then(step, 5)
    assert index_map.sizes.tolist() == [[1.0, 1.0, 2.0, 1.0, 1.0]]
    assert index_map.members(0, 2).tolist() == [2, 3]


def test_merge_is_size_weighted():
    tokens = torch.tensor([[[1.0, 0.0], [4.0, 3.0], [0.0, 9.0]]])
    sizes = torch.tensor([[3.0, 1.0, 2.0]])
    step = torch.tensor([[0, 0, 1]])
    out = merge_tokens(tokens, sizes, step, 2)
    assert torch.allclose(out, torch.tensor([[[7 / 4, 3 / 4], [0.0, 9.0]]]))


def test_bipartite_matching_against_brute_force():
    g = torch.Generator().manual_seed(3)
    metric = torch.randn(2, 11, 8, generator=g)
    for r in (1, 3, 6):
        step = bipartite_assignment(metric, r)
        for b in range(2):
            unit = torch.nn.functional.normalize(metric[b], dim=-1)
            sim = unit[::2] @ unit[1::2].T
            best, match = sim.max(-1)
            merged = set(best.argsort(descending=True)[:r].tolist())
            survivors = [j for j in range(11) if j % 2 or j // 2 not in merged]
            for j in range(11):
                target = 2 * int(match[j // 2]) + 1 if (j % 2 == 0 and j // 2 in merged) else j
                assert int(step[b, j]) == survivors.index(target)


@torch.no_grad()
def test_index_map_covers_every_patch_exactly_once_and_tokens_are_member_means():
    model = randomize_(cliplab.create_model("test-tiny", seed=0), seed=1).eval()
    pixels = torch.randn(3, 3, 32, 32)
    n = model.config.vision.grid_size**2
    out = encode_image_reduced(model, pixels, ToMe(3, metric="tokens"), [0, 1, 2], output="hidden")
    index_map = out.extras["index_map"]
    m = n - 9
    assert out.extras["tokens_per_layer"] == [1 + n - 3, 1 + n - 6] and index_map.sizes.shape == (3, m)
    assert bool((index_map.assign >= 0).all()) and int(index_map.assign.max()) == m - 1
    counts = torch.stack([torch.bincount(a, minlength=m) for a in index_map.assign]).float()
    assert torch.equal(counts, index_map.sizes) and bool((index_map.sizes.sum(1) == n).all())
    # one merge before block 0: each token is the mean of its patches' embedded tokens
    once = encode_image_reduced(model, pixels, ToMe(5, metric="tokens"), 0, output="hidden")
    full = model.encode_image(pixels, output="hidden").hidden[0][:, 1:]
    imap = once.extras["index_map"]
    for b in range(3):
        for t in range(n - 5):
            expected = full[b, imap.members(b, t)].mean(0)
            assert torch.allclose(once.hidden[0][b, 1 + t], expected, atol=1e-6)


@torch.no_grad()
def test_proportional_attention_makes_merged_duplicates_weigh_as_their_patches():
    # zero positions and columns of colour (3 red, 1 blue per row): every red token is the same, and ToMe merges the 8
    # red A tokens into the first red B token (size 9); with proportional attention later blocks see the unmerged mix
    model = randomize_(cliplab.create_model("test-tiny", seed=0), seed=1).eval()
    model.visual.pos_embed.zero_()
    pixels = torch.zeros(2, 3, 32, 32)
    pixels[:, 0, :, :24] = 1.0
    pixels[:, 2, :, 24:] = 1.0
    pixels[1] *= -0.5
    plain = model.encode_image(pixels)
    merged = encode_image_reduced(model, pixels, ToMe(8, metric="tokens", proportional=True), 1)
    assert merged.extras["index_map"].sizes.tolist() == [[9.0] + [1.0] * 7] * 2
    assert torch.allclose(merged.pooled, plain, atol=1e-5)
    control = encode_image_reduced(model, pixels, ToMe(8, metric="tokens"), 1)
    assert not torch.allclose(control.pooled, plain, atol=1e-2)


@torch.no_grad()
def test_keep_top_k_keeps_the_highest_scores_in_order():
    model = randomize_(cliplab.create_model("test-tiny", seed=0), seed=1).eval()
    pixels = torch.randn(2, 3, 32, 32)
    out = encode_image_reduced(model, pixels, KeepTopK(0.5), 1, output=("hidden", "attn"))
    before = out.hidden[1][:, 1:]
    cls_attn = out.attn[0][:, :, 0, 1:].mean(1)
    assign = out.extras["index_map"].assign
    for b in range(2):
        kept = cls_attn[b].topk(8).indices.sort().values
        assert (assign[b] >= 0).nonzero().flatten().tolist() == kept.tolist()
        assert assign[b, kept].tolist() == list(range(8))
        # the next block ran on exactly those tokens
        block_in = torch.cat([out.hidden[1][b, :1], before[b, kept]])
        assert out.attn[1].shape[-1] == 9 and block_in.shape[0] == 9


def test_unreduced_schedule_flops_equal_image_flops():
    for name in ("test-tiny", "ViT-B-16", "ViT-B-32", "shapes-tiny"):
        cfg = cliplab.get_config(name)
        full = cfg.vision.grid_size**2 + 1
        assert reduced_image_flops(cfg, [full] * cfg.vision.layers) == image_flops(cfg)
    with pytest.raises(ValueError, match="one count per block"):
        reduced_image_flops(cfg, [full])


@torch.no_grad()
def test_reduced_flops_match_flop_counter_on_a_real_forward():
    cfg = cliplab.get_config("test-tiny")
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, layers=4))
    model = cliplab.create_model(cfg, seed=0).eval().requires_grad_(False)
    pixels = torch.randn(1, 3, 32, 32)
    head = cfg.vision.width // cfg.vision.heads
    for reducer, layers in [(KeepTopK(0.5, "norm"), [1]), (ToMe(2), [1, 2, 3]), (ToMe(ratio=0.3), [2, 4])]:
        # the math SDPA backend runs attention as matmuls FlopCounterMode sees (the fused CPU kernel is not counted)
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            out = encode_image_reduced(model, pixels, reducer, layers)
        counts = out.extras["tokens_per_layer"]
        assert counts != [17] * 4
        expected = reduced_image_flops(cfg, counts)
        if isinstance(reducer, ToMe):  # plus the A @ B^T similarity of each matching, on head-width keys
            before = [counts[layer - 1] - 1 for layer in layers]  # patches the block before each reduction saw
            expected += sum(matching_flops(n, head, reducer.count(n)) for n in before)
        assert counter.get_total_flops() == expected, (reducer, counts)


def test_reducer_errors_are_one_clear_line():
    model = cliplab.create_model("test-tiny", seed=0).eval()
    pixels = torch.randn(1, 3, 32, 32)

    class Broken(TokenReducer):
        def reduce(self, tokens, attention, keys, text, *, sizes):
            return tokens[:, :2], torch.zeros(tokens.shape[:2], dtype=torch.long)

    with pytest.raises(ValueError, match="at least one input token"):
        encode_image_reduced(model, pixels, Broken(), 1)
    with pytest.raises(ValueError, match=r"layers must be in \[0, 2\]"):
        encode_image_reduced(model, pixels, ToMe(1), 3)
    with pytest.raises(ValueError, match="needs a block before it"):
        encode_image_reduced(model, pixels, KeepTopK(0.5), 0)
    with pytest.raises(ValueError, match="ResNet"):
        encode_image_reduced(cliplab.create_model("test-tiny-resnet", seed=0), pixels, ToMe(1), 1)


def test_docs_page_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert blocks
    ns: dict = {"__name__": "docs_vision_tokens"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{DOC.name}[block {i}]", "exec"), ns)


@torch.no_grad()
def test_tome_keeps_shapes_tiny_features_better_than_random_dropping():
    from cliplab.data.synthetic import SceneWorld

    model = cliplab.load("shapes-tiny").eval()
    world = SceneWorld(image_size=64, seed=7)
    pixels = torch.stack([model.preprocess(world.sample(i).render()) for i in range(100)])
    plain = model.encode_image(pixels, normalize=True)
    # 25% of the 64 patches merged away once, before block 2 (token metric, proportional attention after it)
    tome = encode_image_reduced(model, pixels, ToMe(ratio=0.25, metric="tokens", proportional=True), 2,
                                normalize=True)
    control = encode_image_reduced(model, pixels, KeepTopK(0.25, "random"), 2, normalize=True)
    assert tome.extras["tokens_per_layer"] == control.extras["tokens_per_layer"] == [65, 65, 49, 49, 49, 49]
    cos_tome = (tome.pooled * plain).sum(-1).mean().item()
    cos_control = (control.pooled * plain).sum(-1).mean().item()
    assert cos_tome >= 0.97 and cos_tome > cos_control + 0.01, (cos_tome, cos_control)
