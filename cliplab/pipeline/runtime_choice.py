"""``backend="auto"`` / ``precision="auto"`` for embedding jobs: the fastest runtime that keeps full fidelity here.

Measured side by side on ViT-B/32 (docs/fast_path.md): on a CPU that multiplies bf16 natively (AMX, AVX512-BF16),
bf16 runs images about 3.7x and texts 3x faster than fp32 at a feature cosine to exact of 0.99994 (min, real photos
and captions), and OpenVINO's bf16 runs images faster than cliplab's eager bf16; elsewhere bf16 is emulated and
several times slower, so fp32 stays. int8 is never chosen: it needs calibration and its fidelity depends on the model.

A job that already exists in the output directory keeps what it was started with (resuming on a machine without
OpenVINO, or without bf16, must not turn into a mismatch); ``overwrite`` starts afresh.
"""

from __future__ import annotations

import json
from pathlib import Path

from .shards import JOB_FILE

AUTO = "auto"


def recorded_runtime(out_dir: str | Path) -> tuple[str, str] | None:
    """``(backend, precision)`` of the job in ``out_dir``, or None when there is none (or it cannot be read: the job
    itself then reports why)."""
    path = Path(out_dir) / JOB_FILE
    try:
        options = json.loads(path.read_text()).get("options") or {}
    except (OSError, ValueError, AttributeError):
        return None
    return options.get("backend", "torch"), options.get("precision", "fp32")


def best_precision(device: str) -> str:
    """bf16 on a CPU with native bf16, fp32 otherwise (and on other devices)."""
    from ..models.hardware import native_bf16

    return "bf16" if str(device) == "cpu" and native_bf16() else "fp32"


def best_backend(precision: str, *, engine: str, device: str, compile: bool) -> str:
    """OpenVINO where it is installed and can run the job (local engine, CPU, no torch.compile asked for, a precision
    it offers), else torch; int8 (asked for explicitly) falls back to ONNX Runtime's, torch having none."""
    if engine != "local" or str(device) != "cpu" or compile:
        return "torch"
    from ..export.backends import available_backends

    offered = available_backends()
    for backend in ("openvino", "onnxruntime") if precision == "int8" else ("openvino",):
        if precision in offered.get(backend, ()):
            return backend
    return "torch"


def choose_runtime(backend: str, precision: str, *, engine: str, device: str, compile: bool,
                   out_dir: str | Path | None = None, overwrite: bool = False) -> tuple[str, str]:
    """Resolve ``"auto"`` in ``backend`` / ``precision``; explicit values pass through unchanged."""
    if AUTO not in (backend, precision):
        return backend, precision
    recorded = recorded_runtime(out_dir) if out_dir is not None and not overwrite else None
    if recorded is not None:
        return (recorded[0] if backend == AUTO else backend), (recorded[1] if precision == AUTO else precision)
    if precision == AUTO:
        precision = best_precision(device) if backend in (AUTO, "torch", "openvino") else "fp32"
    if backend == AUTO:
        backend = best_backend(precision, engine=engine, device=device, compile=compile)
    return backend, precision


__all__ = ["AUTO", "best_backend", "best_precision", "choose_runtime", "recorded_runtime"]
