"""Core layer: architectures, configs, registry, checkpoint layouts, tokenizer and preprocessing.

Imports nothing else from cliplab.
"""

from .clip import CLIP
from .config import ConfigError, ModelConfig, PreprocessSettings, TextConfig, VisionConfig
from .layouts import LAYOUTS, CheckpointError, Layout, Rule, detect_layout, get_layout, register_layout
from .loading import convert, export_state, list_pretrained, load, read_state_dict, register_pretrained
from .registry import create_model, get_config, list_models, register_config

__all__ = [
    "CLIP", "ConfigError", "ModelConfig", "PreprocessSettings", "TextConfig", "VisionConfig",
    "LAYOUTS", "CheckpointError", "Layout", "Rule", "detect_layout", "get_layout", "register_layout",
    "convert", "export_state", "list_pretrained", "load", "read_state_dict", "register_pretrained",
    "create_model", "get_config", "list_models", "register_config",
]
