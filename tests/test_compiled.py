"""The opt-in torch.compile path (``CLIP.set_compiled``): same features as eager, only without gradients, recompiled
when the weights change under it (frozen compiled code would otherwise keep the old weights), and reachable from
``cliplab.load(..., compile=True)`` and ``cliplab embed --compile``."""

import warnings

import pytest
import torch

import cliplab
from cliplab.models.compiled import weights_stamp

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CAPTIONS = ["a red circle", "two blue squares to the left of a small green star above a yellow triangle",
            "a star", "three big purple circles"]


@pytest.fixture(scope="module")
def pair():
    """An eager model and a compiled copy of the same weights (test-tiny: compiling takes seconds)."""
    eager = cliplab.create_model("test-tiny", seed=0).eval()
    compiled = cliplab.create_model("test-tiny", seed=0).eval().set_compiled(True)
    return eager, compiled


def pixels(model, n=3):
    s = model.config.vision.image_size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(1))


def test_compiled_features_equal_eager_and_compiled_code_ran(pair):
    eager, compiled = pair
    x = pixels(eager)
    with torch.no_grad():
        assert torch.allclose(compiled.encode_image(x), eager.encode_image(x), atol=1e-5)
        assert torch.allclose(compiled.encode_texts(CAPTIONS), eager.encode_texts(CAPTIONS), atol=1e-5)
        # a second batch shape and the one-text query go through the compiled code as well
        assert torch.allclose(compiled.encode_image(x[:1]), eager.encode_image(x[:1]), atol=1e-5)
        assert torch.allclose(compiled.encode_texts(CAPTIONS[:1]), eager.encode_texts(CAPTIONS[:1]), atol=1e-5)
    report = compiled.compile_report()
    assert set(report) == {"image", "text"} and all(s is not None and s > 0 for s in report.values())
    assert compiled.compiled and not eager.compiled


def test_gradients_and_the_token_api_run_eagerly(pair, monkeypatch):
    eager, compiled = pair
    calls = []
    for tower in compiled.__dict__["_compiled"].values():
        monkeypatch.setattr(tower, "fn", lambda *a, _fn=tower.fn: calls.append(1) or _fn(*a))
    x = pixels(eager, 2).requires_grad_(True)
    feats = compiled.encode_image(x)  # grad mode: eager, so gradients reach the pixels
    feats.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        out = compiled.encode_image(x, output="tokens")  # the token-level view is never compiled
        assert torch.allclose(out.pooled, eager.encode_image(x), atol=1e-5)
    assert calls == []
    with torch.no_grad():
        compiled.encode_image(x)
    assert calls == [1]


def test_changed_weights_are_recompiled_not_served_stale():
    model = cliplab.create_model("test-tiny", seed=0).eval().set_compiled(True)
    x = pixels(model)
    with torch.no_grad():
        before = model.encode_image(x)
        for p in model.visual.parameters():  # an in-place update, as an optimiser step makes
            p.mul_(1.25)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            after = model.encode_image(x)
        fresh = model.visual(x)
    assert any("recompiling" in str(w.message) for w in caught)
    assert not torch.allclose(after, before, atol=1e-3)
    assert torch.allclose(after, fresh, atol=1e-5)
    assert model.__dict__["_compiled"]["image"].recompiles == 1


def test_weights_stamp_sees_in_place_updates_and_casts():
    model = cliplab.create_model("test-tiny", seed=0)
    stamp = weights_stamp(model.visual)
    assert weights_stamp(model.visual) == stamp
    with torch.no_grad():
        next(model.visual.parameters()).add_(0.0)  # written in place, even with equal values
    assert weights_stamp(model.visual) != stamp
    stamp = weights_stamp(model.visual)
    model.set_precision("bf16")
    assert weights_stamp(model.visual) != stamp


def test_set_precision_keeps_the_model_compiled_and_off_turns_it_off():
    model = cliplab.create_model("test-tiny", seed=0).eval().set_compiled(True)
    model.set_precision("bf16")
    assert model.compiled and model.dtype == torch.bfloat16
    x = pixels(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an asked-for cast is not a stale-weights surprise
        cos = torch.nn.functional.cosine_similarity(model.encode_image(x), model.visual(x.bfloat16()).float())
        assert cos.min() > 0.999  # bf16 both ways; fused kernels round differently
    assert not model.set_compiled(False).compiled and model.compile_report() == {}


def test_load_and_embed_reach_the_compiled_path(tmp_path, monkeypatch):
    src = cliplab.create_model("test-tiny", seed=0)
    src.save(tmp_path / "m")
    assert cliplab.load(tmp_path / "m", compile=True).compiled
    assert not cliplab.load(tmp_path / "m").compiled

    from click.testing import CliRunner

    from cliplab.cli import main
    from cliplab.pipeline import EmbedJob

    seen = {}
    real = EmbedJob.__init__

    def spy(self, *a, **kw):
        real(self, *a, **kw)
        seen["compiled"] = self.model.compiled

    monkeypatch.setattr(EmbedJob, "__init__", spy)
    res = CliRunner().invoke(main, ["embed", "--synthetic", "4", "-o", str(tmp_path / "e"), "-m",
                                    str(tmp_path / "m"), "--compile"])
    assert res.exit_code == 0, res.output
    assert seen["compiled"] is True
    res = CliRunner().invoke(main, ["embed", "--synthetic", "4", "-o", str(tmp_path / "e2"), "--compile",
                                    "--backend", "onnxruntime"])
    assert res.exit_code != 0 and "compile runs the torch backend" in res.output


@pytest.mark.parametrize("freeze", [True, False])
def test_freezing_folds_the_weights_into_the_compiled_code(freeze):
    """With ``freeze`` the compiled code must hold (some of) the weights as its own constants, pre-packed for oneDNN:
    changed weights that the stale-weights check is told to ignore then do not all reach it, and the features differ
    from the live module's. Without freezing every weight reaches the compiled code as an input. (torch 2.13 froze
    nothing until dynamo was told to prepare for freezing.)"""
    model = cliplab.create_model("test-tiny", seed=0).eval().set_compiled(True, freeze=freeze)
    tower = model.__dict__["_compiled"]["image"]
    x = pixels(model)
    with torch.no_grad():
        before = model.encode_image(x)
        for p in model.visual.parameters():
            p.mul_(1.25)
        tower.stamp = weights_stamp(model.visual)  # hide the update from the stale-weights check
        after = model.encode_image(x)
        fresh = model.visual(x)
    assert not torch.allclose(fresh, before, atol=1e-3)
    assert torch.allclose(after, fresh, atol=1e-5) is not freeze


def test_embed_runs_a_short_last_batch_padded_not_recompiled(tmp_path):
    """A job's last image batch is short; a compiled tower would compile that shape again (~20 s on ViT-B/32), so the
    local engine pads it to the batch size and drops the padding: one shape reaches the compiled code, and every
    row's features are its own."""
    from cliplab.pipeline import embed, read_embeddings

    model = cliplab.create_model("test-tiny", seed=0).eval().set_compiled(True)
    tower = model.__dict__["_compiled"]["image"]
    shapes = []
    real = tower.__call__
    tower.__class__ = type("Spy", (type(tower),), {"__call__": lambda self, x: shapes.append(len(x)) or real(x)})
    res = embed("synthetic:6", tmp_path / "e", model, batch_size=4, what="image", progress=False)
    assert res.rows == 6 and set(shapes) == {4}
    emb = read_embeddings(tmp_path / "e")
    eager = cliplab.create_model("test-tiny", seed=0).eval()
    from cliplab.data import SceneWorld

    world = SceneWorld(seed=0)
    with torch.no_grad():
        want = eager.encode_image(eager.preprocessor.batch([world.sample(i).image for i in range(6)]), normalize=True)
    got = torch.as_tensor(emb.image)
    assert torch.allclose(got, want, atol=1e-5)


def test_a_compile_mode_becomes_inductor_options_beside_freezing(monkeypatch):
    """torch.compile refuses a mode together with options, so a mode must arrive as the options it stands for, with
    ``freezing`` kept (``set_compiled(mode="max-autotune")`` raised before)."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    cliplab.create_model("test-tiny", seed=0).set_compiled(True, mode="max-autotune-no-cudagraphs")
    cliplab.create_model("test-tiny", seed=0).set_compiled(True, freeze=False)
    assert [kw.keys() for kw in seen] == [{"options"}] * 4
    assert seen[0]["options"] == {"max_autotune": True, "coordinate_descent_tuning": True, "freezing": True}
    assert seen[2]["options"] == {"freezing": False}


def test_a_compile_mode_reaches_torch_compile_from_load_and_embed(tmp_path, monkeypatch):
    """``load(compile="max-autotune")``, ``EmbedOptions(compile=...)`` and ``cliplab embed --compile-mode`` compile
    in that mode; ``--compile`` alone and ``compile=True`` in the default one; a mode torch does not know is a
    one-line error before anything runs."""
    from click.testing import CliRunner

    from cliplab.cli import main
    from cliplab.pipeline import EmbedOptions

    cliplab.create_model("test-tiny", seed=0).save(tmp_path / "m")
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw["options"].get("max_autotune")) or fn)
    assert cliplab.load(tmp_path / "m", compile="max-autotune").compiled and seen == [True, True]
    assert cliplab.load(tmp_path / "m", compile=True).compiled and seen[2:] == [None, None]
    for bad in ("fastest", ""):
        with pytest.raises(ValueError, match="compile must be True, False or one of"):
            cliplab.load(tmp_path / "m", compile=bad)
        with pytest.raises(ValueError, match="compile must be True, False or one of"):
            EmbedOptions(compile=bad)
    for flags, want in ((["--compile-mode", "max-autotune"], [True, True]), (["--compile"], [None, None]),
                        (["--compile", "--compile-mode", "max-autotune"], [True, True])):
        seen.clear()
        out = tmp_path / f"e{len(flags)}{want[0]}"
        res = CliRunner().invoke(main, ["embed", "--synthetic", "4", "-o", str(out), "-m", str(tmp_path / "m"),
                                        "--backend", "torch", *flags])
        assert res.exit_code == 0, res.output
        assert seen == want, flags
    res = CliRunner().invoke(main, ["embed", "--synthetic", "4", "-o", str(tmp_path / "x"), "--compile-mode", "fast"])
    assert res.exit_code == 2 and "--compile-mode" in res.output



@pytest.mark.parametrize("tower", ["image", "text"])
def test_two_compiled_models_of_one_class_keep_their_own_weights(tower):
    """Dynamo caches compiled code per code object, shared by every model of a class, and its guards did not tell
    two frozen models apart: the second returned the first one's features. Each compiled tower has its own."""
    models = [cliplab.create_model("test-tiny", seed=s).eval() for s in range(2)]
    compiled = [cliplab.create_model("test-tiny", seed=s).eval().set_compiled(True) for s in range(2)]
    x = pixels(models[0])
    with torch.no_grad():
        for eager, fast in zip(models, compiled):
            if tower == "image":
                assert torch.allclose(fast.encode_image(x), eager.encode_image(x), atol=1e-5)
            else:
                assert torch.allclose(fast.encode_texts(CAPTIONS), eager.encode_texts(CAPTIONS), atol=1e-5)
