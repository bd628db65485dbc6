"""The ``cliplab`` command line: a thin shell over the public API.

Every module in this package (except ``app``) registers its commands on :data:`main` when imported; they are all
imported here, so adding a command is adding a module. Command modules import heavy dependencies inside the
commands, keeping ``cliplab --help`` fast.
"""

from __future__ import annotations

import importlib
import pkgutil

from .app import main

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "app":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["main"]
