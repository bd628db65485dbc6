"""One switch for the inference backend: ``load_backend(model, backend="torch"|"onnxruntime"|"openvino", precision)``.

::

    from cliplab.export.backends import load_backend
    model = load_backend("shapes-tiny", backend="openvino", precision="bf16")   # exports once, then cached
    feats = model.encode_texts(["a red circle"], normalize=True)

Every backend returns an object with the plain inference API of :class:`cliplab.CLIP` (``encode_image(s)``,
``encode_text(s)``, ``tokenize``, ``preprocess``), the same preprocessing and the same length-ordered text batching:

============  ========================  =====================================================================
backend       precisions                what runs
============  ========================  =====================================================================
torch         fp32, bf16                :class:`cliplab.CLIP` itself (bf16: the fast mode, ``set_precision``)
onnxruntime   fp32, int8                :class:`~cliplab.export.OnnxCLIP` on the ONNX export (int8: dynamic int8
                                        graphs, ``quantize_onnx``)
openvino      fp32, bf16, int8          :class:`~cliplab.export.openvino_runtime.OpenVINOCLIP` on the same export
                                        (int8: NNCF static int8 image graph calibrated on your images,
                                        :mod:`.openvino_int8`; texts bf16 on a native-bf16 CPU, else f32)
============  ========================  =====================================================================

Other pairs raise ``ValueError``: ONNX Runtime's CPU provider has no bf16 path for these graphs, and the PyTorch
model has no int8 path. The ONNX backends need an export: ``load_backend`` writes it on first use into ``export_dir``, or, when
none is given, into ``<cache_root>/exports/<fingerprint>`` where the fingerprint hashes the config and every weight
(:func:`cliplab.pipeline.modelref.fingerprint`), so changed weights never reuse a stale export. The manifest records
the fingerprint; an ``export_dir`` holding another model's export is refused. An export directory passed as the model
is used as it is. Finding the fingerprint loads the PyTorch model once per call (seconds for ViT-B/32).
"""

from __future__ import annotations

import copy
import importlib
import os
import shutil
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

from .deps import MissingDependencyError
from .manifest import MANIFEST_FILE, read_manifest

#: backend -> the precisions it offers
BACKENDS: dict[str, tuple[str, ...]] = {
    "torch": ("fp32", "bf16"),
    "onnxruntime": ("fp32", "int8"),
    "openvino": ("fp32", "bf16", "int8"),
}
#: backend -> (import name, install line)
PACKAGES = {"onnxruntime": ("onnxruntime", "pip install onnxruntime"),
            "openvino": ("openvino", "pip install openvino")}
#: what to use instead, for each refused (backend, precision) pair
_INSTEAD = {("torch", "int8"): "backend='onnxruntime' or 'openvino'",
            ("onnxruntime", "bf16"): "backend='openvino' or 'torch'"}


def check_backend(backend: str, precision: str) -> None:
    """Raise ``ValueError`` (saying what to use instead) unless ``backend`` offers ``precision``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    offered = BACKENDS[backend]
    if precision not in offered:
        instead = _INSTEAD.get((backend, precision))
        hint = f"; for {precision} use {instead}" if instead else ""
        raise ValueError(f"backend={backend!r} offers precision {' / '.join(offered)}, not {precision!r}{hint}")


def require_backend(backend: str) -> ModuleType | None:
    """Import the optional package ``backend`` runs on (None for torch), or raise :class:`MissingDependencyError`
    with its one-line install hint."""
    if backend not in PACKAGES:
        return None
    name, install = PACKAGES[backend]
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise MissingDependencyError(f"backend={backend!r} needs the package {name!r}, which is not installed: "
                                     f"{install}") from e


def available_backends() -> dict[str, tuple[str, ...]]:
    """The backends whose packages are installed, with their precisions (torch is always there)."""
    out = {}
    for backend, precisions in BACKENDS.items():
        try:
            require_backend(backend)
        except MissingDependencyError:
            continue
        out[backend] = precisions
    return out


def default_cache_root() -> Path:
    """``$CLIPLAB_CACHE``, else ``$XDG_CACHE_HOME/cliplab``, else ``~/.cache/cliplab``."""
    if os.environ.get("CLIPLAB_CACHE"):
        return Path(os.environ["CLIPLAB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cliplab"


def is_export_dir(path) -> bool:
    """Whether ``path`` is a directory written by :func:`cliplab.export.export_onnx`."""
    return isinstance(path, (str, os.PathLike)) and (Path(path) / MANIFEST_FILE).is_file()


def load_backend(name_or_dir, backend: str = "torch", precision: str = "fp32", export_dir: str | Path | None = None,
                 *, threads: int | None = None, cache_root: str | Path | None = None, calibration=None,
                 **options: Any):
    """A model with the plain inference API of :class:`cliplab.CLIP`, run by ``backend`` at ``precision``.

    ``name_or_dir``: anything :func:`cliplab.pipeline.resolve_model` takes (a pretrained name, a checkpoint path, a
    ``CLIP`` object, an architecture name for random weights) or an ONNX export directory (ONNX backends only).
    ``export_dir``: where the ONNX export lives or is written (default: the fingerprint-keyed cache under
    ``cache_root``, see :func:`default_cache_root`). ``threads``: the runtime's intra-op threads (ONNX backends;
    for torch use ``torch.set_num_threads``). ``options`` go to the runtime's ``load``: ``providers`` for ONNX
    Runtime; ``performance_hint``, ``queue_batch``, ``cache_dir``, ``config`` for OpenVINO. ``calibration``
    (OpenVINO int8): images (paths, PIL images or pixels ``[N, 3, S, S]``) to calibrate the int8 image graph on when
    the export has none yet, or has one calibrated on other images (:func:`.openvino_int8.quantize_openvino`).
    """
    if calibration is not None and (backend, precision) != ("openvino", "int8"):
        raise ValueError("calibration= is for backend='openvino', precision='int8'")
    check_backend(backend, precision)
    require_backend(backend)  # the install hint comes before any loading or exporting
    if backend == "torch":
        if threads is not None or options or export_dir is not None:
            raise ValueError("backend='torch' takes no export_dir, threads or runtime options (use "
                             "torch.set_num_threads); they are for backend='onnxruntime' / 'openvino'")
        return torch_model(name_or_dir, precision)
    directory = ensure_export(name_or_dir, export_dir, int8=backend == "onnxruntime" and precision == "int8",
                              cache_root=cache_root)
    if calibration is not None:
        from .openvino_int8 import ensure_openvino_int8

        ensure_openvino_int8(directory, calibration)
    if backend == "onnxruntime":
        from .runtime import OnnxCLIP

        return OnnxCLIP.load(directory, quantized=precision == "int8", threads=threads, **options)
    from .openvino_runtime import OpenVINOCLIP

    return OpenVINOCLIP.load(directory, precision=precision, threads=threads, **options)


def backend_info(model) -> dict[str, str]:
    """``{"backend": ..., "precision": ...}`` of a model :func:`load_backend` returned (for reports and job records)."""
    from .openvino_runtime import OpenVINOCLIP
    from .runtime import OnnxCLIP

    if isinstance(model, OpenVINOCLIP):  # before OnnxCLIP: it is one
        return {"backend": "openvino", "precision": model.precision}
    if isinstance(model, OnnxCLIP):
        return {"backend": "onnxruntime", "precision": "int8" if model.quantized else "fp32"}
    return {"backend": "torch", "precision": model.precision}


def torch_model(spec, precision: str = "fp32"):
    """The PyTorch model for ``spec`` at ``precision``; a ``CLIP`` object passed in is copied, never changed."""
    from ..pipeline.modelref import resolve_model

    if is_export_dir(spec):
        raise ValueError(f"{spec} is an ONNX export (no PyTorch weights): use backend='onnxruntime' or 'openvino'")
    model, info = resolve_model(spec)
    if model.precision != precision:
        if info["kind"] == "object":
            model = copy.deepcopy(model)
        model.set_precision(precision)
    return model.eval()


def ensure_export(name_or_dir, export_dir: str | Path | None = None, int8: bool = False,
                  cache_root: str | Path | None = None) -> Path:
    """The export directory for ``name_or_dir``, written on first use (see :func:`load_backend`); with ``int8``,
    its int8 graphs are added when missing."""
    from .onnx import export_onnx, quantize_onnx

    if is_export_dir(name_or_dir):
        directory = Path(name_or_dir)
        if export_dir is not None and Path(export_dir).resolve() != directory.resolve():
            raise ValueError(f"{name_or_dir} is already an export; pass it alone, without export_dir={str(export_dir)!r}")
    else:
        from ..pipeline.modelref import resolve_model

        model, info = resolve_model(name_or_dir)
        fp = info["fingerprint"]
        directory = Path(export_dir) if export_dir is not None else \
            Path(cache_root or default_cache_root()) / "exports" / fp
        if not is_export_dir(directory):
            _export_atomically(model, directory, source={k: v for k, v in info.items() if k != "embed_dim"},
                               export=export_onnx)
        recorded = (read_manifest(directory).get("source") or {}).get("fingerprint")
        if recorded != fp:
            raise ValueError(f"{directory} holds the export of other weights (fingerprint {recorded} != {fp}); "
                             "pass another export_dir, or the export directory itself as the model")
    if int8 and not read_manifest(directory).get("quantized"):
        quantize_onnx(directory)
    return directory


def _export_atomically(model, directory: Path, source: dict[str, Any], export) -> None:
    """Export into a scratch sibling and rename it into place, so a reader (or a second process exporting the same
    model) never sees half an export. An existing empty directory is replaced; a non-empty one is refused."""
    if directory.exists() and any(directory.iterdir()):
        raise ValueError(f"{directory} exists and is not an ONNX export; pass an empty or new export_dir")
    directory.parent.mkdir(parents=True, exist_ok=True)
    scratch = directory.parent / f".{directory.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        export(model, scratch, source=source)
        try:
            os.replace(scratch, directory)
        except OSError:
            if not is_export_dir(directory):  # not another process winning the race: a real failure
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


__all__ = ["BACKENDS", "PACKAGES", "available_backends", "backend_info", "check_backend", "default_cache_root", "ensure_export",
           "is_export_dir", "load_backend", "require_backend", "torch_model"]
