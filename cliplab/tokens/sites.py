"""Site names for interventions: ``"<tower>.<place>"`` with ``place`` one of ``input``, ``pos``, ``tokens`` or
``layer[L].resid`` / ``layer[L].attn`` / ``layer[L].attn_bias``, where ``L`` is a block index (negative counts from
the end), a slice ``a:b``, or ``*`` for every block. Example: ``"text.layer[3].resid"``, ``"image.layer[-3:].attn"``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TOWERS = ("text", "image")
PLAIN_PLACES = ("input", "pos", "tokens")
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
    if rest in PLAIN_PLACES:
        return Site(tower, rest)
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
