"""Registry of the seed papers' methods: each method module registers itself with :func:`register_method`.

``cliplab.methods.list_methods()`` imports the capability packages (so their modules register) and lists what is
implemented; ``cliplab methods`` prints it. Every seed paper, implemented or not, is in
:mod:`cliplab.methods_catalog` (``cliplab methods --all``); a slug registered here must be one of its slugs.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

# Capability packages whose modules hold paper methods (one file per paper).
CAPABILITIES = ("text_edit", "longtext", "metrics", "zeroshot", "dense", "vision_tokens", "objectives", "curation",
                "textrep", "apps", "generation", "cir", "scenetext", "captioning", "enhance", "t2i")


@dataclass(frozen=True)
class MethodInfo:
    slug: str          # the paper's slug in the method notes, e.g. "long_clip"
    title: str         # the paper's title
    module: str        # where the implementation lives
    summary: str       # one line: what the module does
    doc: str = ""      # docs page


_METHODS: dict[str, MethodInfo] = {}


def register_method(slug: str, title: str, summary: str, doc: str = ""):
    """Module-level call ``register_method(...)(__name__)`` or decorator on any object of the module."""

    def register(obj):
        module = obj if isinstance(obj, str) else obj.__module__
        if slug in _METHODS and _METHODS[slug].module != module:
            raise ValueError(f"method {slug!r} registered twice ({_METHODS[slug].module} and {module})")
        _METHODS[slug] = MethodInfo(slug, title, module, summary, doc)
        return obj

    return register


def import_capability(cap: str) -> None:
    """Import every module of capability package ``cliplab.<cap>`` (so its methods, losses, ... register)."""
    try:
        pkg = importlib.import_module(f"cliplab.{cap}")
    except ModuleNotFoundError as e:
        if e.name == f"cliplab.{cap}":
            return  # capability not built yet
        raise
    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")


def _import_capabilities() -> None:
    for cap in CAPABILITIES:
        import_capability(cap)


def list_methods(pattern: str = "*") -> list[MethodInfo]:
    import fnmatch

    _import_capabilities()
    return [m for s, m in sorted(_METHODS.items()) if fnmatch.fnmatch(s, pattern)]


def get_method(slug: str) -> MethodInfo:
    _import_capabilities()
    if slug not in _METHODS:
        raise KeyError(f"unknown method {slug!r}; implemented: {sorted(_METHODS)}")
    return _METHODS[slug]
