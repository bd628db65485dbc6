"""Runner presets: ``cliplab train --preset NAME`` for methods that train with their own loop, not a TrainConfig.

A :class:`Runner` is a preset whose run is a method's own training function. It carries that function, the
preset's options with their values (every keyword the function accepts), and which ``cliplab train`` flags it
honours and which option each sets (``-o/--out`` -> ``out``, ``--steps`` -> ``steps``, ``--init-from`` ->
``model``, ...). ``--set key=value`` overrides any option; a key the preset does not have, or a flag it does not
honour, is a one-line ``ValueError`` *before* anything trains.

    from cliplab.train.runners import register_runner, get_runner

    @register_runner("my-method", "what it trains, on what, how long", defaults={"out": "runs/my-method",
                     "steps": 100, "lr": 1e-3}, flags={"out": "out", "steps": "steps"})
    def run_my_method(*, out, steps, lr) -> dict: ...   # trains, saves to out, returns a JSON-able summary

    runner = get_runner("my-method")
    runner.options({"lr": 3e-4}, steps=10)   # {"out": "runs/my-method", "steps": 10, "lr": 0.0003}
    summary = runner({"lr": 3e-4}, steps=10)  # runs it

Runners are discovered like the other training plug-ins (:func:`~cliplab.train.registry.import_training_plugins`):
a method package registers its runners when it is imported. ``cliplab train --list-presets`` lists them with the
TrainConfig presets (:func:`runner_summaries`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .registry import Registry, import_training_plugins

__all__ = ["Runner", "RUNNERS", "register_runner", "get_runner", "list_runners", "is_runner", "runner_summaries",
           "FLAG_NAMES"]

#: the ``cliplab train`` flags a runner may honour, by the keyword the command passes them as
FLAG_NAMES = {"out": "--out", "steps": "--steps", "init_from": "--init-from", "data": "--data",
              "progress": "--progress"}


@dataclass(frozen=True)
class Runner:
    """A preset run by ``run(**options)``. ``defaults``: every option ``run`` takes, with the preset's values;
    ``flags``: ``{flag keyword: option}`` for the ``cliplab train`` flags it honours (keywords of
    :data:`FLAG_NAMES`); ``render``: the one-line summary the command prints; ``doc``: where to read more."""

    name: str
    summary: str
    run: Callable[..., dict]
    defaults: Mapping[str, Any]
    flags: Mapping[str, str] = field(default_factory=dict)
    render: Callable[[dict], str] | None = None
    doc: str = ""

    def __post_init__(self):
        bad = sorted(set(self.flags) - set(FLAG_NAMES))
        if bad:
            raise ValueError(f"runner {self.name!r}: unknown flags {bad}; choose from {sorted(FLAG_NAMES)}")
        missing = sorted(set(self.flags.values()) - set(self.defaults))
        if missing:
            raise ValueError(f"runner {self.name!r}: flags set options {missing} that are not in its defaults")

    def options(self, settings: Mapping[str, Any] | None = None, **flags: Any) -> dict[str, Any]:
        """The run's keywords: the defaults, then ``settings`` (``--set``), then the flags given (not None) --
        the same order as a TrainConfig preset's overrides, so an explicit flag wins over ``--set``."""
        settings = dict(settings or {})
        unknown = sorted(set(settings) - set(self.defaults))
        if unknown:
            raise ValueError(f"preset {self.name!r} has no option {', '.join(map(repr, unknown))}; its options "
                             f"(--set KEY=VALUE): {', '.join(sorted(self.defaults))}")
        given = {k: v for k, v in flags.items() if v is not None}
        for key in given:
            if key not in FLAG_NAMES:
                raise TypeError(f"Runner.options() got an unexpected flag {key!r}; flags: {sorted(FLAG_NAMES)}")
        refused = [FLAG_NAMES[k] for k in given if k not in self.flags]
        if refused:
            hint = f"; see {self.doc}" if self.doc else ""
            if "steps" in given and "steps" not in self.flags:  # e.g. a two-stage run: name the stage's steps
                hint += f"; set steps with --set {'=N / '.join(k for k in self.defaults if 'steps' in k)}=N"
            raise ValueError(f"{', '.join(refused)} do(es) not apply to preset {self.name!r} (its options: "
                             f"{', '.join(sorted(self.defaults))}){hint}")
        return {**self.defaults, **settings, **{self.flags[k]: v for k, v in given.items()}}

    def __call__(self, settings: Mapping[str, Any] | None = None, **flags: Any) -> dict:
        """Resolve the options and run; returns the run's summary."""
        return self.run(**self.options(settings, **flags))

    def line(self, summary: dict) -> str:
        """What ``cliplab train`` prints for the run's summary."""
        return self.render(summary) if self.render is not None else str(summary)


RUNNERS: Registry[Runner] = Registry("runner preset", discover=import_training_plugins)


def register_runner(name: str, summary: str, *, defaults: Mapping[str, Any], flags: Mapping[str, str] | None = None,
                    render: Callable[[dict], str] | None = None, doc: str = "", overwrite: bool = False):
    """Decorator on a run function: register it as preset ``name`` (see the module docstring). The function is
    returned unchanged."""

    def deco(run: Callable[..., dict]) -> Callable[..., dict]:
        RUNNERS.register(name, overwrite=overwrite)(Runner(name, summary, run, dict(defaults), dict(flags or {}),
                                                           render, doc))
        return run

    return deco


def get_runner(name: str) -> Runner:
    return RUNNERS.get(name)


def list_runners() -> list[str]:
    return RUNNERS.names()


def is_runner(name: str | None) -> bool:
    return name is not None and name in RUNNERS


def runner_summaries() -> dict[str, str]:
    """``{name: summary}`` of every runner preset (what ``cliplab train --list-presets`` adds)."""
    return {name: RUNNERS.get(name).summary for name in RUNNERS.names()}
