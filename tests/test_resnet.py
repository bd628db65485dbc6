"""OpenAI's ModifiedResNet (RN50 family): parity with OpenAI's reference ``clip/model.py`` on random weights
(BatchNorm statistics included), shape inference, token-level views, layouts, export, fast mode and training."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import cliplab
from cliplab.models import CLIP, export_state
from cliplab.models.layouts import CheckpointError, get_layout
from cliplab.models.registry import find_matching_config
from cliplab.models.resnet import ResNetTower
from conftest import CAPTIONS, openai_reference_model, randomize_

TOL = 1e-4
TINY = "test-tiny-resnet"


@torch.no_grad()
def randomize_batch_norm_(module: torch.nn.Module, seed: int, calibrate_on: torch.Tensor | None = None):
    """BatchNorm scales, shifts and running statistics far from their init, so a mis-mapped one shows.

    ``calibrate_on``: set the statistics to those of this batch (one train-mode pass) before perturbing them, so
    that a deep network keeps activations of order one."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for _, m in sorted(module.named_modules(), key=lambda item: item[0])
             if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    if calibrate_on is not None:
        for m in norms:
            m.momentum = 1.0
        module.train()(calibrate_on)
        module.eval()
    for m in norms:
        n = m.num_features
        if calibrate_on is None:
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
        else:
            m.running_mean.add_(torch.randn(n, generator=g) * 0.1 * m.running_var.sqrt())
            m.running_var.mul_(torch.rand(n, generator=g) * 0.5 + 0.75)
    return module


def reference_clip(cfg: cliplab.ModelConfig, seed: int):
    """OpenAI's CLIP with cfg's ResNet shapes; every parameter and BatchNorm statistic perturbed."""
    v, t = cfg.vision, cfg.text
    torch.manual_seed(seed)
    ref = openai_reference_model().CLIP(
        embed_dim=cfg.embed_dim, image_resolution=v.image_size, vision_layers=v.resnet_layers, vision_width=v.width,
        vision_patch_size=None, context_length=t.context_length, vocab_size=t.vocab_size, transformer_width=t.width,
        transformer_heads=t.heads, transformer_layers=t.layers)
    return randomize_batch_norm_(randomize_(ref, seed), seed).float().eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The reference's state dict saved as .safetensors and loaded by cliplab with the architecture inferred."""
    ref = reference_clip(cliplab.get_config(TINY), seed=1)
    path = tmp_path_factory.mktemp("rn") / "openai-rn.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    return ref, cliplab.load(path), path


def pixels(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reference_maps(visual, x: torch.Tensor) -> list[torch.Tensor]:
    """The reference ModifiedResNet's stem and stage outputs (its forward without the attention pool)."""
    x = F.relu(visual.bn1(visual.conv1(x)))
    x = F.relu(visual.bn2(visual.conv2(x)))
    maps = [visual.avgpool(F.relu(visual.bn3(visual.conv3(x))))]
    for stage in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
        maps.append(stage(maps[-1]))
    return maps


# --- parity with OpenAI's code ---------------------------------------------------------------------------------------
@torch.no_grad()
def test_tiny_parity_images_texts_logits(pair):
    ref, ours, _ = pair
    assert ours.config.name == TINY and ours.config.preprocess.crop_rounding == "round"  # inferred, then named
    x = pixels(3, 64, seed=2)
    batch = ours.tokenize(CAPTIONS[:5])  # padded to 77: OpenAI's causal mask is fixed at the context length
    assert (ours.encode_image(x) - ref.encode_image(x)).abs().max().item() <= TOL
    assert (ours.encode_text(batch) - ref.encode_text(batch.ids)).abs().max().item() <= TOL
    got, got_t = ours(x, batch)
    want, _ = ref(x, batch.ids)
    assert got.shape == (3, 5) and torch.equal(got_t, got.t())
    assert (got - want).abs().max().item() <= TOL * want.abs().max().item()


@torch.no_grad()
def test_rn50_sized_image_parity():
    """RN50's image tower at 224 px (3-4-6-3 blocks, 32 pool heads) against OpenAI's ModifiedResNet."""
    cfg = cliplab.get_config("RN50")
    v = cfg.vision
    torch.manual_seed(3)
    ref = openai_reference_model().ModifiedResNet(layers=v.resnet_layers, output_dim=cfg.embed_dim, heads=v.heads,
                                                  input_resolution=v.image_size, width=v.width)
    ref = randomize_batch_norm_(randomize_(ref, seed=3, scale=0.01), seed=3, calibrate_on=pixels(2, 224, seed=5))
    theirs = {f"visual.{k}": t for k, t in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    rules = [r for r in get_layout("openai").rules(cfg) if r.ours.startswith("visual.")]
    assert sorted(k for r in rules for k in r.theirs) == sorted(theirs)  # every tensor mapped, none left over
    ours = ResNetTower(v, cfg.embed_dim).eval()
    ours.load_state_dict({r.ours.removeprefix("visual."): r.gather(theirs) for r in rules}, strict=True)
    x = pixels(1, 224, seed=4)
    want = ref(x)
    assert 1.0 < want.abs().max().item() < 100.0  # features of order one: the tolerance is meaningful
    assert (ours(x) - want).abs().max().item() <= TOL


# --- token-level views -----------------------------------------------------------------------------------------------
@torch.no_grad()
def test_tokens_row0_is_pooled_and_positions_are_value_projections(pair):
    ref, ours, _ = pair
    x = pixels(2, 64, seed=5)
    out = ours.encode_image(x, output="tokens")
    g = ours.config.vision.grid_size
    assert out.tokens.shape == (2, 1 + g * g, ours.config.embed_dim) and out.extras["grid"] == (g, g)
    assert torch.equal(out.tokens[:, 0], out.pooled) and torch.equal(out.pooled, ours.encode_image(x))
    assert torch.equal(out.pool_index, torch.zeros(2, dtype=torch.long))
    # independent: each position of the reference's last feature map, with its positional row, through v and c_proj
    pool = ref.visual.attnpool
    fmap = reference_maps(ref.visual, x)[-1]
    positions = fmap.flatten(2).transpose(1, 2) + pool.positional_embedding[1:]
    want = pool.c_proj(pool.v_proj(positions))
    assert (out.tokens[:, 1:] - want).abs().max().item() <= TOL
    assert (out.tokens[:, 1:] - out.pooled[:, None]).abs().max().item() > 1e-2  # the positions are not the pool


@torch.no_grad()
def test_hidden_maps_and_attention_equal_the_reference(pair):
    ref, ours, _ = pair
    x = pixels(2, 64, seed=6)
    out = ours.encode_image(x, output=True)
    want_maps = reference_maps(ref.visual, x)
    assert [m.shape for m in out.hidden] == [m.shape for m in want_maps] and len(out.hidden) == 5
    for got, want in zip(out.hidden, want_maps):
        assert (got - want).abs().max().item() <= TOL * max(1.0, want.abs().max().item())
    # the reference pool's own attention weights (per head), row of the mean query
    pool = ref.visual.attnpool
    seq = torch.cat([want_maps[-1].flatten(2).mean(-1, keepdim=True), want_maps[-1].flatten(2)], dim=-1)
    seq = seq.permute(2, 0, 1) + pool.positional_embedding[:, None]
    _, weights = F.multi_head_attention_forward(
        seq, seq, seq, seq.shape[-1], pool.num_heads, None,
        torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]), None, None, False, 0.0,
        pool.c_proj.weight, pool.c_proj.bias, training=False, need_weights=True, use_separate_proj_weight=True,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        average_attn_weights=False)
    (probs,) = out.attn
    assert probs.shape == (2, ours.config.vision.heads, 1, seq.shape[0])
    assert (probs - weights[:, :, :1]).abs().max().item() <= TOL


def test_interventions_only_at_the_tokens_site(pair):
    from cliplab.tokens import Intervention, intervene

    _, ours, _ = pair
    assert ours.tower_layers() == {"text": 1, "image": 0}
    x = pixels(2, 64, seed=7)
    for site in ("image.layer[0].resid", "image.layer[*].attn", "image.input", "image.pos"):
        with pytest.raises(ValueError, match="ResNet image tower"):
            with intervene(ours, Intervention(site, lambda h: h)):
                ours.encode_image(x)
    with torch.no_grad():
        plain = ours.encode_image(x)
        with intervene(ours, Intervention("image.tokens", lambda t: t)):
            assert torch.equal(ours.encode_image(x).pooled, plain)  # a no-op edit changes no bit
        with intervene(ours, Intervention("image.tokens", lambda t: t * 2, positions=[0])):
            assert torch.equal(ours.encode_image(x).pooled, plain * 2)
        with intervene(ours, Intervention("text.layer[0].resid", lambda h: h)):
            ours.encode_text(ours.tokenize(["a dog"]))  # the text tower keeps every site
    with pytest.raises(ValueError, match="keep="):
        ours.encode_image(x, keep=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="prompts="):
        ours.encode_image(x, prompts=torch.zeros(1, 512))


# --- configs, inference and layouts ----------------------------------------------------------------------------------
def test_registered_configs_are_what_shape_inference_gives():
    # OpenCLIP's naming, as for the ViTs: "RN50" has GELU text blocks, "RN50-quickgelu" OpenAI's QuickGELU (what
    # shape inference assumes for an OpenAI checkpoint)
    assert cliplab.list_models("RN*") == sorted(f"{n}{q}" for n in ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64")
                                                for q in ("", "-quickgelu"))
    assert cliplab.list_models("RN50*") == ["RN50", "RN50-quickgelu", "RN50x16", "RN50x16-quickgelu", "RN50x4",
                                            "RN50x4-quickgelu", "RN50x64", "RN50x64-quickgelu"]
    names = cliplab.list_models("RN*quickgelu")
    sizes = {}
    for name in names + [TINY]:
        cfg = cliplab.get_config(name)
        assert cfg.family == "resnet"
        with torch.device("meta"):  # shapes only
            model = CLIP(cfg)
        state = get_layout("openai").from_cliplab(model.state_dict(), cfg)
        inferred = get_layout("openai").infer_config(state)
        assert find_matching_config(inferred) == name
        sizes[name] = (inferred.vision.image_size, inferred.embed_dim, sum(p.numel() for p in model.parameters()))
    # OpenAI's published resolutions and embedding widths; parameter counts as OpenAI's models report (millions)
    assert {n.removesuffix("-quickgelu"): s[:2] for n, s in sizes.items() if n != TINY} == {
        "RN50": (224, 1024), "RN101": (224, 512), "RN50x4": (288, 640), "RN50x16": (384, 768), "RN50x64": (448, 1024)}
    assert round(sizes["RN50-quickgelu"][2] / 1e6) == 102 and round(sizes["RN101-quickgelu"][2] / 1e6) == 120
    assert cliplab.get_config("RN50").text.act == "gelu"


def test_roundtrips_native_and_openai(pair, tmp_path):
    ref, ours, path = pair
    original = {k: v for k, v in cliplab.models.read_state_dict(path).items() if not k.endswith("num_batches_tracked")}
    back = export_state(ours, "openai")
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], original[k]) for k in original)
    ours.save(tmp_path / "m")
    again = cliplab.load(tmp_path / "m")
    a, b = ours.state_dict(), again.state_dict()
    assert sorted(a) == sorted(b) and any("running_var" in k for k in a)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert again.config == ours.config
    x = pixels(2, 64, seed=8)
    with torch.no_grad():
        assert torch.equal(again.encode_image(x), ours.encode_image(x))
    # a bare cliplab-layout weights file is recognised as such
    save_file({k: v.contiguous() for k, v in a.items()}, str(tmp_path / "bare.safetensors"))
    bare = cliplab.load(tmp_path / "bare.safetensors", arch=TINY).state_dict()
    assert all(torch.equal(bare[k], a[k]) for k in a)

def test_hf_layout_refuses_a_resnet(pair, tmp_path):
    _, ours, _ = pair
    with pytest.raises(CheckpointError, match="ModifiedResNet"):
        cliplab.convert(ours, "hf", tmp_path / "hf")
    with pytest.raises(CheckpointError, match="ModifiedResNet"):
        export_state(ours, "hf")


def test_missing_and_unknown_tensors_are_named(pair):
    _, _, path = pair
    state = cliplab.models.read_state_dict(path)
    del state["visual.layer2.0.downsample.1.running_var"]
    with pytest.raises(CheckpointError, match="downsample.1.running_var"):
        cliplab.models.loading.model_from_state(state)


def test_init_follows_openai():
    model = cliplab.create_model(TINY, seed=0)
    visual = model.visual
    assert all(torch.equal(b.bn3.weight, torch.zeros_like(b.bn3.weight)) for s in visual.stages for b in s)
    assert torch.equal(visual.stem.bn1.running_var, torch.ones_like(visual.stem.bn1.running_var))
    width = visual.pool.q.in_features
    for w in (visual.pool.q.weight, visual.pool.out.weight, visual.pool.pos_embed):
        assert abs(w.std().item() * width**0.5 - 1) < 0.1
    assert torch.equal(model.state_dict()["visual.pool.q.weight"],
                       cliplab.create_model(TINY, seed=0).state_dict()["visual.pool.q.weight"])


# --- export, fast mode, training -------------------------------------------------------------------------------------
def test_onnx_image_tower_parity(pair, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from cliplab.export import export_onnx, load_onnx

    _, ours, _ = pair
    directory = export_onnx(ours, tmp_path / "onnx", towers="image")
    onnx_model = load_onnx(directory, threads=1)
    for batch in (1, 3):
        x = pixels(batch, 64, seed=9 + batch)
        with torch.no_grad():
            want = ours.encode_image(x)
        assert (onnx_model.encode_image(x) - want).abs().max().item() <= TOL


def test_fast_mode_is_close_to_fp32(pair):
    _, ours, path = pair
    fast = cliplab.load(path, precision="bf16")
    assert fast.precision == "bf16" and fast.visual.stem.bn1.running_var.dtype == torch.bfloat16
    x = pixels(4, 64, seed=12)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the slow-bf16 hardware warning
        got, want = fast.encode_image(x), ours.encode_image(x)
        rich = fast.encode_image(x, output="tokens")
    assert got.dtype == torch.float32
    assert F.cosine_similarity(got, want).min().item() > 0.99
    assert torch.equal(rich.tokens[:, 0].float(), got)


def test_training_steps_update_weights_but_not_batch_norm_statistics(tmp_path):
    from cliplab.train import TrainConfig, Trainer

    cfg = TrainConfig(model=TINY, batch_size=8, steps=2, lr=1e-3, warmup_steps=0, log_every=1, checkpoint_every=0,
                      keep_checkpoints=0, threads=1, progress=False, out_dir=str(tmp_path / "run"), seed=0)
    start = cliplab.create_model(TINY, seed=0).state_dict()
    result = Trainer(cfg).fit()
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    end = result.model.state_dict()
    assert set(start) == set(end)
    stats = [k for k in end if "running_" in k]
    assert stats and all(torch.equal(start[k], end[k]) for k in stats)  # BatchNorm statistics are fixed
    assert not torch.equal(start["visual.pool.q.weight"], end["visual.pool.q.weight"])
    assert not torch.equal(start["visual.stages.0.0.conv1.weight"], end["visual.stages.0.0.conv1.weight"])


def test_image_flops_count_convolutions_and_the_pool():
    """``image_flops`` of a ResNet equals an independent count: every convolution's multiply-adds at its real output
    size (forward hooks), plus the attention pool (k and v over 1 + HW tokens, q and the output for the mean query
    only, scores and weighted sum)."""
    from cliplab.models.flops import image_flops

    cfg = cliplab.get_config(TINY)
    model = cliplab.create_model(cfg, seed=0).eval()
    convs = []

    def count(module, _, out):
        k = module.kernel_size[0] * module.kernel_size[1]
        convs.append(2 * out.numel() * module.in_channels // module.groups * k)

    handles = [m.register_forward_hook(count) for m in model.visual.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model.encode_image(torch.zeros(1, 3, cfg.vision.image_size, cfg.vision.image_size))
    for h in handles:
        h.remove()
    c, n, d = cfg.vision.width * 32, cfg.vision.grid_size**2 + 1, cfg.embed_dim
    pool = 2 * n * c * 2 * c + 2 * c * c + 2 * 2 * n * c + 2 * c * d
    assert len(convs) > 10 and image_flops(cfg) == sum(convs) + pool
