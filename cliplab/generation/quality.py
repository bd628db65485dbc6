"""Judging a generator: sample held-out prompts of 1, 2 and 3 objects and score them with a :class:`SceneJudge`,
beside the judge's score on clean renders of the same prompts (the ceiling)."""

from __future__ import annotations

import torch

from .conditioning import TextConditioner
from .judge import SceneJudge
from .protocol import ConditionalGenerator
from .scenes import GenerationScenes, SceneSpec

__all__ = ["held_out_specs", "judge_generator"]


def held_out_specs(count: int, n: int, seed: int = 5000) -> tuple[list[SceneSpec], torch.Tensor]:
    """``n`` prompts of ``count`` objects from a world seed no training run uses, with clean renders ``[n,3,S,S]``."""
    scenes = GenerationScenes(seed=seed, counts=(count,), weights=None)
    images, specs = scenes.batch(range(n))
    return specs, images


@torch.no_grad()
def judge_generator(generator: ConditionalGenerator, conditioner: TextConditioner, judge: SceneJudge,
                    per_count: int = 48, counts: tuple[int, ...] = (1, 2, 3), steps: int = 25, seed: int = 0,
                    guidance: float | None = None, batch_size: int = 48) -> dict:
    """``{"1": {"binding", "colours", "shapes", "clean_binding"}, "2": ..., ...}`` for ``per_count`` prompts each."""
    out = {}
    for count in counts:
        specs, clean = held_out_specs(count, per_count)
        samples = []
        for i in range(0, per_count, batch_size):
            cond = conditioner([s.prompt for s in specs[i:i + batch_size]])
            kwargs = {} if guidance is None else {"guidance": guidance}
            samples.append(generator.sample(cond, steps=steps, seed=seed + i, **kwargs))
        scores = judge.score(torch.cat(samples), specs)
        scores["clean_binding"] = judge.score(clean, specs)["binding"]
        out[str(count)] = {k: round(v, 4) for k, v in scores.items()}
    return out
