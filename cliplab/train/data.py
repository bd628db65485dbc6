"""Training data: index-addressable sources (a small registry), caption choice, tokenization and the loader.

Every batch is a pure function of its step: the sampler maps ``step -> indices``, the source maps an index to an image
and its captions, and the short/long choice of a ``mix`` is drawn from ``default_rng([seed, CAPTION_STREAM, step])``.
So a resumed run sees exactly the batches the uninterrupted run saw, whatever the number of loader workers.

Sources (``register_source``):

* ``synthetic``: the scene world as an endless (or ``num_scenes``-long) stream. Index ``i`` is
  ``world.sample(offset + i)``. When the world's image size equals the model input (the usual 64 px), pixels skip the
  PIL round trip of the preprocessor and are normalised directly, with the same float32 operations in the same
  order, hence bit-identical to ``model.preprocess(world.render(scene))``.
* ``folder``: a ``captions.csv`` (columns ``image``, ``caption`` and optionally ``long_caption``; image paths relative
  to the CSV) as written by ``cliplab.data.write_image_folder``. Images go through the model's preprocessor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..data import SceneWorld
from ..models.tokenizer import CLIPTokenizer, TruncationWarning
from .registry import Registry, import_training_plugins

__all__ = ["Batch", "DataSource", "SyntheticStream", "CaptionFolder", "TrainBatches", "register_source",
           "get_source", "list_sources", "make_loader", "CAPTION_MODES", "SOURCES"]

SOURCES: Registry[type] = Registry("data source", discover=import_training_plugins)
CAPTION_MODES = ("short", "long", "mix")
CAPTION_STREAM = 0xCA7  # sub-stream id of the short/long draws


def register_source(name: str, overwrite: bool = False):
    """Class decorator registering a :class:`DataSource` subclass under ``name``."""
    return SOURCES.register(name, overwrite=overwrite)


def list_sources() -> list[str]:
    return SOURCES.names()


def get_source(name: str, preprocessor, **options: Any) -> "DataSource":
    """Build source ``name`` for a model with the given preprocessor (``model.preprocessor``)."""
    return SOURCES.build(name, preprocessor, **options)


@dataclass
class Batch:
    """One training batch. ``pixels`` are normalised model input; ``ids`` are token ids ``[B, context]``."""

    step: int
    indices: list[int]
    pixels: torch.Tensor  # [B, 3, S, S] float32
    ids: torch.Tensor  # [B, L] int64
    texts: list[str]
    is_long: torch.Tensor  # [B] bool: the long caption was used
    truncated: torch.Tensor  # [B] bool: the caption was cut to the context length
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def n_truncated(self) -> int:
        return int(self.truncated.sum())


class DataSource(ABC):
    """Index-addressable examples. ``size`` is the number of items (``None``: endless). ``group_size`` > 1 says
    items come in groups of consecutive indices that must share a batch (the trainer checks the sampler keeps them
    together)."""

    size: int | None = None
    group_size: int = 1

    @abstractmethod
    def pixels(self, indices: Sequence[int]) -> torch.Tensor:
        """Preprocessed images ``[B, 3, S, S]`` float32."""

    @abstractmethod
    def captions(self, indices: Sequence[int]) -> tuple[list[str], list[str | None]]:
        """Short captions and long captions (``None`` where a row has none)."""

    def negative_captions(self, indices: Sequence[int]) -> tuple[list[list[str]], list[list[str]]] | None:
        """Hard-negative captions of each row's short and of its long caption (lists, possibly empty): minimal
        edits of the caption meant to be false of the image. ``None`` (the default): this source has none."""
        return None

    def tag_texts(self, indices: Sequence[int]) -> list[str] | None:
        """Texts whose words are each image's exact attribute tags (for tag losses), or ``None`` (the default):
        the source knows no more than its captions."""
        return None

    @property
    def has_negatives(self) -> bool:
        """Whether :meth:`negative_captions` gives negatives (checked before training a loss that needs them)."""
        return False


def _normalise_uint8(arr: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``[B, S, S, 3]`` uint8 -> ``[B, 3, S, S]`` float32 with exactly the operations of ``Preprocessor._to_array``
    (x / 255, - mean, / std in float32, elementwise), so the result is bit-identical to the per-image path."""
    x = np.ascontiguousarray(arr.transpose(0, 3, 1, 2), dtype=np.float32)
    x /= np.float32(255.0)
    x -= np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    x /= np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return torch.from_numpy(x)


#: Sub-stream of a scene's generator that draws its shape variants; fallback scenes come from indices far past any
#: stream position a run reaches.
VARIANT_STREAM = 7
VARIANT_FALLBACK = 1 << 40
#: Sub-stream of a scene's generator that draws its hard negative.
NEGATIVE_STREAM = 11


@register_source("synthetic")
class SyntheticStream(DataSource):
    """Scenes from :class:`cliplab.data.SceneWorld`: index ``i`` is scene ``offset + i`` of the world.

    ``image_size`` defaults to the model's input size; ``seed`` is the world's seed; ``num_scenes`` makes the source
    finite (``None``: endless); ``world`` holds further ``SceneWorld`` keyword arguments (``max_objects``, ...);
    ``fast=False`` forces the generic PIL preprocessing path.

    ``shape_variants=k`` (> 1) turns the stream into minimal groups (``num_scenes`` then counts items, not groups):
    items ``k*g .. k*g + k - 1`` are scene ``offset + g`` and ``k - 1`` copies of it that differ only in their
    objects' shapes (:meth:`SceneWorld.shape_variants`; a copy that cannot be laid out is replaced by an independent
    scene). With a sampler that keeps consecutive items together (``sequential``; the stream's scenes are
    independent draws anyway) and a batch size divisible by ``k``, every batch holds ``B / k`` such groups, so the
    contrastive loss can only tell a group's images and captions apart by shape: in-batch hard negatives for the
    attribute a from-scratch model learns last.

    ``hard_negatives``: attributes (of ``SceneWorld.REPLACEABLE``: shape, colour, size, texture) from which each
    scene's hard-negative captions are made (:meth:`negative_captions`, for HQ-CLIP's hard-negative identification).
    The candidates are :meth:`SceneWorld.attribute_replacements` of those attributes (a present value swapped for an
    absent one in every object that has it) whose caption differs from the scene's; ``num_negatives`` of them (or
    all there are) are drawn without replacement by the scene's own generator (sub-stream ``NEGATIVE_STREAM``),
    separately for the short and the long caption. ``negatives_for`` ("both", "short" or "long") says which kind of
    caption gets negatives (long ones cost 77 text positions each).

    :meth:`tag_texts` are the objects' attribute words, so a tag loss gets each image's exact tags, not the
    caption's (short captions leave attributes out; long ones say "small grey marks" of clutter).
    """

    def __init__(self, preprocessor, image_size: int | None = None, seed: int = 0, offset: int = 0,
                 num_scenes: int | None = None, world: dict[str, Any] | None = None, fast: bool = True,
                 shape_variants: int = 1, hard_negatives: Sequence[str] = (), num_negatives: int = 1,
                 negatives_for: str = "both"):
        self.preprocessor = preprocessor
        size = preprocessor.config.image_size if image_size is None else int(image_size)
        self.world = SceneWorld(image_size=size, seed=seed, **(world or {}))
        self.offset = int(offset)
        self.size = None if num_scenes is None else int(num_scenes)
        self.fast = bool(fast) and size == preprocessor.config.image_size
        self.group_size = int(shape_variants)
        if not 1 <= self.group_size <= len(self.world.shapes):
            raise ValueError(f"shape_variants must be between 1 and {len(self.world.shapes)}, got {shape_variants}")
        self._group: tuple[int, list] = (-1, [])  # the last group built (a batch asks for its members in a row)
        self.hard_negatives = tuple(hard_negatives)
        bad = [a for a in self.hard_negatives if a not in SceneWorld.REPLACEABLE]
        if bad or len(set(self.hard_negatives)) != len(self.hard_negatives):
            raise ValueError(f"hard_negatives must be distinct attributes of {list(SceneWorld.REPLACEABLE)}, "
                             f"got {list(hard_negatives)}")
        if int(num_negatives) < 1 or negatives_for not in ("both", "short", "long"):
            raise ValueError(f"num_negatives must be >= 1 and negatives_for one of both/short/long, got "
                             f"{num_negatives}, {negatives_for!r}")
        self.num_negatives, self.negatives_for = int(num_negatives), negatives_for

    def scene(self, index: int):
        if self.size is not None and not 0 <= index < self.size:
            raise IndexError(f"scene index {index} outside 0..{self.size - 1}")
        k = self.group_size
        if k == 1:
            return self.world.sample(self.offset + int(index))
        group, member = divmod(int(index), k)
        if self._group[0] != group:
            # a pure function of the group index (its own generator), so any item can also be built on its own
            base = self.world.sample(self.offset + group)
            self._group = (group, self.world.shape_variants(base, k, self.world.rng(self.offset + group,
                                                                                   VARIANT_STREAM)))
        variants = self._group[1]
        if member < len(variants):
            return variants[member]
        return self.world.sample(VARIANT_FALLBACK + k * (self.offset + group) + member)

    def _scenes(self, indices: Sequence[int]) -> list:
        # The scene cache keeps rendered images; a batch asks for pixels and captions of the same scenes.
        if getattr(self, "_last", (None,))[0] != list(indices):
            self._last = (list(indices), [self.scene(i) for i in indices])
        return self._last[1]

    def pixels(self, indices: Sequence[int]) -> torch.Tensor:
        scenes = self._scenes(indices)
        if not self.fast:
            return self.preprocessor.batch([s.image for s in scenes])
        arr = np.stack([np.asarray(s.image, dtype=np.uint8) for s in scenes])
        cfg = self.preprocessor.config
        return _normalise_uint8(arr, cfg.mean, cfg.std)

    def captions(self, indices: Sequence[int]) -> tuple[list[str], list[str | None]]:
        scenes = self._scenes(indices)
        return [s.short_caption for s in scenes], [s.long_caption for s in scenes]

    def negative_captions(self, indices: Sequence[int]) -> tuple[list[list[str]], list[list[str]]] | None:
        if not self.hard_negatives:
            return None
        short, long = [], []
        for index, scene in zip(indices, self._scenes(indices)):
            rng = self.world.rng(self.offset + int(index), NEGATIVE_STREAM)
            foils = [f for a in self.hard_negatives for f in self.world.attribute_replacements(scene, a)]
            for kind, out in (("short", short), ("long", long)):
                if self.negatives_for not in (kind, "both"):
                    out.append([])
                    continue
                own = getattr(scene, kind + "_caption")
                texts = list(dict.fromkeys(t for t in (getattr(f, kind + "_caption") for f in foils)
                                           if t != own and not _only_drops_words(own, t)))
                pick = rng.permutation(len(texts))[: self.num_negatives]
                out.append([texts[k] for k in sorted(pick.tolist())])
        return short, long

    @property
    def has_negatives(self) -> bool:
        return bool(self.hard_negatives)

    def tag_texts(self, indices: Sequence[int]) -> list[str]:
        return [" ".join(f"{o.size} {o.texture} {o.colour} {o.shape}" for o in s.objects) for s in self._scenes(indices)]


def _only_drops_words(caption: str, other: str) -> bool:
    """Whether ``other`` is ``caption`` with some words left out: less specific, so possibly still true of the image
    (short captions do not say "plain", so making a striped group plain turns "two striped crosses" into "two
    crosses")."""
    words, rest = caption.split(), other.split()
    remaining = iter(words)
    return len(rest) < len(words) and all(w in remaining for w in rest)  # a subsequence: `in` consumes the iterator


@register_source("folder")
class CaptionFolder(DataSource):
    """Images listed in a table (default ``captions.csv``; columns ``image``, ``caption``, optional ``long_caption``;
    CSV/TSV/JSONL/Parquet).

    ``path`` is the table or the directory holding it. Relative image paths follow the rule every command uses
    (``cliplab.data.tables.image_root_for``): ``image_root`` when given, else the table's folder, or the
    ``images/`` folder beside it when the paths are there. Rows that do not decode (``encoding``) or lack an image
    or a caption are left out with one warning that names the first few by file and line.
    """

    def __init__(self, preprocessor, path: str, csv_name: str = "captions.csv", image_column: str = "image",
                 caption_column: str = "caption", long_column: str = "long_caption", image_root: str | None = None,
                 encoding: str = "utf-8"):
        from ..data.tables import image_root_for, read_table_rows

        self.preprocessor = preprocessor
        p = Path(path)
        csv_path = p / csv_name if p.is_dir() else p
        if not csv_path.is_file():
            raise FileNotFoundError(f"no captions file at {csv_path}")
        table = read_table_rows(csv_path, encoding)
        cols = table.columns
        for c in (image_column, caption_column):
            if c not in cols:
                raise ValueError(f"{csv_path}: missing column {c!r} (columns: {cols})")
        rows, bad = [], []
        for row, line, error in zip(table.rows, table.lines, table.errors):
            if error is None and not (row.get(image_column) and row.get(caption_column)):
                error = f"{csv_path.name}:{line}: no {image_column if not row.get(image_column) else caption_column}"
            (bad if error else rows).append(error or row)
        if bad:
            warnings.warn(f"{len(bad)} row(s) of {csv_path} left out of training: {'; '.join(bad[:3])}"
                          + (" ..." if len(bad) > 3 else ""), stacklevel=2)
        if not rows:
            raise ValueError(f"{csv_path}: no usable rows")
        self.root, note = image_root_for(csv_path, [r[image_column] for r in rows], image_root)
        if note:
            warnings.warn(note, stacklevel=2)
        self.images = [r[image_column] for r in rows]
        self.short = [r[caption_column] for r in rows]
        self.long = [r.get(long_column) or None for r in rows] if long_column in cols else [None] * len(rows)
        self.size = len(rows)

    def pixels(self, indices: Sequence[int]) -> torch.Tensor:
        return self.preprocessor.batch([os.path.join(self.root, self.images[i]) for i in indices])

    def captions(self, indices: Sequence[int]) -> tuple[list[str], list[str | None]]:
        return [self.short[i] for i in indices], [self.long[i] for i in indices]


class TrainBatches(torch.utils.data.Dataset):
    """``dataset[step]`` is the whole :class:`Batch` of that step (for a ``DataLoader`` with ``batch_size=None``).

    ``caption``: ``"short"``, ``"long"`` or ``"mix"`` (long with probability ``long_prob``; a row without a long
    caption falls back to its short one). Long captions are truncated to the context length by the tokenizer, as
    intended; its warning is silenced here and the cut rows are counted in ``Batch.truncated`` instead.
    """

    def __init__(self, source: DataSource, sampler, tokenizer: CLIPTokenizer, steps: int, caption: str = "short",
                 long_prob: float = 0.5, seed: int = 0):
        if caption not in CAPTION_MODES:
            raise ValueError(f"caption must be one of {list(CAPTION_MODES)}, got {caption!r}")
        if not 0.0 <= long_prob <= 1.0:
            raise ValueError(f"long_prob must be in [0, 1], got {long_prob}")
        self.source, self.sampler, self.tokenizer = source, sampler, tokenizer
        self.steps, self.caption, self.long_prob, self.seed = int(steps), caption, float(long_prob), int(seed)

    def __len__(self) -> int:
        return self.steps

    def choose_long(self, step: int, n: int) -> np.ndarray:
        if self.caption == "short":
            return np.zeros(n, dtype=bool)
        if self.caption == "long":
            return np.ones(n, dtype=bool)
        return np.random.default_rng([self.seed, CAPTION_STREAM, int(step)]).random(n) < self.long_prob

    def __getitem__(self, step: int) -> Batch:
        indices = [int(i) for i in self.sampler.batch(int(step))]
        pixels = self.source.pixels(indices)
        short, long = self.source.captions(indices)
        want_long = self.choose_long(step, len(indices))
        is_long = [bool(w) and lc is not None for w, lc in zip(want_long, long)]
        texts = [lc if use else sc for use, sc, lc in zip(is_long, short, long)]
        extras: dict[str, Any] = {}
        tags = self.source.tag_texts(indices)
        if tags is not None:
            extras["tag_texts"] = tags
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TruncationWarning)
            tokens = self.tokenizer(texts)
            negatives = self.source.negative_captions(indices)
            if negatives is not None:
                extras.update(self._negatives(negatives, is_long, tokens.ids))
        return Batch(step=int(step), indices=indices, pixels=pixels, ids=tokens.ids, texts=texts,
                     is_long=torch.tensor(is_long, dtype=torch.bool), truncated=tokens.truncated, extras=extras)

    def _negatives(self, negatives, is_long: list[bool], caption_ids: torch.Tensor) -> dict[str, Any]:
        """Batch extras for the negatives of the caption each row uses (a long caption's negatives are long too).
        Compared as the tokens the model sees: a negative that equals any caption of the batch once cut at the
        context length (long captions name colours in their last sentence, past token 77) or an earlier negative of
        its row is dropped, so no image is asked to reject a text identical to a positive."""
        chosen = [nl if use else ns for use, ns, nl in zip(is_long, *negatives)]
        texts = [t for negs in chosen for t in negs]
        rows = [i for i, negs in enumerate(chosen) for _ in negs]
        ids = self.tokenizer(texts).ids if texts else caption_ids.new_zeros((0, caption_ids.shape[1]))
        positives = {tuple(c.tolist()) for c in caption_ids}
        kept: set[tuple[int, tuple[int, ...]]] = set()
        keep = []
        for k, row in enumerate(rows):
            negative = tuple(ids[k].tolist())
            if negative not in positives and (row, negative) not in kept:
                kept.add((row, negative))
                keep.append(k)
        return {"negative_texts": [texts[k] for k in keep],
                "negative_rows": torch.tensor([rows[k] for k in keep], dtype=torch.long),
                "negative_ids": ids[keep]}


def _identity(x):
    return x


def make_loader(batches: TrainBatches, start_step: int, num_workers: int = 0, prefetch: int = 2):
    """Iterate the batches of steps ``start_step .. len(batches)-1`` in order."""
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        # workers start from a fork server, not by forking this process: by then it runs the threads of OpenMP,
        # OpenVINO or faiss, and a fork of a threaded process can crash or hang (Python 3.14's default on Linux)
        kwargs = {"prefetch_factor": prefetch, "persistent_workers": False, "multiprocessing_context": "forkserver"}
    return torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(start_step, len(batches)),
                                       num_workers=num_workers, collate_fn=_identity, **kwargs)
