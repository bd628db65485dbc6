"""Inference backends behind one switch (``cliplab.export.backends.load_backend``) and the OpenVINO runtime.

One export of the shipped shapes-tiny model (through ``load_backend``, into a fingerprint-keyed cache) carries the
whole file. Parity is against the PyTorch model, on seeded pixels, rendered scenes (the same preprocessing) and
captions of varied length (the same length-ordered batching). Backends whose package is absent are skipped.
"""

from __future__ import annotations

import json

import importlib.util
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import CAPTIONS

import cliplab
from cliplab.data.synthetic import SceneWorld
from cliplab.export import MissingDependencyError
from cliplab.export.backends import BACKENDS, backend_info, check_backend, ensure_export, load_backend
from cliplab.export.manifest import read_manifest
from cliplab.pipeline.modelref import fingerprint

pytestmark = [pytest.mark.usefixtures("one_thread")]
for _name in ("onnx", "onnxscript"):  # exporting needs them whatever the backend
    if importlib.util.find_spec(_name) is None:
        pytestmark.append(pytest.mark.skip(reason=f"exporting needs {_name}: pip install 'cliplab[onnx]'"))

DOC = Path(__file__).resolve().parents[1] / "docs" / "backends.md"
HAS = {"onnxruntime": importlib.util.find_spec("onnxruntime") is not None,
       "openvino": importlib.util.find_spec("openvino") is not None, "torch": True}

#: minimum row cosine to the fp32 PyTorch model, per (backend, precision); measured values are in docs/backends.md
FIDELITY = {("torch", "fp32"): 0.999999, ("torch", "bf16"): 0.999, ("onnxruntime", "fp32"): 0.99999,
            ("onnxruntime", "int8"): 0.99, ("openvino", "fp32"): 0.99999, ("openvino", "bf16"): 0.999}
#: pairs that need calibration inputs first (tests/test_openvino_int8.py)
CALIBRATED = {("openvino", "int8")}


def needs(backend: str):
    return pytest.mark.skipif(not HAS[backend], reason=f"backend {backend!r} not installed: pip install {backend}")


@pytest.fixture(scope="module")
def world():
    """The fp32 shapes-tiny model, its export in a fresh cache root, and shared inputs."""
    tmp = Path(__import__("tempfile").mkdtemp(prefix="cliplab-backends-"))
    model = cliplab.load("shapes-tiny")
    cache_root = tmp / "cache"
    directory = ensure_export("shapes-tiny", cache_root=cache_root)
    scenes = SceneWorld(image_size=64, seed=3)
    images = [scenes.sample(i).render() for i in range(11)]
    pixels = torch.randn(20, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    texts = CAPTIONS + [scenes.sample(i).short_caption for i in range(7)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long caption's truncation warning
        ref = {"pixels": model.encode_image(pixels), "images": model.encode_images(images, batch_size=4),
               "texts": model.encode_texts(texts, batch_size=3)}
    yield {"model": model, "dir": directory, "cache_root": cache_root, "tmp": tmp, "images": images,
           "pixels": pixels, "texts": texts, "ref": ref}
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).min())


# --- the switch ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,precision", list(FIDELITY))
def test_every_backend_matches_torch_within_its_fidelity(world, backend, precision):
    if not HAS[backend]:
        pytest.skip(f"backend {backend!r} not installed: pip install {backend}")
    # torch loads by name (an object at fp32 would come back as itself); the others export from the object
    source, options = ("shapes-tiny", {}) if backend == "torch" else (world["model"], {"cache_root": world["cache_root"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 on a CPU without native bf16: a PerformanceWarning
        model = load_backend(source, backend, precision, **options)
        with torch.no_grad():
            got = {"pixels": model.encode_image(world["pixels"]),  # 20 rows: 8 + 8 + 4 through OpenVINO's queue
                   "images": model.encode_images(world["images"], batch_size=4),
                   "texts": model.encode_texts(world["texts"], batch_size=3)}
    assert backend_info(model) == {"backend": backend, "precision": precision}
    for key, ref in world["ref"].items():
        assert got[key].dtype == torch.float32 and got[key].shape == ref.shape, key
        assert min_cosine(ref, got[key]) >= FIDELITY[backend, precision], (key, min_cosine(ref, got[key]))
    if precision == "fp32":  # exact backends agree elementwise too, not just in direction
        assert max(float((got[k] - r).abs().max()) for k, r in world["ref"].items()) < 1e-4


def test_cache_is_keyed_by_fingerprint_and_reused(world, monkeypatch):
    assert world["dir"] == world["cache_root"] / "exports" / fingerprint(world["model"])
    assert read_manifest(world["dir"])["source"]["fingerprint"] == fingerprint(world["model"])
    stamps = {p.name: p.stat().st_mtime_ns for p in world["dir"].glob("*.onnx")}

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr("cliplab.export.onnx.export_onnx", no_export)
    assert ensure_export(world["model"], cache_root=world["cache_root"]) == world["dir"]
    assert {p.name: p.stat().st_mtime_ns for p in world["dir"].glob("*.onnx")} == stamps


def test_export_dir_of_other_weights_is_refused(world):
    other = cliplab.load("shapes-tiny")
    with torch.no_grad():
        other.logit_scale.add_(0.5)  # one changed weight: another fingerprint
    with pytest.raises(ValueError, match="export of other weights"):
        ensure_export(other, export_dir=world["dir"])


def test_export_dir_and_int8_reach_the_export(world, tmp_path, monkeypatch):
    """``export_dir`` is where the export goes (through a scratch sibling renamed into place), with the model's
    fingerprint as its source; ``int8`` reaches ``quantize_onnx`` for that directory only when it lacks int8 graphs.
    The exporter and quantiser are stand-ins here (the real ones ran in the fixture and the int8 parity tests)."""
    import shutil

    calls = []

    def fake_export(model, directory, source=None):
        calls.append(("export", model, Path(directory).parent, source))
        shutil.copytree(world["dir"], directory, ignore=shutil.ignore_patterns("openvino_cache"))

    def fake_quantize(directory):
        calls.append(("quantize", Path(directory)))

    monkeypatch.setattr("cliplab.export.onnx.export_onnx", fake_export)
    monkeypatch.setattr("cliplab.export.onnx.quantize_onnx", fake_quantize)
    target = tmp_path / "mine"
    target.mkdir()  # an empty directory is fine
    assert ensure_export(world["model"], export_dir=target) == target and (target / "text.onnx").is_file()
    kind, model, parent, source = calls.pop()
    assert (kind, model, parent) == ("export", world["model"], tmp_path)
    assert source["fingerprint"] == fingerprint(world["model"]) and source["kind"] == "object"
    assert not list(tmp_path.glob(".mine.partial-*"))
    manifest = read_manifest(target)
    manifest["quantized"] = False
    (target / "onnx_export.json").write_text(__import__("json").dumps(manifest))
    assert ensure_export(target) == target and not calls  # fp32: nothing to add
    assert ensure_export(target, int8=True) == target and calls == [("quantize", target)]
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not an ONNX export"):
        ensure_export(world["model"], export_dir=tmp_path / "junk")


@needs("onnxruntime")
def test_onnxruntime_keywords_reach_the_runtime(world):
    model = load_backend(world["dir"], "onnxruntime", "int8", threads=3, providers=["CPUExecutionProvider"])
    assert (model.quantized, model.threads, model.providers, model.directory) == (True, 3, ["CPUExecutionProvider"],
                                                                                  world["dir"])
    assert load_backend(world["dir"], "onnxruntime", threads=2).quantized is False


@needs("openvino")
def test_openvino_keywords_reach_the_runtime(world, tmp_path):
    from cliplab.export.openvino_runtime import OpenVINOCLIP, load_openvino

    kwargs = dict(threads=3, performance_hint="latency", queue_batch=3, cache_dir=tmp_path / "ov",
                  config={"NUM_STREAMS": 1})
    for model in (load_backend(world["dir"], "openvino", "bf16", **kwargs), load_openvino(world["dir"], "bf16", **kwargs)):
        assert isinstance(model, OpenVINOCLIP) and model.directory == world["dir"]
        assert (model.precision, model.threads, model.performance_hint, model.queue_batch, model.cache_dir) == (
            "bf16", 3, "latency", 3, tmp_path / "ov")
        assert model.compile_config("image") == {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16",
                                                 "INFERENCE_NUM_THREADS": 3, "CACHE_DIR": str(tmp_path / "ov"),
                                                 "NUM_STREAMS": 1}
    default = load_backend(world["dir"], "openvino", threads=1)
    assert default.precision == "fp32" and not default.quantized and default.session("image").compiled.inputs[0].get_any_name() == "pixel_values"
    assert default.compile_config("image")["PERFORMANCE_HINT"] == "THROUGHPUT"
    assert default.compile_config("text")["PERFORMANCE_HINT"] == "LATENCY"
    # the async chunk follows the precision unless given (the best measured for ViT-B/32), None = synchronous
    from cliplab.export.openvino_runtime import DEFAULT_QUEUE_BATCH

    assert default.queue_batch == DEFAULT_QUEUE_BATCH["fp32"] == 8
    assert load_openvino(world["dir"], "bf16").queue_batch == DEFAULT_QUEUE_BATCH["bf16"] == 32
    assert load_openvino(world["dir"], "bf16", queue_batch=None).queue_batch is None
    assert "CACHE_DIR" not in load_openvino(world["dir"], cache_dir=False).compile_config("text")


@needs("openvino")
def test_openvino_reuses_its_compiled_cache(world, tmp_path):
    from cliplab.export.openvino_runtime import load_openvino

    cache = tmp_path / "ov"
    first = load_openvino(world["dir"], threads=1, cache_dir=cache)
    assert not first.loaded_from_cache("image") and not first.loaded_from_cache("text")
    blobs = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert len(blobs) >= 2
    second = load_openvino(world["dir"], threads=1, cache_dir=cache)  # a new Core: only the disk cache is shared
    assert second.loaded_from_cache("image") and second.loaded_from_cache("text")
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == blobs
    # the default cache sits next to the export
    assert load_openvino(world["dir"], threads=1).cache_dir == world["dir"] / "openvino_cache" / "fp32"


@needs("openvino")
def test_openvino_async_queue_is_exact_in_any_chunking(world):
    """Chunks of 3 over two requests in flight (callbacks in any order) give the rows of one synchronous call."""
    from cliplab.export.openvino_runtime import load_openvino

    sync = load_openvino(world["dir"], threads=2, queue_batch=None, cache_dir=False)
    queued = load_openvino(world["dir"], threads=2, queue_batch=3, cache_dir=False,
                           config={"NUM_STREAMS": 2, "PERFORMANCE_HINT_NUM_REQUESTS": 2})
    assert queued.session("image").jobs >= 2
    x = world["pixels"][:10]
    assert torch.allclose(queued.encode_image(x), sync.encode_image(x), atol=1e-5)
    rows = torch.cat([sync.encode_image(x[i : i + 1]) for i in range(len(x))])
    assert torch.allclose(queued.encode_image(x), rows, atol=1e-5)
    streamed = queued.encode_images(world["images"], batch_size=5, normalize=True)  # 5 + 5 + 1, each in chunks
    assert torch.allclose(streamed, F.normalize(sync.encode_images(world["images"]), dim=-1), atol=1e-5)
    assert queued.encode_images([]).shape == (0, world["model"].config.embed_dim)


@needs("openvino")
def test_openvino_reports_the_precision_it_runs(world):
    from cliplab.export.openvino_runtime import load_openvino
    from cliplab.models.hardware import native_bf16

    from cliplab.models.hardware import cpu_flags

    bf16 = load_openvino(world["dir"], "bf16", threads=1, cache_dir=False)
    if native_bf16():
        assert bf16.inference_precision("text") == "bf16"
    elif "avx512f" not in (cpu_flags() or ()):  # AVX2 only: OpenVINO silently keeps f32
        assert bf16.inference_precision("text") == "f32"
    else:  # AVX-512 without bf16 instructions: OpenVINO 2026.4 emulates bf16 (reports it, runs slower than f32)
        assert bf16.inference_precision("text") in ("bf16", "f32")
    assert load_openvino(world["dir"], threads=1, cache_dir=False).inference_precision() == "f32"


def test_torch_backend_copies_an_object_and_keeps_it_fp32(world):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = load_backend(world["model"], "torch", "bf16")
    assert fast is not world["model"] and fast.precision == "bf16" and world["model"].precision == "fp32"
    assert load_backend(world["model"], "torch") is world["model"]


# --- errors ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,precision,match", [
    ("torch", "int8", "use backend='onnxruntime' or 'openvino'$"),
    ("onnxruntime", "bf16", "use backend='openvino' or 'torch'"),
    ("openvino", "fp16", "not 'fp16'"),
    ("tensorrt", "fp32", "backend must be one of"),
])
def test_unsupported_pairs_are_refused(backend, precision, match):
    with pytest.raises(ValueError, match=match):
        check_backend(backend, precision)
    with pytest.raises(ValueError, match=match):  # before anything is loaded: the name does not exist
        load_backend("no-such-model", backend, precision)


def test_offered_pairs_are_exactly_the_table():
    offered = {(b, p) for b, ps in BACKENDS.items() for p in ps}
    assert offered == set(FIDELITY) | CALIBRATED
    for backend, precision in offered:
        check_backend(backend, precision)


@pytest.mark.parametrize("backend,install", [("openvino", "pip install openvino"),
                                             ("onnxruntime", "pip install onnxruntime")])
def test_missing_package_gives_one_line_install_hint(monkeypatch, backend, install):
    monkeypatch.setitem(sys.modules, backend, None)  # import of the package fails as if it were not installed
    with pytest.raises(MissingDependencyError) as info:
        load_backend("no-such-model", backend)  # raised before the model is looked for
    message = str(info.value)
    assert "\n" not in message and message.endswith(install) and repr(backend) in message
    if backend == "openvino":
        from cliplab.export.openvino_runtime import load_openvino

        with pytest.raises(MissingDependencyError, match=re.escape(install)):
            load_openvino("anywhere")


def test_misused_options_are_refused(world):
    with pytest.raises(ValueError, match="takes no export_dir, threads"):
        load_backend(world["model"], "torch", threads=2)
    with pytest.raises(ValueError, match="is an ONNX export"):
        load_backend(world["dir"], "torch")
    with pytest.raises(ValueError, match="already an export"):
        ensure_export(world["dir"], export_dir=world["tmp"] / "elsewhere")


@needs("openvino")
def test_openvino_option_errors(world):
    from cliplab.export.openvino_runtime import load_openvino

    with pytest.raises(FileNotFoundError, match="no OpenVINO int8 graphs yet.*cliplab embed.*onnxruntime"):
        load_openvino(world["dir"], precision="int8")  # not calibrated: how to, and the alternative
    for kwargs, match in [({"precision": "fp16"}, "precision must be"), ({"performance_hint": "fast"}, "hint must"),
                          ({"queue_batch": 0}, "queue_batch must")]:
        with pytest.raises(ValueError, match=match):
            load_openvino(world["dir"], **kwargs)


# --- the page ------------------------------------------------------------------------------------------------------------
@needs("openvino")
def test_backends_page_runs(world, monkeypatch):
    """The page's examples run (against this file's cache, so nothing is exported again)."""
    monkeypatch.setenv("CLIPLAB_CACHE", str(world["cache_root"]))
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert blocks
    ns: dict = {"__name__": "docs_backends"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{DOC.name}[block {i}]", "exec"), ns)


# ----------------------------------------------------------------------------------------------- the switch, wired
def test_cli_backend_switch_embeds_classifies_and_searches(world, monkeypatch, tmp_path):
    """``--backend`` on embed, classify and search (and ``cliplab.load(backend=)``) reach the runtime: the same
    embeddings as torch within fp32 fidelity, the backend recorded in the job, refusals as one-line errors."""
    import glob

    import numpy as np
    import pyarrow.parquet as pq
    from click.testing import CliRunner

    import cliplab
    from cliplab.cli import main

    needs("onnxruntime")
    monkeypatch.setenv("CLIPLAB_CACHE", str(world["cache_root"]))
    assert type(cliplab.load("shapes-tiny", backend="onnxruntime")).__name__ == "OnnxCLIP"
    with pytest.raises(ValueError, match="takes only precision"):
        cliplab.load("shapes-tiny", backend="onnxruntime", device="cpu")
    run = CliRunner().invoke
    emb = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / backend
        r = run(main, ["embed", "synthetic:6", "-o", str(out), "--backend", backend, "--json", "--no-progress"])
        assert r.exit_code == 0, r.output
        table = pq.read_table(glob.glob(str(out / "shards" / "*.parquet"))[0])
        emb[backend] = np.stack(table.column("image_embedding").to_pylist())
        manifest = (out / "manifest.json").read_text()
        assert ('"backend": "onnxruntime"' in manifest) == (backend == "onnxruntime")
    assert float((emb["torch"] * emb["onnxruntime"]).sum(1).min()) > 0.99999
    r = run(main, ["embed", "synthetic:6", "-o", str(tmp_path / "torch"), "--backend", "onnxruntime",
                   "--no-progress"])
    assert r.exit_code != 0  # the job was made by torch: a rerun cannot mix backends
    r = run(main, ["embed", "synthetic:2", "-o", str(tmp_path / "x"), "--precision", "int8"])
    assert r.exit_code != 0 and "onnxruntime" in r.output
    image = str(world["tmp"] / "probe.png")
    from cliplab.data.synthetic import SceneWorld

    SceneWorld(64, seed=3).sample(0).render().save(image)
    for backend in ("torch", "onnxruntime"):
        r = run(main, ["classify", image, "--labels", "red,blue,green", "--backend", backend, "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.output[r.output.index("{"):])["backend"] == backend  # what ran, read off the model
    r = run(main, ["classify", image, "--labels", "red,blue", "--backend", "openvino", "--precision", "int8"])
    assert r.exit_code != 0 and "onnxruntime" in r.output
