"""Composable edits at named sites of either tower, applied through the models layer's hook protocol.

An :class:`Intervention` names a site (see :mod:`cliplab.tokens.sites`), an edit, and optionally which token
positions it touches. Edits are a function (``fn(selected) -> new``) or a tensor (``mode="replace"`` or ``"add"``).
Interventions compose in order (``a + b`` or a list); :func:`intervene` makes them active for every ``encode_*``
call on a model inside a ``with`` block, or pass ``hooks=InterventionSet([...])`` explicitly.

Positions outside the selection are never written, so they stay bit-identical; an intervention whose edit returns
its input unchanged reproduces the plain forward pass bit-exactly.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from ..models.hooks import Hooks
from .sites import Site, parse_site

Edit = Callable[[torch.Tensor], torch.Tensor] | torch.Tensor


@dataclass
class Intervention:
    """One edit. ``positions``: token positions along the sequence (a list, a LongTensor, or a bool mask ``[B, n]``
    for per-row selections); None means all. For ``attn`` sites the edit sees probabilities ``[B, H, n, n]``; for
    ``attn_bias`` it is a tensor broadcastable to ``[B, H, n, n]`` or ``fn(n) -> tensor``; for ``pos`` it sees the
    positional table ``[n, W]`` and positions select rows."""

    site: str
    edit: Edit
    positions: Sequence[int] | torch.Tensor | None = None
    mode: str = "replace"

    def __post_init__(self):
        self.parsed: Site = parse_site(self.site)
        if self.mode not in ("replace", "add"):
            raise ValueError(f"mode must be 'replace' or 'add', got {self.mode!r}")
        if self.parsed.place in ("attn", "attn_bias") and self.positions is not None:
            raise ValueError(f"{self.site}: positions are not supported on attention sites; edit the maps directly")

    def __add__(self, other) -> "InterventionSet":
        return InterventionSet([self]) + other

    # --- applying -------------------------------------------------------------------------------------------------
    def _new_values(self, selected: torch.Tensor) -> torch.Tensor:
        if callable(self.edit):
            return self.edit(selected)
        value = self.edit.to(selected.dtype).to(selected.device)
        return selected + value if self.mode == "add" else value.expand_as(selected)

    def apply(self, x: torch.Tensor, seq_dim: int) -> torch.Tensor:
        """Edit ``x`` at the selected positions of dimension ``seq_dim``; returns a new tensor (or ``x`` itself)."""
        if self.positions is None:
            return self._new_values(x)
        pos = self.positions
        if isinstance(pos, torch.Tensor) and pos.dtype == torch.bool:
            if seq_dim != 1 or pos.shape != x.shape[:2]:
                raise ValueError(f"{self.site}: a bool position mask must be [B, n] = {tuple(x.shape[:2])}")
            mask = pos.to(x.device)
            new = self._new_values(x[mask])
            out = x.clone()
            out[mask] = new.to(x.dtype)
            return out
        index = torch.as_tensor(pos, dtype=torch.long, device=x.device)
        if index.numel() and (index.max() >= x.shape[seq_dim] or index.min() < -x.shape[seq_dim]):
            raise IndexError(f"{self.site}: position {index.tolist()} outside a sequence of {x.shape[seq_dim]}")
        new = self._new_values(x.index_select(seq_dim, index % x.shape[seq_dim]))
        return x.index_copy(seq_dim, index % x.shape[seq_dim], new.to(x.dtype))


class InterventionSet(Hooks):
    """Interventions applied in order, dispatched to the hook sites of the models layer."""

    def __init__(self, interventions: Iterable[Intervention] = ()):
        self.interventions = list(interventions)
        self.n_layers: dict[str, int] = {}  # filled by `bind` (the model calls it before each forward)

    def __add__(self, other) -> "InterventionSet":
        more = other.interventions if isinstance(other, InterventionSet) else [other]
        return InterventionSet(self.interventions + list(more))

    def __len__(self) -> int:
        return len(self.interventions)

    def _at(self, tower: str, place: str, layer: int | None = None, n_layers: int | None = None):
        for iv in self.interventions:
            s = iv.parsed
            if s.tower == tower and s.place == place and (layer is None or s.covers(layer, n_layers)):
                yield iv

    def bind(self, model) -> "InterventionSet":
        self.n_layers = model.tower_layers()
        for iv in self.interventions:
            s = iv.parsed
            if s.tower not in self.n_layers:
                raise ValueError(f"{iv.site}: this model has no {s.tower} tower (it has {sorted(self.n_layers)})")
            missing = getattr(model, "missing_sites", {})  # keyed by place, or by "tower.place"
            why = missing.get(f"{s.tower}.{s.place}") or missing.get(s.place)
            if why:
                raise ValueError(f"{iv.site}: {why}")
            if s.place == "final" and not hasattr(getattr(model, "text", None), "ln_final"):
                raise ValueError(f"{iv.site}: this model's text tower has no final LayerNorm before a projection; "
                                 "edit text.tokens instead")
            if isinstance(s.layers, int) and not -self.n_layers[s.tower] <= s.layers < self.n_layers[s.tower]:
                raise IndexError(f"{iv.site}: the {s.tower} tower has {self.n_layers[s.tower]} blocks")
        return self

    def _apply_all(self, ivs, x: torch.Tensor, seq_dim: int) -> torch.Tensor:
        for iv in ivs:
            x = iv.apply(x, seq_dim)
        return x

    # --- hook sites -------------------------------------------------------------------------------------------------
    def input(self, tower, x):
        return self._apply_all(self._at(tower, "input"), x, 1)

    def positions(self, tower, pos):
        return self._apply_all(self._at(tower, "pos"), pos, 0)

    def resid(self, tower, layer, x):
        return self._apply_all(self._at(tower, "resid", layer, self.n_layers[tower]), x, 1)

    def edits_attn(self, tower, layer):
        return any(True for _ in self._at(tower, "attn", layer, self.n_layers[tower]))

    def attn_probs(self, tower, layer, probs):
        for iv in self._at(tower, "attn", layer, self.n_layers[tower]):
            probs = iv._new_values(probs)
        return probs

    def attn_bias(self, tower, layer, n):
        total = None
        for iv in self._at(tower, "attn_bias", layer, self.n_layers[tower]):
            b = iv.edit(n) if callable(iv.edit) else iv.edit
            total = b if total is None else total + b
        return total

    def edits_final(self, tower):
        return any(True for _ in self._at(tower, "final"))

    def final(self, tower, x):
        return self._apply_all(self._at(tower, "final"), x, 1)

    def edits_tokens(self, tower):
        return any(True for _ in self._at(tower, "tokens"))

    def tokens(self, tower, x):
        return self._apply_all(self._at(tower, "tokens"), x, 1)


def as_hooks(model, interventions) -> InterventionSet:
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    ivs = interventions if isinstance(interventions, InterventionSet) else InterventionSet(interventions)
    return ivs.bind(model)


@contextmanager
def intervene(model, *interventions: Intervention | InterventionSet):
    """Make interventions active for every ``encode_*`` call on ``model`` inside the block (stacking on any already
    active ones)::

        with intervene(model, Intervention("text.layer[2].resid", lambda h: 0 * h, positions=[3])):
            out = model.encode_text(batch)
    """
    combined = InterventionSet()
    for iv in interventions:
        combined = combined + iv
    current = model.active_hooks
    if isinstance(current, InterventionSet):
        combined = current + combined
    with model.using_hooks(combined.bind(model)):
        yield combined
