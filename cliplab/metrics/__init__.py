"""Image-text alignment metrics and token-level misalignment.

* :mod:`.clip4dm`: CLIP4DM word-level misalignment (gradient x attention on the text encoder) and F-CLIPScore;
* :mod:`.clipscore`: CLIPScore / RefCLIPScore on a model, images and captions (formulas in ``cliplab.eval.metrics``);
* :mod:`.sce`: Dissecting CLIP's Schur Complement Entropy (what image embeddings hold beyond their captions) and the
  Schur-complement correction.
"""

from .clip4dm import (CLIPSCORE_W, EPSILON, TEMPLATE, Misalignment, TextAttribution, caption_word_scores,
                      detect_misalignment, f_clip_score, text_attribution)
from .clipscore import clip_score, encode_pairs, ref_clip_score
from .sce import correct, correction_map, schur_complement_entropy, sce_of_embeddings

__all__ = ["CLIPSCORE_W", "EPSILON", "TEMPLATE", "Misalignment", "TextAttribution", "caption_word_scores",
           "detect_misalignment", "f_clip_score", "text_attribution", "clip_score", "encode_pairs", "ref_clip_score",
           "schur_complement_entropy", "correction_map", "correct", "sce_of_embeddings"]
