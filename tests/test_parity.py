"""Our model equals independent implementations on the same random weights.

* Hugging Face ``transformers.CLIPModel`` (saved with ``save_pretrained`` and loaded with ``cliplab.load(dir)``);
* OpenAI's reference ``clip/model.py`` (the ``openai-clip`` distribution) holding the same OpenAI-layout state dict.
"""

from __future__ import annotations

import pytest
import torch

import cliplab
from cliplab.models import export_state
from conftest import CAPTIONS, openai_reference_model, randomize_

transformers = pytest.importorskip("transformers")

TOL = 1e-4


def _hf_features(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output holds the projected features; 4.x a tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _hf_model(cfg: cliplab.ModelConfig, seed: int):
    from cliplab.models.layouts.hf import config_to_hf

    torch.manual_seed(seed)
    hf_cfg = transformers.CLIPConfig.from_dict(config_to_hf(cfg))
    return randomize_(transformers.CLIPModel(hf_cfg).eval(), seed)


@pytest.fixture(scope="module", params=["test-tiny", "ViT-B-32-quickgelu"])
def hf_pair(request, tmp_path_factory):
    cfg = cliplab.get_config(request.param)
    ref = _hf_model(cfg, seed=1)
    d = tmp_path_factory.mktemp("hf") / request.param
    ref.save_pretrained(d)
    return ref, cliplab.load(d)


@torch.no_grad()
def test_hf_parity_text(hf_pair):
    ref, ours = hf_pair
    batch = ours.tokenize(CAPTIONS)
    assert len(set(batch.lengths.tolist())) > 4, "captions must have varied lengths"
    want = _hf_features(ref.get_text_features(input_ids=batch.ids))
    got = ours.encode_text(batch)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= TOL


@torch.no_grad()
def test_hf_parity_image(hf_pair):
    ref, ours = hf_pair
    size = ours.config.vision.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    want = _hf_features(ref.get_image_features(pixel_values=pixels))
    got = ours.encode_image(pixels)
    assert (got - want).abs().max().item() <= TOL


@torch.no_grad()
def test_hf_parity_logits(hf_pair):
    ref, ours = hf_pair
    size = ours.config.vision.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    batch = ours.tokenize(CAPTIONS[:3])
    want = ref(input_ids=batch.ids, pixel_values=pixels).logits_per_image
    got, _ = ours(pixels, batch)
    assert (got - want).abs().max().item() <= 1e-3 * want.abs().max().item()


def test_hf_config_recorded(hf_pair):
    _, ours = hf_pair
    assert ours.config.preprocess.crop_rounding == "floor"  # transformers' convention, by checkpoint origin
    assert ours.config.name in cliplab.list_models()  # shapes matched a registered architecture


# --- OpenAI reference --------------------------------------------------------------------------------------------
def _openai_reference(cfg: cliplab.ModelConfig, state):
    ref_mod = openai_reference_model()
    v, t = cfg.vision, cfg.text
    assert v.width // 64 == v.heads and t.act == v.act == "quick_gelu", "OpenAI's model fixes head width and act"
    ref = ref_mod.CLIP(embed_dim=cfg.embed_dim, image_resolution=v.image_size, vision_layers=v.layers,
                       vision_width=v.width, vision_patch_size=v.patch_size, context_length=t.context_length,
                       vocab_size=t.vocab_size, transformer_width=t.width, transformer_heads=t.heads,
                       transformer_layers=t.layers)
    ref.load_state_dict(state, strict=True)
    return ref.float().eval()


OPENAI_SMALL = cliplab.ModelConfig.from_dict({
    "name": "openai-small", "embed_dim": 64,
    "vision": {"image_size": 32, "patch_size": 8, "width": 128, "layers": 2, "heads": 2, "mlp_dim": 512},
    "text": {"width": 128, "layers": 2, "heads": 2, "mlp_dim": 512},
})


@pytest.fixture(scope="module", params=["openai-small", "ViT-B-32-quickgelu"])
def openai_pair(request, tmp_path_factory):
    """Our random model written in the OpenAI layout, loaded back by shape inference and by OpenAI's code."""
    cfg = OPENAI_SMALL if request.param == "openai-small" else cliplab.get_config(request.param)
    ours = randomize_(cliplab.create_model(cfg, seed=2), seed=3)
    path = tmp_path_factory.mktemp("oa") / "openai.safetensors"
    cliplab.convert(ours, "openai", path)
    arch = OPENAI_SMALL if request.param == "openai-small" else None  # B-32: architecture inferred from shapes
    loaded = cliplab.load(path, arch=arch)
    state = cliplab.models.read_state_dict(path)
    return _openai_reference(cfg, state), loaded


@torch.no_grad()
def test_openai_parity(openai_pair):
    ref, ours = openai_pair
    size = ours.config.vision.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(4))
    batch = ours.tokenize(CAPTIONS)  # padded to 77: OpenAI's causal mask is fixed at the context length
    assert (ours.encode_image(pixels) - ref.encode_image(pixels)).abs().max().item() <= TOL
    assert (ours.encode_text(batch) - ref.encode_text(batch.ids)).abs().max().item() <= TOL
    assert ours.config.preprocess.crop_rounding == "round"


def test_openai_shape_inference_names_registered_arch(openai_pair):
    _, ours = openai_pair
    if ours.config.vision.width == 768:
        assert ours.config.name == "ViT-B-32-quickgelu"


# --- round trips ------------------------------------------------------------------------------------------------
def _assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("arch", ["test-tiny", "ViT-B-16-quickgelu"])
def test_roundtrip_ours_hf_ours(arch, tmp_path):
    ours = randomize_(cliplab.create_model(arch, seed=5), seed=6)
    cliplab.convert(ours, "hf", tmp_path / "hf")
    back = cliplab.load(tmp_path / "hf", arch=arch)
    _assert_same_tensors(ours.state_dict(), back.state_dict())
    # and transformers itself reads what we wrote into the same tensors
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf")
    _assert_same_tensors(export_state(ours, "hf"), {k: v for k, v in hf.state_dict().items() if k in
                                                   export_state(ours, "hf")})


def test_roundtrip_openai_ours_openai(tmp_path):
    ref_mod = openai_reference_model()
    torch.manual_seed(7)
    ref = randomize_(ref_mod.CLIP(64, 32, 2, 128, 8, 77, 49408, 128, 2, 2), seed=8)
    original = {k: v.contiguous() for k, v in ref.state_dict().items()}
    from safetensors.torch import save_file

    save_file(original, str(tmp_path / "ref.safetensors"))
    ours = cliplab.load(tmp_path / "ref.safetensors", arch=OPENAI_SMALL)
    _assert_same_tensors(original, export_state(ours, "openai"))


def test_roundtrip_native(tmp_path):
    ours = randomize_(cliplab.create_model("test-tiny", seed=9), seed=10)
    ours.save(tmp_path / "m")
    back = cliplab.load(tmp_path / "m")
    _assert_same_tensors(ours.state_dict(), back.state_dict())
    assert back.config == ours.config
