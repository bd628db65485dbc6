"""Training objectives of the seed papers: losses registered with :func:`cliplab.train.register_loss`.

One module per paper; each registers its losses (and itself with :func:`cliplab.methods.register_method`) on import.
The trainer finds them by name without importing this package first (the loss registry imports it on a miss)::

    cliplab train --preset tiny-smoke --set loss=clip+stc --set 'loss_kwargs.tags=["circle","red"]'

Modules: ``hqclip`` (HQ-CLIP's hard-negative identification and short-tag classification next to the contrastive loss).
"""

__all__: list[str] = []
