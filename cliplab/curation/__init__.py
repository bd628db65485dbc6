"""Training-data curation (seed papers MetaCLIP, LaCLIP, VeCLIP): better CLIP data instead of a better model.

* :mod:`.metaclip`: metadata matching (Aho-Corasick), inverted index and balancing with a per-entry cap.
* :mod:`.laclip`: LLM (or rule-based) rewrites of each caption; training draws one version per visit.
* :mod:`.veclip`: visual captions fused with the alt-text into VeCs; VeC-mixing in training.

Shared parts: :mod:`.matcher` (substring matcher, inverted index, metadata from a pool), :mod:`.rewriters`
(``Rewriter`` protocol, rule-based rewriter, LM access), :mod:`.captioners` (``Captioner`` protocol),
:mod:`.multicaption` (the ``caption-versions`` training source and sampler), :mod:`.pairs_io` (pairs tables and the
resumable row job of ``cliplab curate``), :mod:`.pools` and :mod:`.evaluation` (synthetic pools, tiny training
runs and zero-shot scores for the effect checks), :mod:`.presets` (``laclip-tiny``, ``veclip-tiny``).
"""

from . import multicaption, presets  # noqa: F401  (register the training source, sampler and presets)
from .captioners import Captioner, ColumnCaptioner, SceneGraphCaptioner
from .laclip import LLMRewriter, build_prompt, parse_rewrite, rewrite_captions
from .matcher import SubstringMatcher, build_metadata, spacing
from .metaclip import MetaCLIPCuration, balance, curate, entry_probabilities
from .multicaption import CaptionVersions, VersionSampler
from .pairs_io import read_pairs, run_rows, write_pairs
from .rewriters import IdentityRewriter, Rewriter, RuleRewriter
from .veclip import ConceptFuser, Fuser, IdentityFuser, LLMFuser, enrich

__all__ = ["Captioner", "ColumnCaptioner", "SceneGraphCaptioner", "LLMRewriter", "build_prompt", "parse_rewrite",
           "rewrite_captions", "SubstringMatcher", "build_metadata", "spacing", "MetaCLIPCuration", "balance",
           "curate", "entry_probabilities", "CaptionVersions", "VersionSampler", "read_pairs", "run_rows",
           "write_pairs", "IdentityRewriter", "Rewriter", "RuleRewriter", "ConceptFuser", "Fuser", "IdentityFuser",
           "LLMFuser", "enrich"]
