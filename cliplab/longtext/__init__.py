"""Long text and external text towers: methods that let CLIP read past its 77-token context.

One module per paper; each registers itself with :func:`cliplab.methods.register_method`. The package imports none
of its modules eagerly (other modules are added concurrently); import what you use::

    from cliplab.longtext.long_clip import to_long_clip, stretch_positions, pca_coarse

Modules: ``long_clip`` (Long-CLIP: knowledge-preserved stretching of the positional table, frozen first rows,
primary component matching), ``llm2clip`` (LLM2CLIP: caption-contrastive
tuning of an LLM's last blocks, then the LLM tower aligned to the image tower), ``proclip`` (ProCLIP: CLIP's text
embeddings distilled into the LLM tower, then contrastive tuning with image self-distillation). Both build on
:mod:`cliplab.text.llm_tower` (a CLIP whose text tower is a frozen LLM embedder plus a trainable adapter,
``LLMTextCLIP``, saved as safetensors + JSON, usable wherever a model is: ``-m DIR``).
"""

__all__: list[str] = []
