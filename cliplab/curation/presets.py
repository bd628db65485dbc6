"""Training presets that consume curated pairs tables (``cliplab train --preset NAME --set data.options.path=T``).

* ``laclip-tiny``: ``tiny-smoke``'s model and recipe on a LaCLIP table (``cliplab curate laclip``): each visit draws
  the original caption or one of its rewrites uniformly (source and sampler ``caption-versions``).
* ``veclip-tiny``: the same on a VeCLIP table (``cliplab curate veclip``): VeC-mixing of ``caption`` (alt-text) and
  ``vec_caption``.
* A MetaCLIP table is a plain pairs table: ``cliplab train --preset tiny-smoke --data curated.parquet``.
"""

from __future__ import annotations

from ..train import DataConfig, get_preset, register_preset

__all__ = ["versions_config"]


def versions_config(columns, path: str | None = None, out_dir: str = "runs/curated"):
    """``tiny-smoke`` on the ``caption-versions`` source with these caption ``columns``."""
    options = {"columns": list(columns)}
    if path is not None:
        options["path"] = path
    return get_preset("tiny-smoke").replace(data=DataConfig(source="caption-versions", caption="short",
                                                            options=options),
                                            sampler="caption-versions", out_dir=out_dir)


@register_preset("laclip-tiny")
def laclip_tiny():
    return versions_config(["caption", "rewrites"], out_dir="runs/laclip-tiny")


@register_preset("veclip-tiny")
def veclip_tiny():
    return versions_config(["caption", "vec_caption"], out_dir="runs/veclip-tiny")
