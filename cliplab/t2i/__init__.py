"""Text-to-image conditioning methods: modules that edit, learn or resample the per-token text conditioning a
generator reads, trained and judged against :mod:`cliplab.generation`'s small generator (or any
:class:`~cliplab.generation.ConditionalGenerator`).

One module per paper (import the one you need; nothing is imported here, so adding a method never touches this
file):

* :mod:`cliplab.t2i.wiclp`: CLP / WiCLP projections of the token states, trained with the frozen generator's
  denoising loss, and Switch-Off sampling (Zarei et al.).
* :mod:`cliplab.t2i.core`: CoRe's context-regularised new concept token (S*, :mod:`cliplab.tokens.new_token`).
* :mod:`cliplab.t2i.ella`: ELLA's Timestep-aware Semantic Connector (MiniLM tokens -> the frozen generator) and the
  pooled control.
"""
