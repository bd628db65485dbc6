"""Model configuration: small dataclasses that round-trip through JSON.

One JSON file per architecture lives in ``cliplab/models/configs/``. A config holds everything needed to rebuild a
model from its weights alone: tower shapes, activations, the tokenizer it expects and its image preprocessing
(including which checkpoint convention its centre crop follows).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACTIVATIONS = ("quick_gelu", "gelu")

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ConfigError(ValueError):
    """A configuration is malformed (unknown keys, bad values)."""


def read_json(path: str | Path) -> Any:
    """A JSON config file's content; malformed JSON is a :class:`ConfigError` naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e


def _from_dict(cls, data: dict[str, Any], where: str):
    """Build dataclass ``cls`` from ``data``, refusing unknown keys so a typo never passes silently."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown config keys {unknown}; expected a subset of {sorted(names)}")
    return cls(**data)


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "quick_gelu"
    #: Empty: the standard CLIP patch embedding. Otherwise the channels of a convolutional stem's stages (one 2x2
    #: max-pool each, so ``2 ** len(stem_channels) == patch_size``; see :mod:`cliplab.models.stem`).
    stem_channels: tuple[int, ...] = ()
    #: With a stem: add a linear map of the stem's feature map, max-pooled over the kept patches, to the pooled image
    #: output (and each patch token's own stem feature to its token output). See :mod:`cliplab.models.stem`.
    stem_max_skip: bool = False

    def __post_init__(self):
        if isinstance(self.stem_channels, (str, bytes, int)) or not all(
                isinstance(c, int) and not isinstance(c, bool) for c in self.stem_channels):
            raise ConfigError(f"vision: stem_channels must be a list of channel counts, got {self.stem_channels!r}")
        self.stem_channels = tuple(self.stem_channels)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid_size**2 + 1

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ConfigError(f"vision: width {self.width} is not divisible by heads {self.heads}")
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"vision: act {self.act!r} not in {ACTIVATIONS}")
        if self.stem_channels and 2 ** len(self.stem_channels) != self.patch_size:
            raise ConfigError(f"vision: a conv stem of {len(self.stem_channels)} stages pools by "
                              f"{2 ** len(self.stem_channels)}, not patch_size {self.patch_size}")
        if any(c < 1 for c in self.stem_channels):
            raise ConfigError(f"vision: stem_channels must be positive, got {list(self.stem_channels)}")
        if not isinstance(self.stem_max_skip, bool):
            raise ConfigError(f"vision: stem_max_skip must be true or false, got {self.stem_max_skip!r}")
        if self.stem_max_skip and not self.stem_channels:
            raise ConfigError("vision: stem_max_skip needs a convolutional stem (stem_channels)")


@dataclass
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    act: str = "quick_gelu"
    eot_token_id: int = 49407

    def validate(self) -> None:
        if self.width % self.heads:
            raise ConfigError(f"text: width {self.width} is not divisible by heads {self.heads}")
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"text: act {self.act!r} not in {ACTIVATIONS}")


@dataclass
class PreprocessSettings:
    """How images are turned into model input. ``crop_rounding`` records the checkpoint's convention:
    ``"round"`` (OpenAI / torchvision: half-to-even rounding of the crop offset) or ``"floor"`` (transformers)."""

    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    crop_rounding: str = "round"

    def __post_init__(self):
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)


@dataclass
class ModelConfig:
    name: str = "custom"
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    layer_norm_eps: float = 1e-5
    init_logit_scale: float = math.log(1 / 0.07)
    tokenizer: str = "openai-clip-bpe"
    preprocess: PreprocessSettings = field(default_factory=PreprocessSettings)

    def __post_init__(self):
        self.vision.validate()
        self.text.validate()

    # --- serialisation -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["preprocess"]["mean"] = list(self.preprocess.mean)
        d["preprocess"]["std"] = list(self.preprocess.std)
        d["vision"]["stem_channels"] = list(self.vision.stem_channels)
        if not self.vision.stem_channels:
            del d["vision"]["stem_channels"]  # the standard patch stem: configs stay as they were
        if not self.vision.stem_max_skip:
            del d["vision"]["stem_max_skip"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        data = dict(data)
        vision = _from_dict(VisionConfig, data.pop("vision", {}), "vision")
        text = _from_dict(TextConfig, data.pop("text", {}), "text")
        pre = data.pop("preprocess", None)
        if pre is None:  # a config written by hand may leave this out: follow the vision tower's input size
            pre = {"image_size": vision.image_size}
        preprocess = _from_dict(PreprocessSettings, pre, "preprocess")
        return _from_dict(cls, {**data, "vision": vision, "text": text, "preprocess": preprocess}, "model")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(read_json(path))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def same_architecture(self, other: "ModelConfig") -> bool:
        """True when the two configs build the same network (names and preprocessing aside)."""
        return (
            self.embed_dim == other.embed_dim
            and self.vision == other.vision
            and self.text == other.text
            and self.layer_norm_eps == other.layer_norm_eps
        )
