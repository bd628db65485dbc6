"""Batch samplers as plug-ins: ``step -> dataset indices of that step's batch``.

A sampler is a pure function of ``(step, its constructor arguments)``, so a run resumed at step ``s`` sees exactly the
batches the uninterrupted run saw, and data-loader workers can build any batch independently. A sampler that must
carry state (say, a hard-negative miner fed by the model) stores it through ``state_dict`` / ``load_state_dict``;
the trainer saves that in every checkpoint.

Register a new one with::

    @register_sampler("my-sampler")
    class MySampler(BatchSampler):
        def batch(self, step: int) -> list[int]: ...

The sample stream is the sequence of positions ``p = step * batch_size + row``; ``random`` and ``sequential`` map
positions to indices, with epochs running across batch boundaries (no sample is dropped).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from typing import Any

import numpy as np

from .registry import Registry, import_training_plugins

__all__ = ["BatchSampler", "RandomSampler", "SequentialSampler", "register_sampler", "get_sampler", "list_samplers",
           "SAMPLERS"]

SAMPLERS: Registry[type] = Registry("sampler", discover=import_training_plugins)

#: block length of the shuffled order when the source is infinite
INFINITE_BLOCK = 1 << 16


def register_sampler(name: str, overwrite: bool = False):
    """Class decorator registering a :class:`BatchSampler` subclass under ``name``."""
    return SAMPLERS.register(name, overwrite=overwrite)


def list_samplers() -> list[str]:
    return SAMPLERS.names()


def get_sampler(name: str, size: int | None, batch_size: int, seed: int = 0, **kwargs: Any) -> "BatchSampler":
    """Sampler ``name`` over a source of ``size`` items (``None``: infinite)."""
    return SAMPLERS.build(name, size, batch_size, seed=seed, **kwargs)


class BatchSampler(ABC):
    def __init__(self, size: int | None, batch_size: int, seed: int = 0):
        if size is not None and size <= 0:
            raise ValueError(f"the data source is empty (size {size})")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.size = None if size is None else int(size)
        self.batch_size = int(batch_size)
        self.seed = int(seed)

    @abstractmethod
    def batch(self, step: int) -> list[int]:
        """The item indices of training step ``step``."""

    def epoch(self, step: int) -> float:
        """Fractional number of passes over the source completed before ``step``."""
        return 0.0 if self.size is None else step * self.batch_size / self.size

    #: True when consecutive positions get consecutive indices (groups of items stay together in a batch).
    keeps_order = False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def positions(self, step: int) -> range:
        return range(step * self.batch_size, (step + 1) * self.batch_size)


@register_sampler("sequential")
class SequentialSampler(BatchSampler):
    """Indices in order, wrapping around at the end of a finite source."""

    keeps_order = True

    def batch(self, step: int) -> list[int]:
        if self.size is None:
            return list(self.positions(step))
        return [p % self.size for p in self.positions(step)]


@register_sampler("random")
class RandomSampler(BatchSampler):
    """A fresh seeded permutation of the source every epoch (``numpy.random.default_rng([seed, epoch])``).

    For an infinite source, each block of ``block`` consecutive indices is permuted (the order within a block is
    random, blocks follow each other); every index is still visited exactly once.
    """

    def __init__(self, size: int | None, batch_size: int, seed: int = 0, block: int = INFINITE_BLOCK):
        super().__init__(size, batch_size, seed)
        self.block = int(block)
        self._cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int, n: int) -> np.ndarray:
        perm = self._cache.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            if len(self._cache) >= 2:  # a batch spans at most two epochs
                self._cache.pop(next(iter(self._cache)))
            self._cache[epoch] = perm
        return perm

    def batch(self, step: int) -> list[int]:
        n = self.size if self.size is not None else self.block
        out = []
        for p in self.positions(step):
            epoch, k = divmod(p, n)
            i = int(self._perm(epoch, n)[k])
            out.append(i if self.size is not None else epoch * n + i)
        return out
