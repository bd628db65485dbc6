"""Fewer vision tokens: a reducer interface run inside the ViT, index maps from reduced tokens back to patches, ToMe's
bipartite merging as the shared baseline, and FLOP accounting of a reduced forward (see docs/vision_tokens.md)."""

from .flops import reduced_image_flops
from .forward import encode_image_reduced
from .reducer import IndexMap, KeepTopK, TokenReducer, keep_assignment, merge_tokens
from .tome import ToMe, bipartite_assignment, matching_flops

__all__ = ["IndexMap", "KeepTopK", "ToMe", "TokenReducer", "bipartite_assignment", "encode_image_reduced",
           "keep_assignment", "matching_flops", "merge_tokens", "reduced_image_flops"]
