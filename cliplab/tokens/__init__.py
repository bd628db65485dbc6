"""Token-level access and interventions on both towers (sits on ``cliplab.models`` only).

* reading: ``model.encode_text(batch, output=True)`` / ``model.encode_image(pixels, output=True)`` give a
  :class:`~cliplab.models.hooks.TowerOutput` (pooled, per-token outputs, hidden states, attention maps);
* input embeddings: ``model.encode_text(inputs_embeds=..., eot_index=...)``; ``encode_image(keep=..., prompts=...)``;
* interventions: :class:`Intervention` at named sites, composed in an :class:`InterventionSet`, made active with
  :func:`intervene`;
* readout helpers: :func:`as_batch` (texts -> a model's batch), :func:`token_mask`, :func:`word_scores`, :func:`patch_text_similarity`; plots in ``plots``;
* conditioning spaces (where text-to-image models read the text tower, see :mod:`cliplab.tokens.sites`):
  ``"joint"`` (``text.tokens``), ``"final"`` (``text.final``, SD 1.x), ``"penultimate"`` (``text.penultimate``,
  SDXL); :func:`space_site`, :func:`space_output`, :func:`space_tokens` map a space's name to its site, its
  ``output=`` name and its sequence.
"""

from ..models.hooks import Hooks, TowerOutput
from .interventions import Intervention, InterventionSet, as_hooks, intervene
from .readout import as_batch, patch_text_similarity, space_output, space_tokens, token_mask, word_scores, word_spans
from .sites import CONDITIONING_SPACES, Site, SiteError, parse_site, space_site

__all__ = [
    "Hooks", "TowerOutput", "Intervention", "InterventionSet", "as_hooks", "intervene", "patch_text_similarity",
    "as_batch", "token_mask", "word_scores", "word_spans", "Site", "SiteError", "parse_site",
    "CONDITIONING_SPACES", "space_site", "space_output", "space_tokens",
]
