"""OpenVINO's own int8: NNCF post-training (static) quantisation of an export's towers, calibrated on your inputs.

ONNX Runtime's int8 (:func:`cliplab.export.quantize_onnx`) is dynamic: weights int8, each activation quantised at run
time from its own range. NNCF (``pip install nncf``) instead measures activation ranges once, on calibration inputs,
and writes an OpenVINO model whose matmuls run int8 x int8 with VNNI. On ViT-B/32 (2 AVX-512 VNNI cores, random
weights, Flickr8k photos): 2.4x the images/s of OpenVINO f32, against 1.8x for ONNX Runtime's dynamic int8; on 2 AMX
cores 1.3x OpenVINO bf16. Plain static int8 reached an image-feature cosine to fp32 of min 0.9978 over 700 photos on
ViT-B/32 and 0.82 on the trained shapes-tiny, so the graph is made with accuracy control (operations put back to f32
until calibration images reach the bar: 0.99948 and 0.99869 on the same photos) and checked on held-out images
(docs/backends.md). The text tower is quantised only when asked (``texts=``): by default the OpenVINO int8 backend
runs int8 images and unquantised texts (bf16 where the CPU has it natively, else f32).

Calibration inputs should look like the data to embed: a few hundred of the user's own images (``cliplab embed
--backend openvino --precision int8`` takes the first ones of the job's source). The graphs are written next to the
export (``image.ov-int8.xml`` + ``.bin``), the manifest records how (``openvino_int8``: towers, calibration size and
digest, NNCF and OpenVINO versions), and :class:`~cliplab.export.openvino_runtime.OpenVINOCLIP` with
``precision="int8"`` runs them.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from .deps import NNCF_HINT, MissingDependencyError, quiet_logger
from .manifest import openvino_int8_file, read_manifest, write_manifest

#: a tower's OpenVINO int8 graph in the export directory (its weights in the ``.bin`` beside it)
INT8_SUFFIX = ".ov-int8.xml"
#: calibration samples NNCF uses at most (its default)
DEFAULT_SUBSET = 300
#: captions per calibration batch of the text tower
TEXT_CALIBRATION_BATCH = 16
#: the least image-feature cosine to f32, on held-out calibration images, at which the int8 graph is used
MIN_COSINE = 0.999
#: held-out calibration images, at least (a fifth of them when there are more)
HELD_OUT_MIN = 16
#: how graphs are compiled to be compared, as the int8 backend runs them: OpenVINO's CPU default is bf16 where the CPU
#: has it (AMX), which would blur both the reference and the int8 features
EXACT = {"INFERENCE_PRECISION_HINT": "f32"}
#: calibration samples the accuracy-controlled quantisation validates on, at most
VALIDATION_SAMPLES = 128
#: the validated images must stay within this share of the allowed drop (1 - min_cosine): images not validated fall
#: lower (shapes-tiny validated at the full drop fell under the bar on its held-out photos)
VALIDATION_MARGIN = 0.5
#: operations the accuracy control may put back to f32, at most (then it stops, and the held-out bar decides)
MAX_REVERTED = 24


def require_nncf() -> ModuleType:
    try:
        return importlib.import_module("nncf")
    except ImportError as e:
        raise MissingDependencyError(f"OpenVINO int8 needs the package 'nncf' (post-training quantisation), which is "
                                     f"not installed: {NNCF_HINT}") from e


int8_file = openvino_int8_file  # the manifest's record of a tower's int8 graph


def calibration_digest(arrays: Sequence[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def quantize_openvino(directory: str | Path, images=None, *, texts: Sequence[str] | None = None,
                      subset_size: int = DEFAULT_SUBSET, min_cosine: float | None = None) -> dict[str, Any]:
    """Write OpenVINO int8 graphs for the export in ``directory``, calibrated on ``images`` (paths or PIL images,
    preprocessed as the model does, or a pixel array ``[N, 3, S, S]``) and, when given, ``texts`` (strings). At
    most ``subset_size`` of each are used. Returns the manifest's ``openvino_int8`` record.

    ``min_cosine``: quantise with accuracy control (``nncf.quantize_with_accuracy_control``): operations are put back
    to f32, the most harmful first, until the least feature cosine to the f32 graph over up to
    :data:`VALIDATION_SAMPLES` of the calibration inputs reaches ``min_cosine``. Slower to make (the graph is
    validated once per candidate), a little slower to run; exact enough where plain static int8 is not."""
    from .openvino_runtime import require_openvino
    from .runtime import OnnxCLIP

    nncf, ov = require_nncf(), require_openvino()
    if images is None and texts is None:
        raise ValueError("quantize_openvino needs calibration inputs: images=[...] (a few hundred like yours) "
                         "and/or texts=[...]")
    directory = Path(directory)
    export = OnnxCLIP(directory)  # its preprocessor and tokenizer: the inputs the runtime will see
    samples: dict[str, list[np.ndarray]] = {}
    if images is not None:
        samples["image"] = _image_samples(export, images, subset_size)
    if texts is not None:
        samples["text"] = _text_samples(export, list(texts)[:subset_size])
    manifest = read_manifest(directory)
    record = dict(manifest.get("openvino_int8") or {"towers": {}, "calibration": {}})
    core = ov.Core()
    for tower, data in samples.items():
        if not data:
            raise ValueError(f"no {tower} calibration inputs left (all {tower}s were empty or unreadable)")
        model = core.read_model(str(export._file(tower)))
        model_type = nncf.ModelType.TRANSFORMER if not (tower == "image" and export.config.vision.is_resnet) else None
        with quiet_logger("nncf"):  # a statistics pass and a short dataset each log a WARNING
            if min_cosine is None:
                quantized = nncf.quantize(model, nncf.Dataset(data), model_type=model_type, subset_size=subset_size)
                reverted = None
            else:
                quantized, reverted = _quantize_controlled(nncf, core, model, data, min_cosine, model_type,
                                                           subset_size)
        target = directory / f"{tower}{INT8_SUFFIX}"
        scratch = directory / f".{tower}.partial-{os.getpid()}{INT8_SUFFIX}"
        ov.save_model(quantized, str(scratch))  # then renamed: a reader never opens half a graph
        os.replace(scratch.with_suffix(".bin"), target.with_suffix(".bin"))
        os.replace(scratch, target)
        record["towers"][tower] = target.name
        record["calibration"][tower] = {"samples": sum(len(d) for d in data), "sha256": calibration_digest(data)}
        if reverted is not None:
            record["calibration"][tower]["accuracy_control"] = {"min_cosine": min_cosine, **reverted}
    record.update(nncf_version=nncf.__version__, openvino_version=ov.__version__, subset_size=subset_size,
                  method="nncf.quantize (post-training, static int8)" if min_cosine is None else
                  "nncf.quantize_with_accuracy_control (post-training, static int8, min feature cosine)")
    manifest["openvino_int8"] = record
    write_manifest(directory, manifest)
    return record


def _feature_cosines(compiled, items) -> list[float]:
    """Cosine of each item's features from ``compiled`` to its reference features; items are ``(input, reference)``
    with the reference rows L2-normalised."""
    out = []
    for x, ref in items:
        f = np.asarray(compiled(x)[0], dtype=np.float32)
        f = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
        out.extend((f * ref).sum(-1).tolist())
    return out


def _quantize_controlled(nncf, core, model, data: list[np.ndarray], min_cosine: float, model_type, subset_size: int):
    """``nncf.quantize_with_accuracy_control`` with the least feature cosine to f32 as the metric (per-item cosines
    rank the operations); returns the graph and what was put back to f32."""
    f32 = core.compile_model(model, "CPU", EXACT)
    validation = data[:VALIDATION_SAMPLES]
    refs = []
    for x in validation:
        r = np.asarray(f32(x)[0], dtype=np.float32)
        refs.append(r / np.maximum(np.linalg.norm(r, axis=-1, keepdims=True), 1e-12))
    # per item, not per batch: NNCF ranks operations by the items they hurt (a text batch counts as one item: its
    # least cosine)

    def validate(compiled, items):
        per_item = [min(_feature_cosines(compiled, [item])) for item in items]
        return min(per_item), per_item

    advanced = nncf.quantization.advanced_parameters
    restorer = advanced.AdvancedAccuracyRestorerParameters(max_num_iterations=MAX_REVERTED)
    # SmoothQuant off: NNCF's restorer does not undo its rescaling, so operations put back to f32 broke the graph
    # (test-tiny with every quantizer reverted: cosine 0.55 to f32 with SmoothQuant, 0.99996 without it)
    no_smoothing = advanced.AdvancedQuantizationParameters(
        smooth_quant_alphas=advanced.AdvancedSmoothQuantParameters(matmul=-1))
    target = 1.0 - (1.0 - min_cosine) * VALIDATION_MARGIN  # unseen images fall lower than the validated ones
    quantized = nncf.quantize_with_accuracy_control(
        model, nncf.Dataset(data), nncf.Dataset(list(zip(validation, refs)), lambda item: item[0]), validate,
        max_drop=1.0 - target, drop_type=nncf.DropType.ABSOLUTE, model_type=model_type, subset_size=subset_size,
        advanced_accuracy_restorer_parameters=restorer, advanced_quantization_parameters=no_smoothing)
    achieved = min(_feature_cosines(core.compile_model(quantized, "CPU", EXACT), list(zip(validation, refs))))
    kept = sum(1 for op in quantized.get_ops() if op.get_type_name() == "FakeQuantize")
    return quantized, {"validation_samples": len(validation), "validation_target": target,
                       "validation_min_cosine": achieved,
                       "quantizers_left": kept}


def ensure_openvino_int8(directory: str | Path, images, min_cosine: float = MIN_COSINE) -> dict[str, Any]:
    """The export's OpenVINO int8 record, quantising the image tower first unless it was calibrated on exactly these
    ``images`` already (same preprocessed pixels, so a rerun reuses the graph).

    The graph is made with accuracy control (:func:`quantize_openvino` with ``min_cosine``): operations go back to f32
    until the calibration images' features reach ``min_cosine`` (plain static int8 reached only 0.9978 on ViT-B/32
    with random weights and 0.82 on the trained shapes-tiny, docs/fast_path.md). A fifth of the images (at least
    :data:`HELD_OUT_MIN`) is held out of calibration and encoded by the int8 and the f32 graph; the cosines are
    recorded, and a graph whose minimum falls below ``min_cosine`` there is refused with a ``ValueError``."""
    from .runtime import OnnxCLIP

    samples = _image_samples(OnnxCLIP(directory), images, DEFAULT_SUBSET + DEFAULT_SUBSET // 4)
    if not samples:
        raise ValueError("no calibration images: OpenVINO int8 calibrates on a few hundred images like yours")
    control = min_cosine if min_cosine > 0 else None  # a bar of 0 (benchmarks measure any graph): plain int8
    record = read_manifest(Path(directory)).get("openvino_int8") or {}
    image = (record.get("calibration") or {}).get("image", {})
    made_with = (image.get("accuracy_control") or {}).get("min_cosine")
    if image.get("sha256") != calibration_digest(samples) or int8_file(directory, "image") is None \
            or made_with != control:
        held = max(HELD_OUT_MIN, len(samples) // 5) if len(samples) > HELD_OUT_MIN else 0
        record = quantize_openvino(directory, np.concatenate(samples[: len(samples) - held] or samples),
                                   min_cosine=control)
        record = _record_fidelity(directory, samples[len(samples) - held :] if held else [], samples)
        image = record["calibration"]["image"]
    fidelity = image.get("held_out") or {}
    if fidelity and fidelity["min_cosine"] < min_cosine:
        raise ValueError(f"OpenVINO int8 is not exact enough for this model: image-feature cosine to f32 min "
                         f"{fidelity['min_cosine']:.4f} (mean {fidelity['mean_cosine']:.4f}) on {fidelity['images']} "
                         f"held-out calibration images, below {min_cosine}; use precision='fp32', or "
                         "backend='onnxruntime' with precision='int8' (dynamic int8)")
    return record


def _record_fidelity(directory: str | Path, held_out: list[np.ndarray], samples: list[np.ndarray]) -> dict:
    """Encode the held-out images with the int8 and the f32 image graph; write the cosines and the digest of every
    calibration image (held-out ones included: a rerun with the same images finds the record) to the manifest."""
    from .openvino_runtime import require_openvino

    directory = Path(directory)
    manifest = read_manifest(directory)
    record = manifest["openvino_int8"]
    entry = record["calibration"]["image"]
    entry["sha256"] = calibration_digest(samples)
    if held_out:
        core = require_openvino().Core()
        x = np.concatenate(held_out)
        graphs = [core.compile_model(str(directory / name), "CPU", EXACT)
                  for name in (manifest["towers"]["image"]["file"], record["towers"]["image"])]
        f32, int8 = ([g(x[i : i + 32])[0] for i in range(0, len(x), 32)] for g in graphs)
        f32, int8 = np.concatenate(f32), np.concatenate(int8)
        cos = (f32 * int8).sum(-1) / (np.linalg.norm(f32, axis=-1) * np.linalg.norm(int8, axis=-1))
        entry["held_out"] = {"images": len(x), "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}
    write_manifest(directory, manifest)
    return record


def _image_samples(export, images, limit: int) -> list[np.ndarray]:
    """One ``[1, 3, S, S]`` array per calibration image (NNCF counts samples by dataset items)."""
    import torch

    if isinstance(images, (np.ndarray, torch.Tensor)):
        pixels = np.asarray(images, dtype=np.float32)[:limit]
        if pixels.ndim != 4:
            raise ValueError(f"calibration pixels must be [N, 3, S, S], got shape {list(pixels.shape)}")
    else:
        pixels = export.preprocessor.batch(list(images)[:limit]).float().numpy()
    return [np.ascontiguousarray(pixels[i : i + 1]) for i in range(len(pixels))]


def _text_samples(export, texts: list[str]) -> list[np.ndarray]:
    """Token-id batches cut to their longest caption, as the runtime feeds them."""
    out = []
    for i in range(0, len(texts), TEXT_CALIBRATION_BATCH):
        tok = export.tokenize(texts[i : i + TEXT_CALIBRATION_BATCH])
        out.append(np.ascontiguousarray(tok.ids[:, : int(tok.lengths.max())].numpy()))
    return out


__all__ = ["NNCF_HINT", "INT8_SUFFIX", "ensure_openvino_int8", "int8_file", "quantize_openvino", "require_nncf"]
