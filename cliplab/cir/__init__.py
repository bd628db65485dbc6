"""Composed image retrieval (reference image + modification text -> target image).

* :mod:`.benchmark`: the synthetic CIR benchmark (``synthetic-cir``), text triplets for training, R@k, and the
  ``cir`` evaluation task (``cliplab eval cir``);
* :mod:`.phi`: a LinCIR-style projection phi (joint-space embedding -> pseudo-word ``$``), trained text-only;
* :mod:`.rtd`: RTD, target-anchored text contrastive tuning of the text tower (method ``rtd``).
"""

from .benchmark import (CIRData, TextTriplet, cir_recall, cir_task, cir_text_triplets, evaluate_cir,
                        modification_text, synthetic_cir)
from .phi import (DEFAULT_TEMPLATE, PLACEHOLDER, Phi, composed_queries, encode_with_pseudo_words, keyword_runs,
                  mask_keywords, train_phi)
from .rtd import RTDResult, nt_xent, rtd_loss, train_rtd, tunable_copy

__all__ = ["CIRData", "TextTriplet", "cir_recall", "cir_task", "cir_text_triplets", "evaluate_cir",
           "modification_text", "synthetic_cir", "DEFAULT_TEMPLATE", "PLACEHOLDER", "Phi", "composed_queries",
           "encode_with_pseudo_words", "keyword_runs", "mask_keywords", "train_phi", "RTDResult", "nt_xent",
           "rtd_loss", "train_rtd", "tunable_copy"]
