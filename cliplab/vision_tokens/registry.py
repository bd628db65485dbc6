"""Named token reducers and the reduction spec ``NAME[:KEEP][@LAYER]`` that the CLI and the benchmark share.

Reducers register themselves with :func:`register_reducer` (the baselines here, each method in its module). A spec
names a reducer, the share of patch tokens that go on (``KEEP``, default 0.5) and the block it runs before
(``LAYER``, default the reducer's own: the paper's where it has one). ``centerclip:0.25@3`` keeps a quarter of the
tokens before block 3. :class:`ReducedImageEncoder` turns a spec into an image encoder for evaluation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from .forward import encode_image_reduced
from .reducer import KeepTopK, TokenReducer
from .tome import ToMe


@dataclass(frozen=True)
class ReducerEntry:
    name: str
    build: Callable[[float, object], TokenReducer]  # (keep share, model) -> reducer
    default_layer: Callable[[int], int]              # depth -> the layer it runs before by default
    text_guided: bool = False                        # reads ``text`` when given (runs without it too)
    summary: str = ""


_REDUCERS: dict[str, ReducerEntry] = {}


def register_reducer(name: str, *, default_layer: Callable[[int], int] = lambda depth: 1, text_guided: bool = False,
                     summary: str = ""):
    """Decorator on ``build(keep, model) -> TokenReducer``: makes ``name`` usable in reduction specs."""

    def register(build):
        if name in _REDUCERS and _REDUCERS[name].build.__module__ != build.__module__:
            raise ValueError(f"reducer {name!r} registered twice")
        _REDUCERS[name] = ReducerEntry(name, build, default_layer, text_guided, summary)
        return build

    return register


def list_reducers() -> list[str]:
    return sorted(_REDUCERS)


def get_reducer(name: str) -> ReducerEntry:
    if name not in _REDUCERS:
        raise KeyError(f"unknown token reducer {name!r}; choose from {list_reducers()}")
    return _REDUCERS[name]


_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9_\-]+)(?::(?P<keep>[0-9]*\.?[0-9]+))?(?:@(?P<layer>[0-9]+))?$")


@dataclass(frozen=True)
class Reduction:
    """A parsed spec: the reducer's name, the share of patch tokens kept, the layer (None: the reducer's default)."""

    name: str
    keep: float = 0.5
    layer: int | None = None

    @classmethod
    def parse(cls, spec: str) -> Reduction:
        m = _SPEC.match(spec.strip())
        if not m:
            raise ValueError(f"bad token-reduction spec {spec!r}; expected NAME[:KEEP][@LAYER], e.g. 'tome:0.5@1' "
                             f"(reducers: {', '.join(list_reducers())})")
        get_reducer(m["name"])  # a clear error for an unknown name
        keep = 0.5 if m["keep"] is None else float(m["keep"])
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"the kept share in {spec!r} must be in (0, 1], got {keep}")
        return cls(m["name"], keep, None if m["layer"] is None else int(m["layer"]))

    def resolve(self, model) -> tuple[TokenReducer, int]:
        """The reducer for ``model`` and the layer it runs before."""
        entry = get_reducer(self.name)
        if model.config.vision.is_resnet:
            raise ValueError("token reduction needs a ViT image tower; this model's is a ResNet")
        depth = len(model.visual.transformer.blocks)
        layer = entry.default_layer(depth) if self.layer is None else self.layer
        if not 0 <= layer <= depth:
            raise ValueError(f"layer {layer} is outside this model's image tower (0..{depth})")
        return entry.build(self.keep, model), layer

    def canonical(self, model) -> str:
        return f"{self.name}:{self.keep:g}@{self.resolve(model)[1]}"


class ReducedImageEncoder:
    """``pixels -> image features`` through :func:`encode_image_reduced` with a spec's reducer; ``params`` says what
    the features depend on (so embedding caches keep them apart from the plain ones). Text-guided reducers run
    without text here (their text-free mode)."""

    def __init__(self, model, spec: str | Reduction):
        self.reduction = Reduction.parse(spec) if isinstance(spec, str) else spec
        self.reducer, self.layer = self.reduction.resolve(model)
        self.model = model
        self.params = {"reduction": f"{self.reduction.name}:{self.reduction.keep:g}@{self.layer}"}

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_image_reduced(self.model, pixels, self.reducer, self.layer).pooled


@register_reducer("tome", summary="ToMe bipartite merging of the previous block's keys (baseline)")
def _tome(keep: float, model) -> TokenReducer:
    return ToMe(ratio=1.0 - keep, metric="keys")


@register_reducer("keep-random", summary="keep a seeded random share of the tokens (control)")
def _keep_random(keep: float, model) -> TokenReducer:
    return KeepTopK(1.0 - keep, score="random")


@register_reducer("keep-cls-attention", summary="keep the tokens the class token attends to most (baseline)")
def _keep_cls(keep: float, model) -> TokenReducer:
    return KeepTopK(1.0 - keep, score="cls_attention")
