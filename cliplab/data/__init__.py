"""Data sources for cliplab (bottom layer: imports nothing else from cliplab).

:mod:`cliplab.data.synthetic`, the synthetic scene world used to train and probe small CLIP models without
external data; :mod:`cliplab.data.tables`, reading tables of image paths and captions the same way for every command
(bad rows as data, one rule for relative image paths).
"""

from . import synthetic
from .synthetic import *  # noqa: F401,F403
from .synthetic import __all__ as _synthetic_all

__all__ = ["synthetic", *_synthetic_all]
