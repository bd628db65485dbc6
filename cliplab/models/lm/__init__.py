"""Language-model text encoders in cliplab's own code: a BERT-style encoder (all-MiniLM-L6-v2) and a Llama-style
decoder (SmolLM2), their tokenizers, and readers for their checkpoint formats (Hugging Face folders, GGUF files).

Both models give the token-level views of the CLIP towers (``output=``, ``hooks=``, ``inputs_embeds=``) and satisfy
the hook protocol of :mod:`cliplab.models.hooks`, so ``cliplab.tokens`` interventions work on them. Optional packages
(``tokenizers``, ``gguf``) are imported on first use; a missing one raises :class:`MissingDependency` with the
install command.
"""

from .bert import BertConfig, BertEncoder, load_bert
from .deps import MissingDependency
from .llama import KVCache, LlamaConfig, LlamaDecoder
from .tokenizer import TextBatch, TextTokenizer, word_tokenizer

__all__ = ["BertConfig", "BertEncoder", "load_bert", "MissingDependency", "KVCache", "LlamaConfig", "LlamaDecoder",
           "TextBatch", "TextTokenizer", "word_tokenizer"]
