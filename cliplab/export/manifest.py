"""The layout of an ONNX export directory and its manifest, ``onnx_export.json``.

A directory holds ``image.onnx`` and/or ``text.onnx`` (fp32), optionally ``image.int8.onnx`` / ``text.int8.onnx``
(dynamic int8 quantisation), the model's ``cliplab.json`` (config: tokenizer and preprocessing are rebuilt from it)
and the manifest: format version, opset, input/output names and shapes per tower, library versions, quantisation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..models.clip import NATIVE_CONFIG_FILE, NATIVE_FORMAT_VERSION
from ..models.config import ModelConfig

MANIFEST_FILE = "onnx_export.json"
MANIFEST_FORMAT = "cliplab-onnx"
MANIFEST_VERSION = 1
TOWERS = ("image", "text")


class OnnxExportError(ValueError):
    """An export directory is not usable as asked (not an export, a tower that was not exported, ...)."""


def tower_file(tower: str, quantized: bool = False) -> str:
    """File name of a tower's graph: ``image.onnx``, ``text.int8.onnx``, ..."""
    return f"{tower}.int8.onnx" if quantized else f"{tower}.onnx"


def normalize_towers(towers) -> tuple[str, ...]:
    """``("image", "text")`` from a sequence or a comma-separated string, refusing unknown or no towers."""
    if isinstance(towers, str):
        towers = [t.strip() for t in towers.split(",") if t.strip()]
    towers = tuple(dict.fromkeys(towers))
    unknown = [t for t in towers if t not in TOWERS]
    if unknown or not towers:
        raise ValueError(f"towers must be a non-empty subset of {TOWERS}, got {list(towers)}")
    return towers


def write_config(directory: Path, config: ModelConfig) -> Path:
    """``cliplab.json`` exactly as :meth:`CLIP.save` writes it, so tools that read a model's config read this one."""
    meta = {"format": "cliplab", "format_version": NATIVE_FORMAT_VERSION, "config": config.to_dict()}
    path = directory / NATIVE_CONFIG_FILE
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_config(directory: Path) -> ModelConfig:
    path = directory / NATIVE_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {NATIVE_CONFIG_FILE} (the model config written by export_onnx)")
    meta = json.loads(path.read_text())
    if meta.get("format") != "cliplab" or "config" not in meta:
        raise OnnxExportError(f"{path}: not a cliplab model config")
    return ModelConfig.from_dict(meta["config"])


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = directory / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of an export directory; clear errors for a missing directory, file or wrong format."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no ONNX export directory at {directory}")
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {MANIFEST_FILE}; is this a directory written by export_onnx?")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise OnnxExportError(f"{path}: not a cliplab ONNX manifest (format {manifest.get('format')!r})")
    if manifest.get("format_version", 0) > MANIFEST_VERSION:
        raise OnnxExportError(f"{path}: format version {manifest['format_version']} is newer than this cliplab "
                              f"reads ({MANIFEST_VERSION}); upgrade cliplab")
    return manifest


def openvino_int8_file(directory: str | Path, tower: str) -> Path | None:
    """The tower's OpenVINO int8 graph recorded in the manifest (``openvino_int8``, written by
    :func:`cliplab.export.openvino_int8.quantize_openvino`), or ``None``."""
    entry = (read_manifest(directory).get("openvino_int8") or {}).get("towers", {}).get(tower)
    return Path(directory) / entry if entry else None
