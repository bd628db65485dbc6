"""Synthetic records for record linkage: one entity, many noisy records (an image and its OCR text).

An entity is a *logo* (one or two coloured shapes from the synthetic world) and a *name* (two of the words the synthetic world draws, e.g. "owl pen").
Entities are laid out on a chain so that neither modality alone identifies them: entity ``2i`` is
``(logo i, name i)`` and entity ``2i+1`` is ``(logo i, name i+1)``; every logo is shared by two entities and every
name by two others. A record renders its entity's logo at new random positions (with sampled brightness and
clutter, no drawn word) and carries the name through OCR-style noise (confusable characters, drops, doublings,
spaces). Only the pair (image, text) identifies the entity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["RecordSet", "make_records", "ocr_noise"]

#: characters OCR commonly confuses (letter -> look-alike)
_CONFUSABLE = {"o": "0", "l": "1", "i": "l", "e": "c", "a": "o", "s": "5", "m": "rn", "n": "h", "t": "f", "r": "n",
               "b": "h", "g": "q", "z": "2", "u": "v"}


@dataclass
class RecordSet:
    """``images[i]`` (PIL) and ``texts[i]`` (OCR text) are record ``i``; ``labels[i]`` is its entity id."""

    images: list
    texts: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)


def ocr_noise(text: str, rng: np.random.Generator, rate: float = 0.15) -> str:
    """``text`` with per-character OCR errors at ``rate``: a look-alike substitution, a drop or a doubling."""
    out = []
    for ch in text:
        if ch != " " and rng.random() < rate:
            kind = rng.integers(3)
            if kind == 0:
                out.append(_CONFUSABLE.get(ch, ch.upper()))
            elif kind == 1:
                continue  # dropped
            else:
                out.append(ch + ch)
        else:
            out.append(ch)
    return "".join(out)


def _shuffled(items: set, rng: np.random.Generator) -> list:
    """A seeded random order of a set: sorted first, since a set's iteration order of strings changes with Python's
    hash seed from one process to the next."""
    ordered = sorted(items)
    return [ordered[i] for i in rng.permutation(len(ordered))]


def _names(n: int, rng: np.random.Generator, words: tuple[str, ...]) -> list[str]:
    """``n`` distinct two-word names from ``words`` (the world's drawn words, which the shipped text tower knows)."""
    if n > len(words) * (len(words) - 1):
        raise ValueError(f"{len(words)} words make at most {len(words) * (len(words) - 1)} names; asked for {n}")
    names: set[str] = set()
    while len(names) < n:
        names.add(" ".join(str(w) for w in rng.choice(words, size=2, replace=False)))
    return _shuffled(names, rng)


def _logos(n: int, rng: np.random.Generator, shapes, colours) -> list[tuple[tuple[str, str], ...]]:
    logos: set[tuple[tuple[str, str], ...]] = set()
    while len(logos) < n:
        k = int(rng.integers(1, 3))
        logos.add(tuple(sorted((str(rng.choice(shapes)), str(rng.choice(colours))) for _ in range(k))))
    return _shuffled(logos, rng)


def make_records(n_entities: int = 24, records_per_entity: int = 4, seed: int = 0, noise: float = 0.15,
                 image_size: int = 64) -> RecordSet:
    """``n_entities`` (even) entities on the logo/name chain, ``records_per_entity`` noisy records each."""
    from ..data import SceneWorld
    from ..data.synthetic.vocabulary import VOCABULARY, WORDS

    if n_entities < 4 or n_entities % 2:
        raise ValueError(f"n_entities must be even and >= 4 (two entities per logo), got {n_entities}")
    if records_per_entity < 1:
        raise ValueError(f"records_per_entity must be >= 1, got {records_per_entity}")
    rng = np.random.default_rng(seed)
    half = n_entities // 2
    logos = _logos(half, rng, VOCABULARY["shapes"], list(VOCABULARY["colours"]))
    names = _names(half, rng, WORDS)
    world = SceneWorld(image_size=image_size, seed=seed, texture_probs=(1.0, 0.0, 0.0))
    images, texts, labels = [], [], []
    for e in range(n_entities):
        logo, name = logos[e // 2], names[(e // 2 + e % 2) % half]
        specs = [{"shape": s, "colour": c, "size": "medium"} for s, c in logo]
        for _ in range(records_per_entity):
            scene = world.compose(specs, rng, word=None)  # new layout, brightness and clutter per record
            images.append(world.render(scene))
            texts.append(ocr_noise(name, rng, noise))
            labels.append(e)
    return RecordSet(images, texts, np.asarray(labels))
