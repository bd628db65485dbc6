"""The shipped generator and judge (``cliplab/generation/pretrained/<name>/``), trained by
``experiments/train_generator.py``."""

from __future__ import annotations

from pathlib import Path

from .generator import DiffusionGenerator
from .judge import SceneJudge

__all__ = ["shipped_generator_dir", "load_generator", "load_judge"]

_ROOT = Path(__file__).parent / "pretrained"


def shipped_generator_dir(name: str = "scenes-32") -> Path:
    d = _ROOT / name
    if not (d / "generator.json").is_file():
        known = sorted(p.name for p in _ROOT.glob("*") if (p / "generator.json").is_file()) if _ROOT.is_dir() else []
        raise FileNotFoundError(f"no shipped generator {name!r}; shipped: {known or 'none'}")
    return d


def load_generator(name_or_dir: str | Path = "scenes-32") -> DiffusionGenerator:
    """A saved generator by shipped name or directory, in eval mode."""
    p = Path(name_or_dir)
    d = p if (p / "generator.json").is_file() else shipped_generator_dir(str(name_or_dir))
    return DiffusionGenerator.load(d).eval()


def load_judge(name_or_dir: str | Path = "scenes-32") -> SceneJudge:
    """The judge saved beside a generator (``judge.json``)."""
    p = Path(name_or_dir)
    for d in (p, _ROOT / str(name_or_dir)):
        if (d / "judge.json").is_file():
            return SceneJudge.load(d)
    raise FileNotFoundError(f"no judge at {name_or_dir!r} (neither a directory with judge.json nor a shipped name)")
