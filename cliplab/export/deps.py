"""The optional packages ONNX export needs, imported on demand with one clear message when they are missing."""

from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = 'pip install "cliplab[onnx]"'

#: import name -> distribution name, for the error message
OPTIONAL = {"onnx": "onnx", "onnxruntime": "onnxruntime", "onnxscript": "onnxscript"}


class MissingDependencyError(ImportError):
    """An optional package of the ``onnx`` extra is not installed."""


def require(name: str) -> ModuleType:
    """Import ``name`` (one of :data:`OPTIONAL`), or raise :class:`MissingDependencyError` saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise MissingDependencyError(
            f"ONNX export and the ONNX Runtime backend need the package {OPTIONAL.get(name, name)!r}, which is not "
            f"installed: {INSTALL_HINT}"
        ) from e
