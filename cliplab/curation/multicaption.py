"""Training on several versions of each caption, one drawn uniformly every time an image is seen (LaCLIP's
``random.choice([orig, r1, ..., r4])``, VeCLIP's mixing of AltText and VeC), for ``cliplab.train``.

* Source ``caption-versions``: a pairs table (CSV/TSV/JSONL/Parquet) with an image column and ``columns`` whose
  values are the versions of a row's caption: a text, or a list of texts (Parquet list, or a JSON array in a CSV
  cell); empty values are skipped. Rows without an image or any version are left out with a warning.
* Sampler ``caption-versions``: the ``random`` sampler's images (the same per-epoch permutations, so a run over the
  same table with one version per row sees exactly the batches of the ``folder`` source), plus a *ticket*
  ``r`` in ``1..TICKETS`` per row drawn from ``default_rng([seed, VERSION_STREAM, step])``, passed inside the index
  (``index = image + size * r``). The source takes version ``(r - 1) mod n`` of a row with ``n`` versions; ``TICKETS``
  is a multiple of every ``n <= MAX_VERSIONS``, so the choice is exactly uniform. Every batch stays a pure function
  of its step, so resumed runs see the same captions.

Why a sampler: a source sees the indices of a batch, not its step, so a per-visit draw has to travel with the index.
"""

from __future__ import annotations

import json
import math
import warnings
from functools import reduce
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..train import DataSource, RandomSampler, register_sampler, register_source

__all__ = ["CaptionVersions", "VersionSampler", "MAX_VERSIONS", "TICKETS", "VERSION_STREAM", "version_of",
           "row_versions"]

MAX_VERSIONS = 10
TICKETS = reduce(lambda a, b: a * b // math.gcd(a, b), range(1, MAX_VERSIONS + 1))  # lcm(1..10) = 2520
VERSION_STREAM = 0x1AC


def version_of(ticket: int, n_versions: int) -> int:
    """Which of ``n_versions`` a ticket in ``1..TICKETS`` selects."""
    return (int(ticket) - 1) % n_versions


def row_versions(row: dict[str, Any], columns: Sequence[str]) -> list[str]:
    """The non-empty caption versions of a row, in column order (list values expanded, JSON arrays decoded)."""
    out: list[str] = []
    for c in columns:
        v = row.get(c)
        if isinstance(v, str) and v.lstrip().startswith("["):
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                pass
        for text in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(text, str) and text.strip():
                out.append(text)
    return out


@register_sampler("caption-versions")
class VersionSampler(RandomSampler):
    """The ``random`` sampler's images with a version ticket per row (module docstring)."""

    def batch(self, step: int) -> list[int]:
        if self.size is None:
            raise ValueError("the caption-versions sampler needs a finite source")
        images = super().batch(step)
        tickets = np.random.default_rng([self.seed, VERSION_STREAM, int(step)]).integers(1, TICKETS + 1,
                                                                                         size=len(images))
        return [i + self.size * int(r) for i, r in zip(images, tickets)]


@register_source("caption-versions")
class CaptionVersions(DataSource):
    """Images of a pairs table with several caption versions each (module docstring). ``path``: the table;
    ``columns``: the version columns (default ``["caption", "rewrites"]``: LaCLIP's output; VeCLIP's mixing uses
    ``["caption", "vec_caption"]``); ``image_root``: base of relative image paths (the rule of every command,
    ``cliplab.data.tables.image_root_for``). Needs ``sampler="caption-versions"``."""

    def __init__(self, preprocessor, path: str | None = None, columns: Sequence[str] = ("caption", "rewrites"),
                 image_column: str = "image", image_root: str | None = None, encoding: str = "utf-8"):
        import os

        from ..data.tables import image_root_for, read_table_rows

        self.preprocessor = preprocessor
        if path is None:
            raise ValueError("the caption-versions source needs a pairs table: set data.options.path (--set "
                             "data.options.path=curated.parquet)")
        table_path = Path(path)
        if not table_path.is_file():
            raise FileNotFoundError(f"no pairs table at {table_path}")
        table = read_table_rows(table_path, encoding)
        self.columns = list(columns)
        missing = [c for c in [image_column, *self.columns] if table.rows and c not in table.columns]
        if missing:
            raise ValueError(f"{table_path}: missing column(s) {missing} (columns: {table.columns})")
        images, versions, bad = [], [], []
        for row, line, error in zip(table.rows, table.lines, table.errors):
            texts = row_versions(row, self.columns) if error is None else []
            if error is None and not row.get(image_column):
                error = f"{table_path.name}:{line}: no {image_column}"
            elif error is None and not texts:
                error = f"{table_path.name}:{line}: no caption in {self.columns}"
            elif error is None and len(texts) > MAX_VERSIONS:
                error = f"{table_path.name}:{line}: {len(texts)} versions (at most {MAX_VERSIONS})"
            if error:
                bad.append(error)
            else:
                images.append(row[image_column])
                versions.append(texts)
        if bad:
            warnings.warn(f"{len(bad)} row(s) of {table_path} left out of training: {'; '.join(bad[:3])}"
                          + (" ..." if len(bad) > 3 else ""), stacklevel=2)
        if not images:
            raise ValueError(f"{table_path}: no usable rows")
        self.root, note = image_root_for(table_path, images, image_root)
        if note:
            warnings.warn(note, stacklevel=2)
        self.paths = [os.path.join(self.root, p) for p in images]
        self.versions = versions
        self.size = len(images)

    def _split(self, index: int) -> tuple[int, int]:
        image, ticket = index % self.size, index // self.size
        if ticket < 1:
            raise ValueError("the caption-versions source needs sampler='caption-versions' (its indices carry the "
                             "version draw); set sampler=\"caption-versions\" in the config")
        return image, ticket

    def pixels(self, indices: Sequence[int]) -> "Any":
        return self.preprocessor.batch([self.paths[self._split(i)[0]] for i in indices])

    def captions(self, indices: Sequence[int]) -> tuple[list[str], list[str | None]]:
        out = []
        for i in indices:
            image, ticket = self._split(i)
            texts = self.versions[image]
            out.append(texts[version_of(ticket, len(texts))])
        return out, [None] * len(out)
