"""Text models as a service: the :class:`TextEmbedder` interface (CLIP text towers, all-MiniLM-L6-v2, SmolLM2),
the pooling registry, and generation with decoder LMs.

    import cliplab.text as text
    emb = text.load_embedder("all-MiniLM-L6-v2")           # or "smollm2-135m", "shapes-tiny", a CLIP path
    vecs = emb.encode(["a man plays a guitar", "someone is playing guitar"], normalize=True)
    text.list_poolings()                                    # mean, first, last, max, weighted_mean, prompteol
    lm = text.load_lm("smollm2-135m"); lm.chat([{"role": "user", "content": "Hi!"}])

Sits on ``cliplab.models`` (and ``cliplab.tokens``); the CLI's ``cliplab eval sts`` and the methods use it.
"""

from .embedder import (CLIPTextEmbedder, DecoderEmbedder, EncoderEmbedder, SequenceEmbedder, TextEmbedder)
from .generation import CausalLM, Generation, render_chat
from .pooling import Pooling, get_pooling, list_poolings, register_pooling
from .registry import list_embedders, list_lms, load_embedder, load_lm, register_embedder, register_lm
from .saving import load_model_state, read_saved, register_embedder_kind, save_embedder

__all__ = [
    "TextEmbedder", "SequenceEmbedder", "EncoderEmbedder", "DecoderEmbedder", "CLIPTextEmbedder", "CausalLM",
    "Generation", "render_chat", "Pooling", "get_pooling", "list_poolings", "register_pooling", "list_embedders",
    "list_lms", "load_embedder", "load_lm", "register_embedder", "register_lm", "save_embedder",
    "register_embedder_kind", "read_saved", "load_model_state",
]
