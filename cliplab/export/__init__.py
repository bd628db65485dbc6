"""Export to ONNX and an ONNX Runtime inference backend (optional extra: ``pip install "cliplab[onnx]"``).

::

    from cliplab.export import export_onnx, load_onnx
    export_onnx(cliplab.load("shapes-tiny"), "shapes-onnx", quantize="int8")   # image.onnx, text.onnx (+ .int8)
    model = load_onnx("shapes-onnx")            # or OnnxCLIP.load(dir, quantized=True, threads=2)
    feats = model.encode_texts(["a red circle", "a blue ring"], normalize=True)

Importing this package needs none of the optional packages; each function imports what it needs and says how to
install it when it is missing. See docs/export.md.
"""

from .backends import BACKENDS, available_backends, backend_info, load_backend
from .deps import INSTALL_HINT, MissingDependencyError
from .manifest import MANIFEST_FILE, OnnxExportError
from .onnx import export_onnx, quantize_onnx
from .parity import check_parity
from .openvino_runtime import OpenVINOCLIP, load_openvino
from .runtime import OnnxCLIP, load_onnx

__all__ = [
    "BACKENDS",
    "INSTALL_HINT",
    "OpenVINOCLIP",
    "available_backends",
    "backend_info",
    "load_backend",
    "load_openvino",
    "MANIFEST_FILE",
    "MissingDependencyError",
    "OnnxCLIP",
    "OnnxExportError",
    "check_parity",
    "export_onnx",
    "load_onnx",
    "quantize_onnx",
]
