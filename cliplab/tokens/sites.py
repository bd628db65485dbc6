"""Site names for interventions: ``"<tower>.<place>"`` with ``place`` one of ``input``, ``pos``, ``tokens``,
``final`` (text only) or ``layer[L].resid`` / ``layer[L].attn`` / ``layer[L].attn_bias``, where ``L`` is a block index
(negative counts from the end), a slice ``a:b``, or ``*`` for every block. Example: ``"text.layer[3].resid"``,
``"image.layer[-3:].attn"``.

The text tower's conditioning sites, where text-to-image models read their per-token states (see
:data:`CONDITIONING_SPACES`): ``text.final`` (after the final LayerNorm, before the projection: Stable Diffusion 1.x)
and ``text.penultimate``, a name for ``text.layer[-2].resid`` (the stream after block ``L-2``, no final LayerNorm:
SDXL); ``text.tokens`` is the joint space (after the projection).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TOWERS = ("text", "image")
PLAIN_PLACES = ("input", "pos", "tokens", "final")
#: places only the text tower has (an image tower's output LayerNorm is no conditioning site)
TEXT_ONLY_PLACES = ("final",)
#: the per-token sequence each conditioning space names, as an intervention site
CONDITIONING_SPACES = {"joint": "text.tokens", "final": "text.final", "penultimate": "text.penultimate"}
LAYER_PLACES = ("resid", "attn", "attn_bias")
_LAYER_RE = re.compile(r"^layer\[(?P<sel>[^\]]+)\]\.(?P<place>\w+)$")


class SiteError(ValueError):
    """A site name that does not parse."""


@dataclass(frozen=True)
class Site:
    tower: str
    place: str
    layers: slice | int | None = None  # None for plain places

    def covers(self, layer: int, n_layers: int) -> bool:
        if isinstance(self.layers, int):
            return layer == (self.layers % n_layers)
        return layer in range(n_layers)[self.layers]


def parse_site(name: str) -> Site:
    tower, _, rest = name.partition(".")
    if tower not in TOWERS:
        raise SiteError(f"site {name!r}: tower must be one of {TOWERS}")
    if rest in TEXT_ONLY_PLACES and tower != "text":
        raise SiteError(f"site {name!r}: only the text tower has a {rest!r} site")
    if rest in PLAIN_PLACES:
        return Site(tower, rest)
    if rest == "penultimate":
        if tower != "text":
            raise SiteError(f"site {name!r}: 'penultimate' names a text site; use {tower}.layer[-2].resid")
        return Site(tower, "resid", -2)
    m = _LAYER_RE.match(rest)
    if not m or m.group("place") not in LAYER_PLACES:
        raise SiteError(f"site {name!r}: expected {tower}.{{{','.join(PLAIN_PLACES)}}} or "
                        f"{tower}.layer[L].{{{','.join(LAYER_PLACES)}}}")
    sel = m.group("sel").strip()
    try:
        if sel == "*":
            layers: slice | int = slice(None)
        elif ":" in sel:
            a, b = (p.strip() for p in sel.split(":", 1))
            layers = slice(int(a) if a else None, int(b) if b else None)
        else:
            layers = int(sel)
    except ValueError as e:
        raise SiteError(f"site {name!r}: bad layer selector {sel!r}") from e
    return Site(tower, m.group("place"), layers)


def space_site(space: str) -> str:
    """The intervention site of a conditioning space: ``"joint"`` -> ``text.tokens``, ``"final"`` -> ``text.final``,
    ``"penultimate"`` -> ``text.penultimate`` (``text.layer[-2].resid``)."""
    try:
        return CONDITIONING_SPACES[space]
    except KeyError:
        raise ValueError(f"space must be one of {sorted(CONDITIONING_SPACES)}, got {space!r}") from None
