"""Names for text embedders and language models.

``load_embedder(name)`` knows the real pretrained text models (``all-MiniLM-L6-v2``, ``smollm2-135m``) and any CLIP
model ``cliplab.load`` can read (a shipped name like ``shapes-tiny``, a directory, a weights file), whose text tower
becomes the embedder. ``register_embedder`` adds more.
"""

from __future__ import annotations

from typing import Callable

from .embedder import CLIPTextEmbedder, DecoderEmbedder, EncoderEmbedder, SequenceEmbedder
from .generation import CausalLM

_EMBEDDERS: dict[str, Callable[[], SequenceEmbedder]] = {}
_LMS: dict[str, Callable[[], CausalLM]] = {}


def _registrar(table: dict, kind: str, name: str, overwrite: bool):
    def register(factory):
        if name in table and not overwrite:
            raise ValueError(f"{kind} {name!r} is already registered (pass overwrite=True to replace it)")
        table[name] = factory
        return factory

    return register


def register_embedder(name: str, overwrite: bool = False):
    """Decorator on a zero-argument factory returning a :class:`~cliplab.text.TextEmbedder`."""
    return _registrar(_EMBEDDERS, "text embedder", name, overwrite)


def register_lm(name: str, overwrite: bool = False):
    """Decorator on a zero-argument factory returning a :class:`~cliplab.text.CausalLM`."""
    return _registrar(_LMS, "language model", name, overwrite)


def _lookup(table: dict, name: str):
    if name in table:
        return table[name]
    folded = {k.lower(): v for k, v in table.items()}
    return folded.get(name.lower())


def list_embedders(include_clip: bool = True) -> list[str]:
    """Registered embedder names, and (``include_clip``) the shipped CLIP models usable as text embedders."""
    names = sorted(_EMBEDDERS)
    if include_clip:
        from ..models import list_pretrained

        names += [n for n in list_pretrained() if n not in names]
    return names


def list_lms() -> list[str]:
    return sorted(_LMS)


def load_lm(name: str = "smollm2-135m") -> CausalLM:
    factory = _lookup(_LMS, name)
    if factory is None:
        raise KeyError(f"unknown language model {name!r}; known: {list_lms()}")
    return factory()


def load_embedder(name: str, precision: str = "fp32") -> SequenceEmbedder:
    """A text embedder by name (case-insensitive), a directory written by ``embedder.save(...)``, or the text tower
    of any CLIP checkpoint ``cliplab.load`` reads. ``precision="bf16"`` is the fast mode."""
    factory = _lookup(_EMBEDDERS, name)
    if factory is not None:
        return factory().set_precision(precision)
    from .saving import is_saved_embedder, load_saved

    if is_saved_embedder(name):  # a directory written by embedder.save(...)
        return load_saved(name).set_precision(precision)
    from ..models import load

    try:
        model = load(name)
    except FileNotFoundError:
        raise KeyError(f"unknown text embedder {name!r}; known: {list_embedders()} or any CLIP checkpoint path") \
            from None
    return CLIPTextEmbedder(name, model).set_precision(precision)


# --- the real models ---------------------------------------------------------------------------------------------------
#: sentence-transformers' max_seq_length for all-MiniLM-L6-v2 (its sentence_bert_config.json): longer texts are cut
MINILM_MAX_TOKENS = 256
#: the context we read SmolLM2 texts in for embeddings (the model's own is 8192); longer texts are cut and counted
SMOLLM2_MAX_TOKENS = 2048


@register_embedder("all-MiniLM-L6-v2")
def minilm() -> EncoderEmbedder:
    """sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide), mean pooling, 256 tokens."""
    from ..models.lm import TextTokenizer, load_bert
    from ..models.lm.pretrained import minilm_dir

    d = minilm_dir()
    tok = TextTokenizer.from_file(d / "tokenizer.json", max_length=MINILM_MAX_TOKENS, pad_id=0,
                                  name="all-MiniLM-L6-v2")
    return EncoderEmbedder("all-MiniLM-L6-v2", load_bert(d), tok, default_pooling="mean")


@register_lm("smollm2-135m")
def smollm2_lm() -> CausalLM:
    """SmolLM2-135M-Instruct (Llama, 30 layers, 576 wide) from its Q4_1 GGUF file, dequantised to fp32."""
    from ..models.lm.gguf import load_gguf
    from ..models.lm.pretrained import smollm2_gguf

    g = load_gguf(smollm2_gguf(), max_length=SMOLLM2_MAX_TOKENS)
    g.tokenizer.name = "smollm2-135m"
    return CausalLM("smollm2-135m", g.model, g.tokenizer, g.eos_id, g.bos_id, g.chat_template)


@register_embedder("smollm2-135m")
def smollm2() -> DecoderEmbedder:
    """SmolLM2-135M-Instruct's final (normed) token states; default pooling: PromptEOL. Each call reads the GGUF
    file again (about 5 s); to embed and generate with one copy, ``DecoderEmbedder.from_lm(load_lm(...))``."""
    return DecoderEmbedder.from_lm(smollm2_lm(), default_pooling="prompteol")
