"""Reading token-level results: which tokens belong to a phrase, word-level scores, patch-text similarity maps."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from ..models.hooks import TowerOutput
from ..models.tokenizer import TokenizedBatch
from .sites import space_site


def as_batch(model, texts) -> TokenizedBatch:
    """``texts`` (one string, a sequence of strings, or a :class:`TokenizedBatch` already) as ``model``'s batch."""
    if isinstance(texts, TokenizedBatch):
        return texts
    return model.tokenize([texts] if isinstance(texts, str) else list(texts))


def space_output(space: str) -> str:
    """The ``output=`` name that records a conditioning space's per-token sequence (``"joint"`` -> ``"tokens"``)."""
    space_site(space)  # validates the name
    return "tokens" if space == "joint" else space


def space_tokens(out: TowerOutput, space: str) -> torch.Tensor:
    """The per-token sequence of a conditioning space in ``out``: ``joint`` -> ``out.tokens`` ``[B, n, D]``,
    ``final`` -> ``out.final`` ``[B, n, W]``, ``penultimate`` -> ``out.penultimate`` ``[B, n, W]``; encode with
    ``output=space_output(space)``."""
    space_site(space)  # validates the name
    seq = {"joint": out.tokens, "final": out.final, "penultimate": out.penultimate}[space]
    if seq is None:
        raise ValueError(f"the {space!r} sequence was not recorded: encode with output={space_output(space)!r}")
    return seq


def token_mask(batch: TokenizedBatch, phrases: str | list[str | None], width: int | None = None,
               whole_word: bool = True, occurrence: int | None = None) -> torch.Tensor:
    """Bool mask ``[B, width]`` of the tokens whose character spans overlap ``phrases[row]`` (one phrase for every
    row, or one per row; None selects nothing in that row), matched case-insensitively as whole words by default
    ("man" is not found inside "woman"; ``whole_word=False`` for plain substring search). Every occurrence is taken
    (``occurrence=None``), or only the ``occurrence``-th (0-based). Multi-token words select all their tokens;
    SOT/EOT never. ``width`` defaults to the longest row (``int(batch.lengths.max())``, what ``encode_text`` cuts
    the batch to), or to the whole padded row for a last-pooled (SigLIP) batch, which is never cut; pass
    ``batch.ids.shape[1]`` for ``keep_padding=True``.
    Raises ``ValueError`` when a phrase is not in its text, selects no token (e.g. it lies in the truncated part),
    or has a token at or beyond ``width``. Matching is :meth:`TokenizedBatch.token_positions`."""
    rows = len(batch)
    phrases = [phrases] * rows if isinstance(phrases, str) else list(phrases)
    if len(phrases) != rows:
        raise ValueError(f"{len(phrases)} phrases for {rows} texts")
    if width is None:
        width = batch.ids.shape[1] if getattr(batch, "pool", "eot") == "last" else int(batch.lengths.max())
    width = int(width)
    mask = torch.zeros(rows, width, dtype=torch.bool)
    for r, phrase in enumerate(phrases):
        if phrase is None:
            continue
        pos = batch.token_positions(r, phrase, occurrence=occurrence, whole_word=whole_word)
        if not pos:
            raise ValueError(f"{phrase!r} selects no token of texts[{r}] = {batch.texts[r]!r}")
        if pos[-1] >= width:
            raise ValueError(f"width {width} cuts the tokens {pos} of {phrase!r} in row {r}")
        mask[r, pos] = True
    return mask


def word_spans(text: str) -> list[tuple[int, int, str]]:
    """Whitespace-separated words of ``text`` as ``(start, end, word)``."""
    return [(m.start(), m.end(), m.group()) for m in re.finditer(r"\S+", text)]


def word_scores(batch: TokenizedBatch, row: int, token_scores: torch.Tensor) -> list[tuple[str, float]]:
    """Average per-token scores (indexed by position) within each whitespace word of ``batch.texts[row]``.
    Words with no kept token (cut by truncation) are left out."""
    spans = batch.spans[row]
    n = int(batch.lengths[row])
    out = []
    for s, e, word in word_spans(batch.texts[row]):
        pos = [p for p in range(n) if spans[p][0] < e and spans[p][1] > s]  # special tokens: empty spans
        if pos:
            out.append((word, float(token_scores[pos].mean())))
    return out


def patch_text_similarity(image_out: TowerOutput, text_features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every patch token with every text ``[K, D]``, as maps ``[B, K, gh, gw]``.

    ``image_out`` must come from ``encode_image(..., output="tokens")`` without dropped patches or prompts."""
    if image_out.tokens is None:
        raise ValueError("encode the image with output='tokens' first")
    if image_out.extras.get("keep") is not None or image_out.extras.get("n_prompts"):
        raise ValueError("similarity maps need the full patch grid (no keep=, no prompts=)")
    gh, gw = image_out.extras["grid"]
    patches = F.normalize(image_out.tokens[:, 1:], dim=-1)
    sims = patches @ F.normalize(text_features, dim=-1).t()  # [B, N, K]
    return sims.transpose(1, 2).reshape(sims.shape[0], -1, gh, gw)
