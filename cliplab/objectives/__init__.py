"""Training objectives of the seed papers: losses registered with :func:`cliplab.train.register_loss`.

One module per paper; each registers its losses (and itself with :func:`cliplab.methods.register_method`) on import.
The trainer finds them by name without importing this package first (the loss registry imports it on a miss)::

    cliplab train --preset tiny-smoke --set loss=clip+stc --set 'loss_kwargs.tags=["circle","red"]'

Modules: ``hqclip`` (HQ-CLIP's hard-negative identification and short-tag classification next to the contrastive loss).
``aclip`` (A-CLIP's attentive patch removal with an EMA encoder, SimCLR and BYOL; loss ``aclip``, preset
``aclip-tiny``), ``ga_dms`` (GA-DMS's gradient-attention dual masking with SDM and token prediction; loss ``ga_dms``,
source ``synthetic-noisy``, preset ``ga_dms-tiny``), ``unime`` (UniME's textual distillation from all-MiniLM-L6-v2 and
filtered top-k hard negatives; losses ``unime-kd``, ``unime``, preset ``unime-tiny``), ``lightclip`` (LightCLIP's
softened labels, relaxed bipartite word-patch alignment and image-fused MLM; loss ``lightclip``, preset
``lightclip-tiny``; the matching is shared in :mod:`cliplab.train.matching`), ``mcip`` (MCIP's ArcMargin and
multi-caption ArcMargin fine-tuning and 2SFT; losses ``mcip``, ``arcmargin``, source ``mcip-views``, presets
``mcip-tiny``, ``mcip-2sft-tiny``, ``mcip-realign-tiny``), ``dclip`` (DCLIP's region-aware cross-modal teacher
and hybrid InfoNCE + cosine distillation; ``cliplab dclip distill`` rather than a preset: its teacher needs each
scene's object boxes, which the trainer's batches do not carry), ``un2clip`` (un²CLIP: the image tower tuned by
inverting a frozen unCLIP generator, :mod:`cliplab.generation.unclip`; ``cliplab un2clip train``).
"""

__all__: list[str] = []
