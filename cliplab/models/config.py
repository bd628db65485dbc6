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

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh")  # gelu_tanh: transformers' "gelu_pytorch_tanh" (SigLIP)
VISION_POOLS = ("cls", "map")  # the class token's output, or a multihead attention-probe head (SigLIP)
TEXT_POOLS = ("eot", "last")  # the first end-of-text token (CLIP), or the last position (SigLIP pads to a fixed length)

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
    #: Non-empty: OpenAI's ModifiedResNet (RN50 family) with this many bottleneck blocks per stage instead of a ViT.
    #: ``width`` is then the stem's width, ``heads`` the attention pool's heads and ``patch_size`` the total stride
    #: (32); ``layers``, ``mlp_dim`` and ``act`` do not apply. See :mod:`cliplab.models.resnet`.
    resnet_layers: tuple[int, ...] = ()
    #: ViT variants (SigLIP: no class token, biased patch embedding, no pre-LayerNorm, an attention-probe head and
    #: no projection, so ``embed_dim == width``).
    class_token: bool = True
    pool: str = "cls"
    patch_bias: bool = False
    ln_pre: bool = True
    proj: bool = True

    def __post_init__(self):
        if isinstance(self.stem_channels, (str, bytes, int)) or not all(
                isinstance(c, int) and not isinstance(c, bool) for c in self.stem_channels):
            raise ConfigError(f"vision: stem_channels must be a list of channel counts, got {self.stem_channels!r}")
        self.stem_channels = tuple(self.stem_channels)
        if isinstance(self.resnet_layers, (str, bytes, int)) or not all(
                isinstance(c, int) and not isinstance(c, bool) for c in self.resnet_layers):
            raise ConfigError(f"vision: resnet_layers must be a list of block counts, got {self.resnet_layers!r}")
        self.resnet_layers = tuple(self.resnet_layers)

    @property
    def is_resnet(self) -> bool:
        return bool(self.resnet_layers)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid_size**2 + int(self.class_token or self.is_resnet)  # ResNet: the pool's mean token

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads and not self.is_resnet:
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
        for flag in ("class_token", "patch_bias", "ln_pre", "proj"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"vision: {flag} must be true or false, got {getattr(self, flag)!r}")
        if self.pool not in VISION_POOLS:
            raise ConfigError(f"vision: pool {self.pool!r} not in {VISION_POOLS}")
        if not self.class_token and self.pool == "cls":
            raise ConfigError("vision: pool 'cls' needs the class token (class_token true), or use pool 'map'")
        if self.is_resnet:
            if len(self.resnet_layers) != 4 or any(n < 1 for n in self.resnet_layers):
                raise ConfigError(f"vision: resnet_layers must be four positive block counts, got "
                                  f"{list(self.resnet_layers)}")
            if self.patch_size != 32:
                raise ConfigError(f"vision: a ModifiedResNet has stride 32; set patch_size 32, got {self.patch_size}")
            if self.stem_channels:
                raise ConfigError("vision: stem_channels (a ViT's conv stem) does not combine with resnet_layers")
            if (self.width * 32) % self.heads:
                raise ConfigError(f"vision: the attention pool's width {self.width * 32} is not divisible by "
                                  f"heads {self.heads}")


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
    #: SigLIP's text tower: bidirectional attention over a fixed-length padded sequence, pooled at the last position,
    #: with a biased head.
    causal: bool = True
    pool: str = "eot"
    proj_bias: bool = False

    def validate(self) -> None:
        if self.width % self.heads:
            raise ConfigError(f"text: width {self.width} is not divisible by heads {self.heads}")
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"text: act {self.act!r} not in {ACTIVATIONS}")
        if self.pool not in TEXT_POOLS:
            raise ConfigError(f"text: pool {self.pool!r} not in {TEXT_POOLS}")
        for flag in ("causal", "proj_bias"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"text: {flag} must be true or false, got {getattr(self, flag)!r}")


@dataclass
class PreprocessSettings:
    """How images are turned into model input. ``crop_rounding`` records the checkpoint's convention:
    ``"round"`` (OpenAI / torchvision: half-to-even rounding of the crop offset) or ``"floor"`` (transformers)."""

    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    crop_rounding: str = "round"
    #: ``"shortest+crop"`` (CLIP) or ``"squash"``: resize straight to ``S x S`` without a crop (SigLIP)
    resize_mode: str = "shortest+crop"

    def __post_init__(self):
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)


#: Config keys added for the SigLIP and ResNet families, left out of a saved config while they hold their defaults.
_FAMILY_KEYS = {"vision": ("resnet_layers", "class_token", "pool", "patch_bias", "ln_pre", "proj"),
                "text": ("causal", "pool", "proj_bias")}


def _as_json(value):
    return list(value) if isinstance(value, tuple) else value


@dataclass
class ModelConfig:
    name: str = "custom"
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    layer_norm_eps: float = 1e-5
    init_logit_scale: float = math.log(1 / 0.07)
    #: SigLIP's learned logit bias (``None``: no bias, CLIP's softmax models). SigLIP initialises it at -10.
    init_logit_bias: float | None = None
    tokenizer: str = "openai-clip-bpe"
    preprocess: PreprocessSettings = field(default_factory=PreprocessSettings)

    def __post_init__(self):
        self.vision.validate()
        self.text.validate()
        if not self.vision.proj and not self.vision.is_resnet and self.vision.width != self.embed_dim:
            raise ConfigError(f"vision: without a projection the image features are {self.vision.width}-d, "
                              f"but embed_dim is {self.embed_dim}")

    @property
    def family(self) -> str:
        """``"resnet"`` (OpenAI's ModifiedResNet), ``"siglip"`` (attention-probe pooled ViT) or ``"vit"``."""
        if self.vision.is_resnet:
            return "resnet"
        return "siglip" if self.vision.pool == "map" else "vit"

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
        # Keys of the other families are written only when set: ViT CLIP configs stay as they were.
        d["vision"]["resnet_layers"] = list(self.vision.resnet_layers)
        for section, defaults in (("vision", VisionConfig()), ("text", TextConfig())):
            for key in _FAMILY_KEYS[section]:
                if d[section][key] == _as_json(getattr(defaults, key)):
                    del d[section][key]
        if self.init_logit_bias is None:
            del d["init_logit_bias"]
        if self.preprocess.resize_mode == PreprocessSettings.resize_mode:
            del d["preprocess"]["resize_mode"]
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
            and (self.init_logit_bias is None) == (other.init_logit_bias is None)
        )
