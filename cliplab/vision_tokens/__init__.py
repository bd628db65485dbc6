"""Fewer vision tokens: a reducer interface run inside the ViT, index maps from reduced tokens back to patches, ToMe's
bipartite merging as the shared baseline, FLOP accounting of a reduced forward, and the seed methods built on them:
CenterCLIP (k-medoids clustering), TCC (token-correlation-guided compression) and Recoverable Compression (text-guided
keep, recovery and merging). See docs/vision_tokens.md.

The methods' convenience functions live in their modules (``cliplab.vision_tokens.tcc_compress.tcc_compress``, ...):
a package attribute of the same name would hide the module."""

from .centerclip import CenterCLIP, SparseSampling, encode_segments, encode_video_centerclip
from .flops import reduced_image_flops
from .forward import encode_image_reduced
from .recoverable_compression import RecoverableCompression, token_projector
from .registry import ReducedImageEncoder, Reduction, get_reducer, list_reducers, register_reducer
from .reducer import IndexMap, KeepTopK, TokenReducer, keep_assignment, merge_tokens
from .saliency import cls_attention, local_outlier_factor, text_patch_similarity
from .tcc_compress import TCCCompress
from .tome import ToMe, bipartite_assignment, matching_flops

__all__ = ["CenterCLIP", "IndexMap", "KeepTopK", "RecoverableCompression", "ReducedImageEncoder", "Reduction",
           "get_reducer", "list_reducers", "register_reducer", "SparseSampling", "TCCCompress", "ToMe",
           "TokenReducer", "bipartite_assignment", "cls_attention", "encode_image_reduced", "encode_segments",
           "encode_video_centerclip", "keep_assignment", "local_outlier_factor", "matching_flops", "merge_tokens",
           "reduced_image_flops", "text_patch_similarity",
           "token_projector"]
