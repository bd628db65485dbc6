"""Export the CLIP towers to ONNX (``export_onnx``) and quantise them to dynamic int8 (``quantize_onnx``).

Exporter choice: ``torch.onnx.export(dynamo=True)`` (``torch.export`` + onnxscript), the default and maintained
exporter since torch 2.9. The legacy TorchScript exporter (``dynamo=False``) also produces correct graphs for these
towers in torch 2.13, and exports faster (~0.1 s vs ~2 s per tiny tower), but it is deprecated, warns on every call
and is slated for removal. The dynamo exporter also gives a cleaner graph (opset 20 with fused ``Gelu`` and
``LayerNormalization``, constant-folded) and checks dynamic axes symbolically instead of trusting a trace.
"""

from __future__ import annotations

import contextlib
import copy
import platform
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..models import CLIP
from .deps import quiet_logger, require
from .graphs import (
    IMAGE_INPUT,
    IMAGE_OUTPUT,
    TEXT_INPUT,
    TEXT_OUTPUT,
    build_graph,
    example_input,
)
from .manifest import (
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    OnnxExportError,
    normalize_towers,
    read_manifest,
    tower_file,
    write_config,
    write_manifest,
)

#: input and output names of each tower's graph
IO_NAMES = {"image": (IMAGE_INPUT, IMAGE_OUTPUT), "text": (TEXT_INPUT, TEXT_OUTPUT)}

#: a single ONNX protobuf cannot exceed 2 GB: above this many bytes of weights, they go to ``<file>.data``
EXTERNAL_DATA_BYTES = 1_800_000_000

QUANTIZED_OP_TYPES = ("MatMul", "Gemm")


def export_onnx(model: CLIP, directory: str | Path, towers: Sequence[str] | str = ("image", "text"),
                opset: int | None = None, quantize: str | None = None,
                source: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s towers as ONNX graphs into ``directory`` and return it.

    Files: ``image.onnx`` (``pixel_values [B, 3, S, S]`` float32 -> ``image_features [B, D]``), ``text.onnx``
    (``input_ids [B, L]`` int64, zeros after EOT, ``L <= context_length`` -> ``text_features [B, D]``; EOT pooling
    and the causal mask are inside the graph), ``cliplab.json`` (the config) and ``onnx_export.json`` (manifest).
    Batch and text length are dynamic. Features are unnormalised, like ``encode_image`` / ``encode_text``.

    The graphs are exported from an fp32 copy when the model is not fp32 on the CPU (fast-mode weights are cast
    up, so the export carries their rounding); ``model`` itself is never changed. ``opset`` defaults to the
    exporter's choice. ``quantize="int8"`` also writes dynamic int8 graphs (:func:`quantize_onnx`). ``source`` is
    recorded in the manifest (e.g. where the weights came from).
    """
    require("onnx")
    require("onnxscript")
    towers = normalize_towers(towers)
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # An export interrupted half-way must not look complete, and int8 graphs of an earlier export no longer match.
    (directory / MANIFEST_FILE).unlink(missing_ok=True)
    for tower in towers:
        (directory / tower_file(tower, quantized=True)).unlink(missing_ok=True)

    fp32 = _fp32_cpu_view(model)
    entries = {}
    with _eval_mode(fp32), torch.no_grad(), _quiet_exporter():
        for tower in towers:
            entries[tower] = _export_tower(fp32, tower, directory, opset)
    write_config(directory, model.config)
    if model.checkpoint_tokenizer is not None:  # the tokenizer the checkpoint shipped travels with its graphs
        model.checkpoint_tokenizer.save(directory)
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "model": model.config.name,
        "exporter": "torch.onnx.export(dynamo=True)",
        "opset": _opset_of(directory / tower_file(towers[0])),
        "versions": _versions(),
        "source_dtype": str(model.dtype).removeprefix("torch."),
        "logit_scale": float(model.logit_scale.detach().float().cpu()),
        "logit_bias": None if model.logit_bias is None else float(model.logit_bias.detach().float().cpu()),
        "towers": entries,
        "quantized": False,
        "quantization": None,
        "source": source,
    }
    write_manifest(directory, manifest)
    if quantize == "int8":
        quantize_onnx(directory, towers=towers)
    return directory


def quantize_onnx(directory: str | Path, towers: Iterable[str] | str | None = None, per_channel: bool = False,
                  reduce_range: bool = False) -> list[Path]:
    """Dynamic int8 quantisation of exported towers: ``image.onnx`` -> ``image.int8.onnx`` (and text).

    Weights of ``MatMul`` / ``Gemm`` are stored as int8; activations are quantised per call at run time
    (``onnxruntime.quantization.quantize_dynamic``). Everything else (LayerNorm, softmax, embeddings, the patch
    convolution or convolutional stem) stays fp32. The manifest records it. ``per_channel`` / ``reduce_range`` are
    passed through.
    """
    require("onnx")
    quantization = require("onnxruntime.quantization")
    ort = require("onnxruntime")
    directory = Path(directory)
    manifest = read_manifest(directory)
    exported = list(manifest["towers"])
    towers = normalize_towers(towers) if towers is not None else tuple(exported)
    missing = [t for t in towers if t not in exported]
    if missing:
        raise OnnxExportError(f"{directory}: cannot quantise {missing}: not exported (exported: {exported})")
    written = []
    for tower in towers:
        source, target = directory / tower_file(tower), directory / tower_file(tower, quantized=True)
        if not source.is_file():
            raise FileNotFoundError(f"{source} is missing; export the {tower} tower again")
        with quiet_logger():  # quantize_dynamic's "consider pre-processing" advice, for every model
            quantization.quantize_dynamic(
                source, target, weight_type=quantization.QuantType.QInt8, op_types_to_quantize=list(QUANTIZED_OP_TYPES),
                per_channel=per_channel, reduce_range=reduce_range,
                use_external_data_format=bool(manifest["towers"][tower].get("external_data")))
        manifest["towers"][tower]["int8_file"] = target.name
        written.append(target)
    manifest["quantized"] = True
    manifest["quantization"] = {
        "method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "int8",
        "op_types": list(QUANTIZED_OP_TYPES), "per_channel": per_channel, "reduce_range": reduce_range,
        "onnxruntime_version": ort.__version__,
        "towers": sorted(t for t, e in manifest["towers"].items() if e.get("int8_file")),
    }
    write_manifest(directory, manifest)
    return written


# --- helpers -----------------------------------------------------------------------------------------------------------
def _export_tower(model: CLIP, tower: str, directory: Path, opset: int | None) -> dict[str, Any]:
    from torch.export import Dim

    input_name, output_name = IO_NAMES[tower]
    axes = {0: Dim("batch")}
    if tower == "text":
        axes[1] = Dim("length", min=1, max=model.config.text.context_length)
    graph = build_graph(model, tower).eval()
    path = directory / tower_file(tower)
    external = _weight_bytes(graph) > EXTERNAL_DATA_BYTES
    torch.onnx.export(graph, (example_input(model.config, tower),), str(path), dynamo=True, verbose=False,
                      input_names=[input_name], output_names=[output_name], dynamic_shapes=(axes,),
                      opset_version=opset, external_data=external)
    return {"file": path.name, "external_data": external, **_signature(path)}


def _fp32_cpu_view(model: CLIP) -> CLIP:
    """``model`` itself when it is fp32 on the CPU (exporting only reads it), else an fp32 CPU copy."""
    floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if floats <= {torch.float32} and model.device.type == "cpu":
        return model
    warnings.warn(f"exporting from an fp32 CPU copy of a model with {sorted(map(str, floats))} weights on "
                  f"{model.device}; lost bits are not restored", stacklevel=3)
    return copy.deepcopy(model).to(device="cpu", dtype=torch.float32)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Eval mode for the block, then every submodule's own train/eval flag back."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter logs about unrelated missing packages (torchvision) and torch-internal deprecations."""
    with quiet_logger("torch.onnx"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _signature(path: Path) -> dict[str, Any]:
    """Names, shapes (``"batch"`` / ``"length"`` for dynamic axes) and dtypes of a graph's inputs and outputs."""
    onnx = require("onnx")
    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(values) -> list[dict[str, Any]]:
        return [{"name": v.name,
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
                 "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name}
                for v in values]

    return {"inputs": describe(graph.input), "outputs": describe(graph.output)}


def _opset_of(path: Path) -> int:
    onnx = require("onnx")
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _versions() -> dict[str, str]:
    from ..version import __version__

    return {"torch": torch.__version__, "onnx": require("onnx").__version__,
            "onnxscript": require("onnxscript").__version__, "cliplab": __version__,
            "python": platform.python_version()}
