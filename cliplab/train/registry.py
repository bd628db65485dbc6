"""A tiny name -> factory registry shared by losses, samplers, data sources and presets."""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A name that is not registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """``discover``, when given, is called once before the first lookup of a missing name or listing, so plug-ins
    living in packages above this layer (``cliplab.objectives``' losses) register themselves without an import here."""

    def __init__(self, kind: str, discover: Callable[[], None] | None = None):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._discover = discover
        self._discovering = False

    def _discover_once(self) -> None:
        # Cleared only after success: an import error surfaces again on the next lookup instead of hiding behind
        # "unknown name". The flag guards against re-entry (the discovered modules register into this registry).
        if self._discover is not None and not self._discovering:
            self._discovering = True
            try:
                self._discover()
                self._discover = None
            finally:
                self._discovering = False

    def register(self, name: str, overwrite: bool = False) -> Callable[[T], T]:
        """Decorator: ``@registry.register("name")`` on a class or factory function."""

        def deco(obj: T) -> T:
            if name in self._items and not overwrite and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered (pass overwrite=True to replace it)")
            self._items[name] = obj
            return obj

        return deco

    def names(self) -> list[str]:
        self._discover_once()
        return sorted(self._items)

    def get(self, name: str) -> T:
        if name not in self._items:
            self._discover_once()
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {self.names()}") from None

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def __contains__(self, name: str) -> bool:
        if name not in self._items:
            self._discover_once()
        return name in self._items


#: capability packages (above this layer) whose modules register losses, samplers, data sources and presets
TRAINING_PLUGINS = ("objectives", "curation", "longtext")


def import_training_plugins() -> None:
    """Import the seed-paper packages that plug into training, so their names resolve (``discover=`` of the
    loss, sampler, data-source and preset registries)."""
    from ..methods import import_capability  # imported late: the methods registry imports the layers above

    for cap in TRAINING_PLUGINS:
        import_capability(cap)
