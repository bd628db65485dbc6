"""The ``cliplab`` command line: a thin shell over the public API. Each command group lives in its own module and
registers itself on :data:`main`."""

from __future__ import annotations

from .app import main
from . import models  # noqa: F401  (registers its commands)

__all__ = ["main"]
