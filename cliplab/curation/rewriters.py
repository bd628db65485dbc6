"""Caption rewriters: the ``Rewriter`` protocol, the identity, a fast rule-based paraphraser, and the language
model access that the LLM rewriters and fusers share.

A rewriter maps a list of captions to one rewrite each: ``rewriter(captions, version=k) -> list[str]``.
``version`` numbers the rewrites of a caption (LaCLIP makes several), so a deterministic rewriter can still give
different rewrites, and every rewrite is a pure function of ``(caption, version, seed)``: a resumed job
reproduces it exactly.

:class:`RuleRewriter` is the fast default (no model): per rewrite it swaps some words for synonyms, may move a
trailing place phrase to the front, and may wrap the caption in another sentence frame ("a photo of ...",
"there is ..."). It keeps meaning but changes wording and order, which is what LaCLIP's rewrites add to the data;
it does not add new content the way an LLM does.
"""

from __future__ import annotations

import re
import zlib
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = ["Rewriter", "IdentityRewriter", "RuleRewriter", "load_llm", "complete", "SYNONYMS", "FRAMES",
           "stable_hash", "in_context_prompt", "parse_in_context"]


@runtime_checkable
class Rewriter(Protocol):
    def __call__(self, captions: Sequence[str], version: int = 0) -> list[str]: ...


def stable_hash(text: str) -> int:
    """A hash of ``text`` that is the same in every process (Python's ``hash`` of a str is salted per process)."""
    return zlib.crc32(text.encode("utf-8"))


class IdentityRewriter:
    """Returns every caption unchanged (the control: training with its "rewrites" is training without any)."""

    def __call__(self, captions: Sequence[str], version: int = 0) -> list[str]:
        return list(captions)

    def __repr__(self) -> str:
        return "IdentityRewriter()"


#: word -> words of the same meaning in a caption (both directions are listed where both hold)
SYNONYMS: dict[str, tuple[str, ...]] = {
    "man": ("guy", "gentleman"), "woman": ("lady",), "men": ("guys",), "women": ("ladies",),
    "boy": ("young boy", "kid"), "girl": ("young girl", "kid"), "child": ("kid", "youngster"),
    "children": ("kids",), "kids": ("children",), "people": ("persons", "folks"), "dog": ("puppy", "pup"),
    "dogs": ("puppies",), "puppy": ("dog",), "large": ("big",), "big": ("large",), "small": ("little", "tiny"),
    "little": ("small",), "runs": ("jogs", "dashes"), "running": ("jogging", "dashing"), "jumps": ("leaps",),
    "jumping": ("leaping",), "walks": ("strolls",), "walking": ("strolling",), "sits": ("is seated",),
    "sitting": ("seated",), "street": ("road",), "road": ("street",), "grass": ("lawn",), "photo": ("picture",),
    "picture": ("photo",), "image": ("picture",), "shirt": ("top",), "holding": ("carrying",), "plays": ("is playing",),
    "looking": ("gazing",), "near": ("close to", "by"), "beside": ("next to",), "next to": ("beside",),
    "above": ("over",), "below": ("under",), "circle": ("round shape",), "square": ("box shape",),
    "two": ("a pair of",), "ocean": ("sea",), "sea": ("ocean",), "stone": ("rock",), "rock": ("stone",),
    "smiling": ("grinning",), "red": ("red-coloured",), "blue": ("blue-coloured",), "green": ("green-coloured",),
}

#: sentence frames; ``{}`` is the caption without its leading article handling
FRAMES: tuple[str, ...] = ("a photo of {}", "an image showing {}", "there is {}", "{} in this picture",
                           "this picture shows {}", "a view of {}")

_PLACE = re.compile(r"^(?P<head>.+?) (?P<place>(?:in|on|at|near|by|under|beside|along|through|across) (?:the|a|an) .+)$")


class RuleRewriter:
    """The rule-based paraphraser (module docstring). ``swap_prob``: chance of each eligible synonym swap;
    ``reorder_prob``: chance of moving a trailing place phrase to the front; ``frame_prob``: chance of a sentence
    frame; ``seed``: base of the per-(caption, version) generator; ``tries``: redraws when a rewrite comes out equal
    to the caption."""

    def __init__(self, swap_prob: float = 0.5, reorder_prob: float = 0.4, frame_prob: float = 0.5, seed: int = 0,
                 synonyms: dict[str, Sequence[str]] | None = None, frames: Sequence[str] | None = None,
                 tries: int = 4):
        for name, p in (("swap_prob", swap_prob), ("reorder_prob", reorder_prob), ("frame_prob", frame_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        self.swap_prob, self.reorder_prob, self.frame_prob = float(swap_prob), float(reorder_prob), float(frame_prob)
        self.seed, self.tries = int(seed), int(tries)
        self.synonyms = dict(SYNONYMS if synonyms is None else synonyms)
        self.frames = tuple(FRAMES if frames is None else frames)
        # longest phrases first, so "next to" is swapped whole before "next"
        keys = sorted(self.synonyms, key=len, reverse=True)
        self._pattern = re.compile(r"\b(" + "|".join(map(re.escape, keys)) + r")\b") if keys else None

    def __repr__(self) -> str:
        return (f"RuleRewriter(swap_prob={self.swap_prob}, reorder_prob={self.reorder_prob}, "
                f"frame_prob={self.frame_prob}, seed={self.seed})")

    def rewrite_one(self, caption: str, version: int = 0) -> str:
        rng = np.random.default_rng([self.seed, int(version), stable_hash(caption)])
        text = caption.strip().rstrip(".").strip()
        out = text
        for _ in range(max(1, self.tries)):
            out = self._once(text, rng)
            if out.lower() != text.lower():
                break
        return out

    def _once(self, text: str, rng: np.random.Generator) -> str:
        lower = text[:1].lower() + text[1:]
        if self._pattern is not None:
            def swap(m: re.Match) -> str:
                options = self.synonyms[m.group(1)]
                return options[int(rng.integers(len(options)))] if rng.random() < self.swap_prob else m.group(1)
            lower = self._pattern.sub(swap, lower)
        m = _PLACE.match(lower)
        if m and rng.random() < self.reorder_prob:
            lower = f"{m.group('place')}, {m.group('head')}"
        if self.frames and rng.random() < self.frame_prob:
            lower = self.frames[int(rng.integers(len(self.frames)))].format(lower)
        return lower

    def __call__(self, captions: Sequence[str], version: int = 0) -> list[str]:
        return [self.rewrite_one(c, version) for c in captions]


def load_llm(name: str = "smollm2-135m"):
    """A ``cliplab.text.CausalLM`` by name (``MissingDependency`` with the install command when its package is
    absent)."""
    from ..text import load_lm

    return load_lm(name)


def complete(lm, prompt: str, max_new_tokens: int = 40) -> str:
    """The LM's greedy continuation of ``prompt`` (the text of the new tokens; special tokens dropped)."""
    return lm.generate(prompt, max_new_tokens=max_new_tokens).text


def in_context_prompt(header: str, examples: Sequence[tuple[str, str]], query: str) -> str:
    """An in-context completion prompt in LaCLIP's format: ``header``, then each ``input => output`` example and
    finally ``query =>``, separated by blank lines (line breaks inside the texts are removed)."""
    lines = [header] + [f"{a.replace(chr(10), '')} => {b.replace(chr(10), '')}" for a, b in examples]
    return "\n\n".join(lines + [f"{query.replace(chr(10), '')} =>"])


def parse_in_context(prompt: str, generated: str) -> str | None:
    """The answer to :func:`in_context_prompt`: on the query's line of prompt + continuation (line ``2k + 2`` for
    ``k`` examples), the text after its ``=>``, stripped; ``None`` when there is nothing there."""
    line_no = prompt.count("\n")
    lines = (prompt + generated).split("\n")
    if len(lines) <= line_no or "=>" not in lines[line_no]:
        return None
    text = lines[line_no].strip().split("=>")[1].strip()
    return text or None
