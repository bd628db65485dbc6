"""Pooling: how a sequence of token states becomes one sentence embedding. Each option is a registered
:class:`Pooling` whose docstring cites where it comes from (the surveys of LLM text embeddings list these extractors).

A pooling function maps final token states ``[B, n, W]`` and the mask of real tokens ``[B, n]`` (rows padded on the
right) to ``[B, W]``. A pooling may also wrap each text in a prompt first (``template``, e.g. PromptEOL), after an
optional clean-up of the text (``prepare``).

    >>> from cliplab.text import list_poolings, get_pooling
    >>> list_poolings()
    ['first', 'last', 'max', 'mean', 'prompteol', 'weighted_mean']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

PoolFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Pooling:
    name: str
    fn: PoolFn
    doc: str
    template: str | None = None  # a prompt with "{text}" where the sentence goes
    prepare: Callable[[str], str] | None = None

    def wrap(self, text: str) -> str:
        """The text as the model reads it (cleaned up and inside the prompt, when the pooling has one)."""
        if self.prepare is not None:
            text = self.prepare(text)
        return self.template.replace("{text}", text) if self.template else text

    def __call__(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if states.shape[:2] != mask.shape:
            raise ValueError(f"states {tuple(states.shape)} and mask {tuple(mask.shape)} disagree")
        if not bool(mask[:, 0].all()) and states.shape[1]:
            raise ValueError("every row needs at least one real token, padded on the right")
        # in fp32 whatever the model's precision: bf16 cannot count past 256, so means and weights would drift
        return self.fn(states.float(), mask.to(states.device))


def shorten_to_fit(text: str, render: Callable[[str], str], count: Callable[[str], int],
                   limit: int) -> tuple[str, bool]:
    """``render(text)`` if it takes at most ``limit`` tokens (as ``count`` measures them); otherwise ``render`` of
    the longest prefix of ``text`` that fits, so a prompt's closing words survive where plain truncation would cut
    them. Returns ``(rendered, shortened)``."""
    full = render(text)
    if count(full) <= limit:
        return full, False
    lo, hi = 0, len(text)  # the longest prefix length that fits (binary search: the count grows with the prefix)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(render(text[:mid])) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return render(text[:lo].rstrip()), True


_POOLINGS: dict[str, Pooling] = {}
_ALIASES = {"cls": "first", "eot": "last", "eos": "last", "sgpt": "weighted_mean"}


def register_pooling(name: str, template: str | None = None, prepare: Callable[[str], str] | None = None):
    """Decorator: register ``fn(states, mask) -> [B, W]`` as pooling ``name`` (its docstring is the doc)."""

    def register(fn: PoolFn) -> PoolFn:
        if name in _POOLINGS:
            raise ValueError(f"pooling {name!r} is already registered")
        _POOLINGS[name] = Pooling(name, fn, (fn.__doc__ or "").strip(), template, prepare)
        return fn

    return register


def list_poolings() -> list[str]:
    return sorted(_POOLINGS)


def get_pooling(name: str | Pooling) -> Pooling:
    """A registered pooling by name (aliases: ``cls`` = first, ``eot``/``eos`` = last, ``sgpt`` = weighted_mean)."""
    if isinstance(name, Pooling):
        return name
    key = _ALIASES.get(name, name)
    if key not in _POOLINGS:
        raise KeyError(f"unknown pooling {name!r}; known: {list_poolings()} (aliases {sorted(_ALIASES)})")
    return _POOLINGS[key]


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Position of each row's last real token ``[B]`` (rows padded on the right)."""
    return mask.long().sum(1).sub(1).clamp(min=0)


@register_pooling("mean")
def mean_pooling(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real tokens' states, special tokens included (Sentence-BERT, Reimers & Gurevych 2019; the
    pooling all-MiniLM-L6-v2 was trained with)."""
    m = mask.to(states.dtype).unsqueeze(-1)
    return (states * m).sum(1) / m.sum(1).clamp(min=1)


@register_pooling("first")
def first_pooling(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The first token's state: ``[CLS]`` in BERT (Devlin et al. 2019), SOT in CLIP, the first word in a decoder
    without BOS."""
    return states[:, 0]


@register_pooling("last")
def last_pooling(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The last real token's state: the only token of a causal model that has seen the whole text (GPT-style
    last-token pooling; CLIP's EOT pooling, Radford et al. 2021)."""
    rows = torch.arange(states.shape[0], device=states.device)
    return states[rows, last_index(mask)]


@register_pooling("max")
def max_pooling(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over the real tokens (Sentence-BERT's MAX strategy; InferSent, Conneau et al. 2017)."""
    fill = torch.finfo(states.dtype).min
    return states.masked_fill(~mask.unsqueeze(-1), fill).amax(1)


@register_pooling("weighted_mean")
def weighted_mean_pooling(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Position-weighted mean, weights ``i / sum(i)`` for real tokens ``i = 1..n`` (SGPT, Muennighoff 2022): later
    tokens of a causal model have seen more of the text, so they count more."""
    w = torch.cumsum(mask.to(states.dtype), dim=1) * mask.to(states.dtype)
    w = w / w.sum(1, keepdim=True).clamp(min=1)
    return (states * w.unsqueeze(-1)).sum(1)


#: PromptEOL's template (Jiang et al. 2023, *Scaling Sentence Embeddings with Large Language Models*), as used by
#: its code and by Token Prepending's: the LM is asked to compress the sentence into its next word.
PROMPTEOL_TEMPLATE = 'This sentence : "{text}" means in one word:"'


def prepare_for_prompt(text: str) -> str:
    """The clean-up PromptEOL's code applies before quoting a sentence: end it with a full stop, swap double
    quotes for single ones, and turn a closing question mark into a full stop."""
    text = text.strip()
    if text and text[-1] not in ".?\"'":
        text += "."
    text = text.replace('"', "'")
    if text.endswith("?"):
        text = text[:-1] + "."
    return text


@register_pooling("prompteol", template=PROMPTEOL_TEMPLATE, prepare=prepare_for_prompt)
def prompteol_pooling(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PromptEOL (Jiang et al. 2023): wrap the text in ``This sentence : "X" means in one word:"`` and take the last
    token's state, the model's summary before it writes the one word."""
    return last_pooling(states, mask)
