"""Image-text alignment metrics and token-level misalignment.

* :mod:`.clip4dm`: CLIP4DM word-level misalignment (gradient x attention on the text encoder) and F-CLIPScore;
* :mod:`.clipscore`: CLIPScore / RefCLIPScore on a model, images and captions (formulas in ``cliplab.eval.metrics``).
"""

from .clip4dm import (CLIPSCORE_W, EPSILON, TEMPLATE, Misalignment, TextAttribution, caption_word_scores,
                      detect_misalignment, f_clip_score, text_attribution)
from .clipscore import clip_score, encode_pairs, ref_clip_score

__all__ = ["CLIPSCORE_W", "EPSILON", "TEMPLATE", "Misalignment", "TextAttribution", "caption_word_scores",
           "detect_misalignment", "f_clip_score", "text_attribution", "clip_score", "encode_pairs", "ref_clip_score"]
