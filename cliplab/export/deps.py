"""The optional packages ONNX export needs, imported on demand with one clear message when they are missing."""

from __future__ import annotations

import contextlib
import importlib
import logging
from types import ModuleType

INSTALL_HINT = 'pip install "cliplab[onnx]"'
#: OpenVINO's int8 graphs are written by NNCF (cliplab.export.openvino_int8)
NNCF_HINT = "pip install nncf"

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


@contextlib.contextmanager
def quiet_logger(name: str | None = None, level: int = logging.ERROR):
    """Within the block, logger ``name`` (``None``: the root logger) passes only records at ``level`` and above: the
    exporter, the quantisers and NNCF log routine advice at INFO/WARNING for every model."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)
