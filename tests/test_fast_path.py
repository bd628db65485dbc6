"""The fast mode (``precision="bf16"``): what it casts, how close it stays to fp32 on real inputs, draft decoding, and
the FLOP counts the benchmark's utilisation figures rest on."""

from __future__ import annotations

import csv
import io

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cliplab
from cliplab.models.flops import image_flops, text_flops
from cliplab.models.preprocess import Preprocessor, load_image
from cliplab.models.transformer import QuickGELU, attention

from conftest import CAPTIONS, randomize_, shared_path


@pytest.fixture(scope="module")
def b32_pair():
    """ViT-B-32 with perturbed random weights: exact, and the same weights in fast mode."""
    with torch.no_grad():
        exact = randomize_(cliplab.create_model("ViT-B-32-quickgelu", seed=0)).eval()
        fast = randomize_(cliplab.create_model("ViT-B-32-quickgelu", seed=0)).eval().set_precision("bf16")
    return exact, fast


def real_captions(n: int) -> list[str]:
    with shared_path("flickr8k-1k", "all_captions.csv").open(newline="", encoding="utf-8") as f:
        return [row["caption"] for _, row in zip(range(n), csv.DictReader(f))]


def test_set_precision():
    model = cliplab.create_model("test-tiny", seed=0).set_precision("bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.precision == "bf16" and model.dtype == torch.bfloat16 and model.preprocessor.fast
    ids = model.tokenize(CAPTIONS[:5])
    assert model.encode_text(ids).dtype == torch.float32  # features come back in fp32
    assert model.encode_image(torch.randn(2, 3, 32, 32)).dtype == torch.float32
    assert model.set_precision("fp32").precision == "fp32" and not model.preprocessor.fast
    with pytest.raises(ValueError, match="precision"):
        model.set_precision("int4")


def test_load_fast_mode(tmp_path):
    cliplab.create_model("test-tiny", seed=0).save(tmp_path / "m")
    fast = cliplab.load(tmp_path / "m", precision="bf16")
    assert fast.precision == "bf16" and cliplab.load(tmp_path / "m").precision == "fp32"


def test_fast_rich_path_matches_fast_plain_path(b32_pair):
    """A no-op token-level call runs the same kernels as the plain path in fast mode too: identical bits. (With
    gradients on and attention recorded, the rich path multiplies the probabilities by hand so that attention maps
    get gradients, as in fp32; where the plain path uses the fused kernel, that differs in the last bits.)"""
    _, fast = b32_pair
    ids = fast.tokenize(CAPTIONS[:5])
    px = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fast.encode_text(ids, output=True).pooled.float(), fast.encode_text(ids))
        assert torch.equal(fast.encode_image(px, output=True).pooled.float(), fast.encode_image(px))
    recorded = fast.encode_image(px, output=True).pooled.float()  # gradients on: by-hand attention
    assert torch.nn.functional.cosine_similarity(recorded, fast.encode_image(px)).min() > 0.999


def test_fast_mode_close_to_fp32_on_real_captions(b32_pair):
    exact, fast = b32_pair
    captions = real_captions(256)
    cos = F.cosine_similarity(exact.encode_texts(captions), fast.encode_texts(captions), dim=-1)
    assert cos.min() >= 0.999, float(cos.min())


def test_fast_mode_close_to_fp32_on_real_photos(b32_pair):
    photos = sorted(shared_path("flickr8k-1k", "images").glob("*.jpg"))[:16]
    exact, fast = b32_pair
    px = exact.preprocessor.batch(photos)
    with torch.inference_mode():
        cos = F.cosine_similarity(exact.encode_image(px), fast.encode_image(px), dim=-1)
    assert cos.min() >= 0.999, float(cos.min())


@pytest.mark.parametrize("n, causal", [(20, True), (50, False), (150, False)])
def test_attention_kernels_agree(n, causal):
    """The short-sequence matmul kernel (bf16) against PyTorch's fused kernel in fp32."""
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(3, 4, n, 16, generator=g) for _ in range(3))
    mask = torch.full((n, n), float("-inf")).triu_(1) if causal else None
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)  # fp32 mask is cast to the queries' dtype
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max() < 0.05
    assert torch.equal(attention(q, k, v, mask), ref)  # fp32: the fused kernel itself


def test_quickgelu_inference_form_is_bit_identical():
    x = torch.randn(1000)
    with torch.no_grad():
        assert torch.equal(QuickGELU()(x), x * torch.sigmoid(1.702 * x))


def _jpeg(w: int, h: int) -> bytes:
    g = torch.Generator().manual_seed(w)
    low = (torch.rand(3, h // 16, w // 16, generator=g) * 255).to(torch.uint8)
    img = Image.fromarray(low.permute(1, 2, 0).numpy()).resize((w, h), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def test_draft_decoding_only_for_large_jpegs():
    big, small = _jpeg(1024, 768), _jpeg(400, 300)
    assert load_image(big).size == (1024, 768)
    assert load_image(big, draft=128).size == (256, 192)  # 1/4 scale keeps both sides >= 128
    assert load_image(small, draft=160).size == (400, 300)  # 300 < 2 x 160: nothing to gain, decoded as is
    exact, fast = Preprocessor(), Preprocessor(fast=True)  # 224 px: draft needs sides >= 896
    assert torch.equal(exact(small), fast(small)) and torch.equal(exact(big), fast(big))
    cfg = cliplab.get_config("shapes-tiny").preprocess
    from cliplab.models.preprocess import PreprocessConfig

    exact, fast = Preprocessor(PreprocessConfig(**vars(cfg))), Preprocessor(PreprocessConfig(**vars(cfg)), fast=True)
    a, b = exact(big), fast(big)  # 64 px: decoded at 1/4 (256x192), then resized
    assert not torch.equal(a, b)
    assert (a - b).abs().mean() < 0.05 and F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("arch", ["test-tiny", "ViT-B-32", "shapes-tiny-stem", "shapes-tiny"])
def test_flop_counts_match_torch_counter(arch):
    """The closed-form counts against PyTorch's FLOP counter on the plain forward (fp32). The counter sees the
    convolutions (shapes-tiny-stem: its stem's too) and every linear layer but not the fused attention kernel, so
    the difference must be exactly the attention term: ``4 n^2 W`` per layer for images, the causal half
    ``2 n^2 W`` for text."""
    from torch.utils.flop_counter import FlopCounterMode

    model = cliplab.create_model(arch, seed=0).eval()
    v, t = model.config.vision, model.config.text
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.encode_image(torch.randn(1, 3, v.image_size, v.image_size))
    n = v.grid_size**2 + 1
    assert image_flops(model.config) - counter.get_total_flops() == v.layers * 4 * n * n * v.width
    if arch == "ViT-B-32":
        assert abs(image_flops(model.config) / 1e9 - 8.8) < 0.05  # the figure usually quoted
    ids = model.tokenize(["a photo of a dog on the grass"])
    n = int(ids.lengths[0])
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.encode_text(ids)
    assert text_flops(model.config, n) - counter.get_total_flops() == t.layers * 2 * n * n * t.width


def test_inference_slices_match_the_whole_batch():
    """Large inference batches run slice by slice (``SLICE_TOKENS``); rows must equal the whole-batch computation,
    which is what runs under autograd."""
    from cliplab.models import towers

    model = cliplab.create_model("test-tiny", seed=0).eval()
    s = model.config.vision.image_size
    px = torch.randn(3 * towers.SLICE_TOKENS // model.config.vision.num_positions, 3, s, s)
    ids = model.tokenize([f"caption number {i} " + "word " * (i % 9) for i in range(200)])
    with torch.inference_mode():
        sliced_img, sliced_txt = model.encode_image(px), model.encode_text(ids)
    with torch.enable_grad():
        whole_img, whole_txt = model.encode_image(px).detach(), model.encode_text(ids).detach()
    assert (sliced_img - whole_img).abs().max() < 1e-5
    assert (sliced_txt - whole_txt).abs().max() < 1e-5


def test_inference_slices_are_even_and_within_the_token_budget(monkeypatch):
    """Slices stay within ``SLICE_TOKENS``, are as few as that allows and none is larger than an even share (a compiled tower then sees one
    shape: 64 ViT-B/32 images run as 32 + 32, not 40 + 24); under autograd the batch runs whole."""
    from cliplab.models import towers

    monkeypatch.setattr(towers, "SLICE_TOKENS", 2048)
    with torch.inference_mode():
        assert towers.slice_rows(64, 50) == 32
        for rows in range(1, 300):
            for per_row in (1, 7, 50, 77, 197, 4000):
                step = towers.slice_rows(rows, per_row)
                sizes = [len(c) for c in torch.arange(rows).split(step)]
                assert step * per_row <= 2048 or step == 1
                assert len(sizes) == -(-rows // max(1, 2048 // per_row))  # as few slices as the budget allows
                assert max(sizes) == -(-rows // len(sizes))  # and none larger than an even share
    assert towers.slice_rows(64, 50) == 64


def test_slice_and_attention_choices_follow_the_cpu(monkeypatch, tmp_path):
    """The inference slice follows the L2 cache (2 MiB or more per core: 2048 tokens, else 512, unknown: 512) and
    the short-attention limit follows AMX (32 with it, 96 without), as measured (cliplab.models.hardware)."""
    from cliplab.models import hardware

    read_l2 = hardware.l2_cache_bytes
    for l2, want in ((512 * 1024, 512), (1024 * 1024, 512), (2 * 1024 * 1024, 2048), (None, 512)):
        monkeypatch.setattr(hardware, "l2_cache_bytes", lambda l2=l2: l2)
        assert hardware.slice_tokens() == want
    for flags, want in ((frozenset({"avx512f", "amx_bf16"}), 32), (frozenset({"avx512_bf16"}), 96), (None, 96)):
        monkeypatch.setattr(hardware, "cpu_flags", lambda flags=flags: flags)
        assert hardware.short_attention_limit() == want
    cache = tmp_path / "cpu0" / "cache"
    for i, (level, size) in enumerate((("1", "48K"), ("2", "2048K"), ("3", "105M"))):
        (cache / f"index{i}").mkdir(parents=True)
        (cache / f"index{i}" / "level").write_text(level + "\n")
        (cache / f"index{i}" / "size").write_text(size + "\n")
    real_path = hardware.Path
    monkeypatch.setattr(hardware, "Path", lambda p: cache if p == "/sys/devices/system/cpu/cpu0/cache" else real_path(p))
    read_l2.cache_clear()
    try:
        assert read_l2() == 2 * 1024 * 1024
    finally:
        read_l2.cache_clear()
