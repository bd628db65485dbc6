"""Checkpoint layouts: how another codebase names and shapes CLIP's tensors, and the exact map to ours.

A layout is a small class registered with ``@register_layout``. It says whether a state dict is in its layout
(``detect``), can infer a config from tensor shapes (``infer_config``), and converts both ways. Conversions are
declared as a list of :class:`Rule` (rename, transpose, or concatenate-along-dim-0) so that both directions come
from one table and are bit-exact inverses by construction. Adding a layout never edits the others.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded: unsafe, unknown layout, or keys that do not fit the architecture."""


@dataclass(frozen=True)
class Rule:
    """One of our tensors and where it lives in the other layout.

    ``kind``: ``"same"`` (renamed only), ``"transpose"`` (2-D, stored transposed there) or ``"concat"`` (ours is the
    dim-0 concatenation of several of theirs, e.g. a fused qkv projection from separate q, k, v).
    """

    ours: str
    theirs: tuple[str, ...]
    kind: str = "same"

    def gather(self, theirs: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [theirs[k] for k in self.theirs]
        if self.kind == "concat":
            return torch.cat(parts, dim=0)
        (t,) = parts
        return t.t().contiguous() if self.kind == "transpose" else t

    def scatter(self, ours: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.kind == "concat":
            return dict(zip(self.theirs, (c.contiguous() for c in ours.chunk(len(self.theirs), dim=0))))
        (key,) = self.theirs
        return {key: ours.t().contiguous() if self.kind == "transpose" else ours}


def block_rules(ours_prefix: str, theirs_prefix: str, n_layers: int, table: list[tuple[str, tuple[str, ...], str]]):
    """Expand a per-block rule table (suffixes) over ``n_layers`` transformer blocks."""
    return [
        Rule(f"{ours_prefix}.{i}.{o}", tuple(f"{theirs_prefix}.{i}.{t}" for t in ts), kind)
        for i in range(n_layers)
        for o, ts, kind in table
    ]


def count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    """Number of transformer blocks ``prefix.<i>.`` present in a state dict."""
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    idx = {int(m.group(1)) for k in state if (m := pat.match(k))}
    return max(idx) + 1 if idx else 0


class Layout(ABC):
    name: ClassVar[str]
    #: keys this layout may carry that hold no weights (buffers, metadata); dropped on conversion.
    ignored_keys: ClassVar[tuple[str, ...]] = ()
    #: the centre-crop convention of checkpoints in this layout (``None``: recorded in the checkpoint's own config).
    crop_rounding: ClassVar[str | None] = None
    #: whether the layout can hold a ViT with a convolutional stem (``vision.stem_channels``; cliplab's own only).
    has_conv_stem: ClassVar[bool] = False
    #: whether the layout can hold OpenAI's ModifiedResNet image tower (``vision.resnet_layers``).
    has_resnet: ClassVar[bool] = False

    @abstractmethod
    def detect(self, state: dict[str, torch.Tensor]) -> bool:
        """True when ``state`` is in this layout."""

    @abstractmethod
    def rules(self, cfg: ModelConfig) -> list[Rule]:
        """Where each of our tensors lives in this layout, for architecture ``cfg``."""

    def infer_config(self, state: dict[str, torch.Tensor]) -> ModelConfig:
        raise CheckpointError(f"the {self.name} layout cannot infer an architecture from tensor shapes; pass arch=")

    def _is_ignored(self, key: str) -> bool:
        return any(key == k or key.endswith("." + k) for k in self.ignored_keys)

    def check_architecture(self, cfg: ModelConfig) -> None:
        if cfg.vision.stem_channels and not self.has_conv_stem:
            raise CheckpointError(f"{cfg.name}: its image tower has a convolutional stem, which the {self.name} layout "
                                  "has no place for (only the cliplab layout holds one)")
        if cfg.vision.is_resnet and not self.has_resnet:
            raise CheckpointError(f"{cfg.name}: its image tower is a ModifiedResNet (RN50 family), which the "
                                  f"{self.name} layout has no place for; write the cliplab or openai layout")

    def to_cliplab(self, state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        self.check_architecture(cfg)
        rules = self.rules(cfg)
        state = {k: v for k, v in state.items() if not self._is_ignored(k)}
        missing = sorted(k for r in rules for k in r.theirs if k not in state)
        used = {k for r in rules for k in r.theirs}
        unexpected = sorted(set(state) - used)
        if missing or unexpected:
            raise CheckpointError(describe_key_problems(self.name, cfg.name, missing, unexpected, []))
        return {r.ours: r.gather(state) for r in rules}

    def from_cliplab(self, state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        self.check_architecture(cfg)
        out: dict[str, torch.Tensor] = {}
        for r in self.rules(cfg):
            out.update(r.scatter(state[r.ours]))
        return out


def describe_key_problems(layout: str, arch: str, missing, unexpected, misshaped, limit: int = 12) -> str:
    def show(keys):
        keys = list(keys)
        more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
        return ", ".join(map(str, keys[:limit])) + more

    parts = [f"checkpoint ({layout} layout) does not fit architecture {arch!r}:"]
    if missing:
        parts.append(f"  missing keys ({len(missing)}): {show(missing)}")
    if unexpected:
        parts.append(f"  unexpected keys ({len(unexpected)}): {show(unexpected)}")
    if misshaped:
        parts.append(f"  mis-shaped tensors ({len(misshaped)}): {show(misshaped)}")
    return "\n".join(parts)


LAYOUTS: dict[str, Layout] = {}


def register_layout(cls: type[Layout]) -> type[Layout]:
    """Class decorator: registers one instance of the layout under ``cls.name``."""
    LAYOUTS[cls.name] = cls()
    return cls


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise KeyError(f"unknown checkpoint layout {name!r}; known: {sorted(LAYOUTS)}")
    return LAYOUTS[name]


def detect_layout(state: dict[str, torch.Tensor]) -> Layout:
    found = [layout for layout in LAYOUTS.values() if layout.detect(state)]
    if len(found) != 1:
        sample = ", ".join(sorted(state)[:8])
        what = "no known layout" if not found else f"several layouts ({[f.name for f in found]})"
        raise CheckpointError(
            f"cannot tell the checkpoint layout: {what} matches. Known layouts: {sorted(LAYOUTS)}. "
            f"First keys: {sample}"
        )
    return found[0]
