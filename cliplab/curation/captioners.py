"""Captioners: the ``Captioner`` protocol (image -> short visual description) and the stand-ins available here.

A captioner maps pair rows (dicts with at least the image path, and whatever else the captioner reads) to one
visual caption each, or ``None`` where it cannot describe the row (the row becomes a reject). Any image-to-text
model plugs in by implementing ``__call__(rows) -> list[str | None]``.

* :class:`SceneGraphCaptioner`: for the synthetic world, a captioner that reads the scene graph (column
  ``objects``: JSON list of ``{colour, shape, size}``) and describes it the way a generic VLM caption does: colours
  and shapes, no textures, no rendered text, and small objects left out with probability ``drop_small`` (realistic
  omissions). It never sees the alt-text, as VeCLIP's LLaVA prompt intends (no alt-text hallucination).
* :class:`ColumnCaptioner`: visual captions computed elsewhere (an external VLM) and stored in a column.
"""

from __future__ import annotations

import json
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from .rewriters import stable_hash

__all__ = ["Captioner", "SceneGraphCaptioner", "ColumnCaptioner", "describe_objects"]


@runtime_checkable
class Captioner(Protocol):
    def __call__(self, rows: Sequence[dict[str, Any]]) -> list[str | None]: ...


def describe_objects(objects: Sequence[dict[str, str]]) -> str:
    """``"a red circle and an orange star"``: the objects' colours and shapes, joined in order."""
    phrases = [f"{'an' if o['colour'][:1] in 'aeiou' else 'a'} {o['colour']} {o['shape']}" for o in objects]
    if len(phrases) <= 2:
        return " and ".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


class SceneGraphCaptioner:
    """The synthetic world's stand-in for a VLM captioner (module docstring). ``column``: where the scene graph is;
    ``drop_small``: chance of leaving out each small object (never the last one left); ``seed``: base of the per-row
    generator (keyed by the row's image path, so a rerun gives the same caption)."""

    def __init__(self, column: str = "objects", drop_small: float = 0.5, seed: int = 0):
        if not 0.0 <= drop_small <= 1.0:
            raise ValueError(f"drop_small must be in [0, 1], got {drop_small}")
        self.column, self.drop_small, self.seed = column, float(drop_small), int(seed)

    def __repr__(self) -> str:
        return f"SceneGraphCaptioner(column={self.column!r}, drop_small={self.drop_small}, seed={self.seed})"

    def caption_one(self, row: dict[str, Any]) -> str | None:
        graph = row.get(self.column)
        if isinstance(graph, str):
            try:
                graph = json.loads(graph)
            except json.JSONDecodeError:
                return None
        if not isinstance(graph, list) or not graph or not all(isinstance(o, dict) for o in graph):
            return None
        rng = np.random.default_rng([self.seed, stable_hash(str(row.get("image", "")) + json.dumps(graph))])
        kept = [o for o in graph if not (o.get("size") == "small" and rng.random() < self.drop_small)]
        return describe_objects(kept or graph[:1])

    def __call__(self, rows: Sequence[dict[str, Any]]) -> list[str | None]:
        return [self.caption_one(r) for r in rows]


class ColumnCaptioner:
    """Visual captions read from ``column`` (``None`` where it is empty)."""

    def __init__(self, column: str = "visual_caption"):
        self.column = column

    def __repr__(self) -> str:
        return f"ColumnCaptioner(column={self.column!r})"

    def __call__(self, rows: Sequence[dict[str, Any]]) -> list[str | None]:
        out = []
        for r in rows:
            v = r.get(self.column)
            out.append(v.strip() if isinstance(v, str) and v.strip() else None)
        return out
