"""Checkpoint layouts registry. Importing this package registers the built-in layouts."""

from .base import LAYOUTS, CheckpointError, Layout, Rule, detect_layout, get_layout, register_layout
from . import hf, native, openai, siglip  # noqa: F401  (registration side effect)

__all__ = ["LAYOUTS", "CheckpointError", "Layout", "Rule", "detect_layout", "get_layout", "register_layout"]
