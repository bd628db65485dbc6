"""Token-subset encodings and the de-contextualisation fix for semantic leakage between prompt items.

Paper: *Follow the Flow: On Information Flow Across Textual Tokens in Text-to-Image Models*, G. Kaplan, M. Toker,
Y. Reif, Y. Belinkov, R. Schwartz, arXiv 2504.01137 (2025). An analysis paper with a training-free fix; no official
code was available here, so this follows the paper's description and the method notes.

Two text-side operations on the per-token states a text-to-image model cross-attends to. Which states: ``space=``
(see :data:`cliplab.tokens.CONDITIONING_SPACES`) - ``"final"``, after the final LayerNorm and before the projection
(Stable Diffusion 1.x's conditioning, the ``text.final`` site), ``"penultimate"``, the stream after block ``L-2``
without the final LayerNorm (SDXL's, ``text.layer[-2].resid``), or the default ``"joint"``, cliplab's per-token
outputs after the projection (``encode_text(..., output="tokens")``, what cliplab's own consumers read; no T2I model
reads this space):

* :func:`keep_tokens` - **token-subset encoding.** The prompt is encoded in full (so the kept tokens are still
  contextual), then only a chosen subset of token representations is kept, e.g. only the last token of
  "golden gate bridge". Two modes, as in the notes: ``"drop"`` returns the kept rows and their positions (the
  consumer attends to those keys only); ``"pad"`` keeps the sequence length and overwrites every other row with the
  padding token's representation.
* :func:`decontextualize` - **the leakage fix.** For an item (e.g. "ball" in "a red apple and a ball"), the item text
  is encoded in isolation, its tokens are aligned one-to-one with the item's tokens in the prompt by character spans
  (relative offsets and token ids must agree, or ``ValueError``), and the prompt's rows of the item are replaced by
  the isolated rows: ``H[s] <- H_iso[s]``, both read in the same space. At the ``joint`` and ``final`` sites all
  other rows (SOT, EOT, the other items) are untouched and the pooled (EOT) embedding is bit-identical; at the
  ``penultimate`` site the replaced rows go on through the last block, so later tokens and the pooled embedding read
  them (the returned penultimate sequence is still edited only at the item's rows).
  :func:`decontextualize_intervention` gives the same edit as an ``Intervention(<site>, ..., mode="replace")`` to
  compose with others.

Choices (the paper's wording is high-level; these are stated so they can be checked):

* *Isolated encoding.* The item is encoded alone (``template="{}"``: ``SOT item EOT``), so its representation
  carries no information about the rest of the prompt; ``template`` (e.g. ``"a photo of a {}"``) is an option, not
  the default. With a causal text encoder (CLIP) the isolated rows are the item as it would be read at the start of a
  prompt.
* *Matching.* Items and kept phrases are literal phrases matched case-insensitively on word boundaries ("ball" does
  not match inside "football"); every occurrence is used unless ``occurrence`` picks one.
* *Padding representation* (``mode="pad"``): the output at the first padding position after EOT when the same
  prompt is encoded to the full context length (``keep_padding=True``) - the vector a T2I model sees in the padded
  tail of this prompt's conditioning. Rows beyond EOT are not returned.
* *Specials in* :func:`keep_tokens`: SOT is kept by default (in a causal encoder its output is the same for every
  prompt, so it carries no prompt information; T2I cross-attention uses it as a sink); EOT, which summarises the
  whole prompt, is dropped unless asked for (``specials=("sot", "eot")``).
* *Pooled embedding.* Both operations edit the per-token sequence only; ``pooled`` stays the full prompt's EOT
  embedding.
* *Not implemented:* image generation and VLM judging (needs a T2I model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..methods import register_method
from ..models.hooks import TowerOutput
from ..models.tokenizer import TokenizedBatch
from ..tokens import Intervention, as_batch, intervene, space_output, space_site, space_tokens

register_method(
    "follow_the_flow",
    "Follow the Flow: On Information Flow Across Textual Tokens in Text-to-Image Models",
    "keep a subset of contextual token outputs; replace a leaked item's tokens with its isolated encoding",
    doc="docs/methods/follow_the_flow.md",
)(__name__)

__all__ = ["KeptTokens", "align_item", "keep_tokens", "decontextualize",
           "decontextualize_intervention"]


# --- token-subset encoding ------------------------------------------------------------------------------------------
@dataclass
class KeptTokens:
    """A prompt's token states (of the conditioning space ``space``) with only a subset kept.

    * ``tokens``: ``[K, dim]`` kept rows (``mode="drop"``) or ``[n, dim]`` with every other row replaced by ``pad``
      (``mode="pad"``); ``dim`` is ``D`` for ``space="joint"``, the text width ``W`` for ``"final"`` and
      ``"penultimate"``;
    * ``positions`` ``[K]``: the kept positions (ascending) in the full encoding;
    * ``mask`` ``[n]``: bool, True at kept positions;
    * ``full``: the full encoding (``TowerOutput``, batch of one); ``pad``: the padding vector (``mode="pad"``).
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    mode: str
    full: TowerOutput
    pad: torch.Tensor | None = None
    space: str = "joint"


@torch.no_grad()
def keep_tokens(model, text: str, keep: Sequence[str | int] | str, *, mode: str = "drop",
                specials: Sequence[str] = ("sot",), last_only: bool = False,
                occurrence: int | None = None, space: str = "joint") -> KeptTokens:
    """Encode ``text`` and keep only the token states (of ``space``: ``"joint"``, ``"final"``, ``"penultimate"``)
    selected by ``keep``: phrases (all their tokens, or only the last one with ``last_only``) and/or explicit
    positions; ``specials`` adds ``"sot"`` / ``"eot"``. ``mode="drop"`` returns just those rows; ``mode="pad"``
    returns the whole ``SOT..EOT`` sequence with the other rows set to the padding token's representation (see the
    module docstring)."""
    if mode not in ("drop", "pad"):
        raise ValueError(f"mode must be 'drop' or 'pad', got {mode!r}")
    unknown = set(specials) - {"sot", "eot"}
    if unknown:
        raise ValueError(f"specials must be 'sot' and/or 'eot', got {sorted(unknown)}")
    keep = [keep] if isinstance(keep, (str, int)) else list(keep)
    batch = model.tokenize([text])
    output = ("tokens", space_output(space))
    full = model.encode_text(batch, output=output)
    full.extras["space"] = space
    n = int(batch.lengths[0])
    eot = n - 1
    chosen: set[int] = set()
    for k in keep:
        if isinstance(k, str):
            pos = batch.token_positions(0, k, occurrence=occurrence)
            chosen.update(pos[-1:] if last_only else pos)
        else:
            p = int(k)
            if not -n <= p < n:
                raise IndexError(f"position {p} outside the {n} tokens of {text!r}")
            chosen.add(p % n)
    if "sot" in specials:
        chosen.add(0)
    if "eot" in specials:
        chosen.add(eot)
    positions = torch.tensor(sorted(chosen), dtype=torch.long)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[positions] = True
    rows = space_tokens(full, space)[0, :n]
    if mode == "drop":
        return KeptTokens(rows[positions].clone(), positions, mask, mode, full, space=space)
    if n >= batch.ids.shape[1]:
        raise ValueError(f"{text!r} fills the context ({n} tokens): there is no padding position to read")
    padded = model.encode_text(batch, output=output, keep_padding=True)
    pad = space_tokens(padded, space)[0, n].clone()  # first padding position after EOT
    out = torch.where(mask[:, None], rows, pad.expand_as(rows))
    return KeptTokens(out, positions, mask, mode, full, pad, space)


# --- the leakage fix ------------------------------------------------------------------------------------------------
def align_item(batch: TokenizedBatch, row: int, item: str, isolated: TokenizedBatch, iso_start: int,
               occurrence: int | None = None) -> list[tuple[int, int]]:
    """``[(prompt_position, isolated_position)]`` pairing the item's tokens in ``batch`` row ``row`` with those of
    the isolated encoding (row 0 of ``isolated``, where the item text starts at character ``iso_start``).

    Tokens are paired by their character span relative to the item's start; the pairing must be one-to-one, cover
    every token of both sides and agree on token ids, otherwise ``ValueError``."""
    iso_end = iso_start + len(item)
    iso_pos = isolated.span_positions(0, iso_start, iso_end)
    iso_key = {(isolated.spans[0][q][0] - iso_start, isolated.spans[0][q][1] - iso_start): q for q in iso_pos}
    pairs = []
    for s, e in batch.match_spans(row, item, occurrence):
        pos = batch.span_positions(row, s, e)
        if not pos:
            raise ValueError(f"{item!r} has no token in texts[{row}] = {batch.texts[row]!r} (truncated?)")
        keys = [(batch.spans[row][p][0] - s, batch.spans[row][p][1] - s) for p in pos]
        if len(pos) != len(iso_pos) or any(k not in iso_key for k in keys):
            raise ValueError(f"{item!r}: the tokens of texts[{row}] = {batch.texts[row]!r} do not align with the "
                             f"isolated encoding {isolated.texts[0]!r}")
        for p, k in zip(pos, keys):
            q = iso_key[k]
            if int(batch.ids[row, p]) != int(isolated.ids[0, q]):
                raise ValueError(f"{item!r}: token id mismatch at position {p} of texts[{row}] (BPE differs in "
                                 f"context); cannot align with the isolated encoding")
            pairs.append((p, q))
    return pairs


@torch.no_grad()
def _isolated(model, item: str, template: str, space: str) -> tuple[TokenizedBatch, int, torch.Tensor]:
    if template.count("{}") != 1:
        raise ValueError(f"template must contain exactly one '{{}}', got {template!r}")
    text = template.format(item)
    batch = model.tokenize([text])
    return batch, template.index("{}"), space_tokens(model.encode_text(batch, output=space_output(space)), space)[0]


def decontextualize_intervention(model, batch: TokenizedBatch, items: str | Sequence[str], *,
                                 template: str = "{}", width: int | None = None,
                                 occurrence: int | None = None, space: str = "joint") -> Intervention:
    """The fix as ``Intervention(space_site(space), rows, positions=<item mask>, mode="replace")`` for ``batch``
    (``text.tokens``, ``text.final`` or ``text.penultimate``; the isolated rows are read in the same space).
    ``width`` is the encoded length: default the longest row (``encode_text(batch)``), ``batch.ids.shape[1]`` with
    ``keep_padding=True``."""
    items = [items] if isinstance(items, str) else list(items)
    width = int(batch.lengths.max()) if width is None else int(width)
    iso = {item: _isolated(model, item, template, space) for item in dict.fromkeys(items)}
    mask = torch.zeros(len(batch), width, dtype=torch.bool)
    source: dict[tuple[int, int], torch.Tensor] = {}
    for r in range(len(batch)):
        for item in items:
            ib, start, rows = iso[item]
            for p, q in align_item(batch, r, item, ib, start, occurrence):
                if (r, p) in source:
                    raise ValueError(f"items overlap at position {p} of texts[{r}] = {batch.texts[r]!r}")
                if p >= width:
                    raise ValueError(f"width {width} cuts position {p} of texts[{r}]")
                source[(r, p)] = rows[q]
                mask[r, p] = True
    order = mask.nonzero().tolist()  # the row-major order in which x[mask] lists the selected rows
    values = torch.stack([source[(r, p)] for r, p in order])
    return Intervention(space_site(space), values, positions=mask, mode="replace")


def decontextualize(model, texts: str | Sequence[str] | TokenizedBatch, items: str | Sequence[str], *,
                    template: str = "{}", output=None, occurrence: int | None = None,
                    space: str = "joint") -> TowerOutput:
    """Encode ``texts`` with the states of every item's tokens in ``space`` replaced by the item's isolated
    (uncontextualised) encoding in that space.

    Returns a :class:`TowerOutput`: the edited sequence is ``cliplab.tokens.space_tokens(out, space)`` (``tokens``
    for ``"joint"``, ``final``, ``penultimate``), recorded by default (``output=None``) with the joint ``tokens``;
    ``extras["space"]`` names it. ``pooled`` is the unedited EOT embedding for ``"joint"`` and ``"final"``.
    Stacks on interventions already active on ``model``."""
    batch = as_batch(model, texts)
    iv = decontextualize_intervention(model, batch, items, template=template, occurrence=occurrence, space=space)
    if output is None:
        output = ("tokens", space_output(space))
    with torch.no_grad(), intervene(model, iv):
        out = model.encode_text(batch, output=output)
    out.extras["space"] = space
    return out
