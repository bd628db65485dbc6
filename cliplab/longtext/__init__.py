"""Long text and external text towers: methods that let CLIP read past its 77-token context.

One module per paper; each registers itself with :func:`cliplab.methods.register_method`. The package imports none
of its modules eagerly (other modules are added concurrently); import what you use::

    from cliplab.longtext.long_clip import to_long_clip, stretch_positions, pca_coarse

Modules: ``long_clip`` (Long-CLIP: knowledge-preserved stretching of the positional table, frozen first rows,
primary component matching).
"""

__all__: list[str] = []
