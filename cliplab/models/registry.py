"""Architecture registry: every ``configs/*.json`` file is a model name. ``register_config`` adds more at run time."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import torch

from .clip import CLIP
from .config import ConfigError, ModelConfig

CONFIG_DIR = Path(__file__).parent / "configs"
_CONFIGS: dict[str, ModelConfig] = {}


def _ensure_builtin() -> None:
    if not _CONFIGS:
        for path in sorted(CONFIG_DIR.glob("*.json")):
            cfg = ModelConfig.load(path)
            if cfg.name != path.stem:
                raise ConfigError(f"{path}: config name {cfg.name!r} differs from its file name")
            _CONFIGS[cfg.name] = cfg


def register_config(config: ModelConfig | str | Path, overwrite: bool = False) -> ModelConfig:
    """Register an architecture (a ``ModelConfig`` or a path to its JSON file) under ``config.name``."""
    _ensure_builtin()
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.load(config)
    if cfg.name in _CONFIGS and not overwrite:
        raise ConfigError(f"architecture {cfg.name!r} is already registered (pass overwrite=True to replace it)")
    _CONFIGS[cfg.name] = cfg
    return cfg


def list_models(pattern: str = "*") -> list[str]:
    """Registered architecture names matching a shell-style ``pattern`` (case-insensitive), e.g. ``"*B-32*"``."""
    _ensure_builtin()
    return sorted(n for n in _CONFIGS if fnmatch.fnmatch(n.lower(), pattern.lower()))


def get_config(name: str) -> ModelConfig:
    """A copy of the registered config ``name``; a close miss suggests the names it may have meant."""
    _ensure_builtin()
    if name not in _CONFIGS:
        near = [n for n in _CONFIGS if name.lower() in n.lower() or n.lower() in name.lower()]
        hint = f"; did you mean one of {near}?" if near else f"; known: {list_models()}"
        raise KeyError(f"unknown architecture {name!r}{hint}")
    return ModelConfig.from_dict(_CONFIGS[name].to_dict())


def find_matching_config(cfg: ModelConfig) -> str | None:
    """Name of a registered config with the same network shape as ``cfg`` (first in sorted order), if any."""
    _ensure_builtin()
    for name in sorted(_CONFIGS):
        if _CONFIGS[name].same_architecture(cfg):
            return name
    return None


def create_model(name_or_config: str | ModelConfig, seed: int | None = None) -> CLIP:
    """A randomly initialised model (OpenAI's init scheme). ``seed`` makes the weights reproducible."""
    cfg = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    if seed is None:
        return CLIP(cfg).init_weights()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIP(cfg).init_weights()
