"""Read a Llama-architecture GGUF file (llama.cpp's format) into :class:`LlamaDecoder`, its tokenizer and its chat
template, with the ``gguf`` package (``pip install 'cliplab[text]'``).

Quantised tensors (Q4_1, Q8_0, ...) are dequantised to fp32 by ``gguf.quants.dequantize``: the model computes in
fp32 (or bf16 in fast mode) on exactly the values the file stores. llama.cpp's converter permutes the rows of the q
and k projections for its interleaved rotary convention; they are permuted back here to the half-split convention
our :mod:`~cliplab.models.lm.llama` uses (the same inverse ``transformers`` applies when it reads GGUF).

The tokenizer is rebuilt from the file's vocabulary and merges (``tokenizer.ggml.model == "gpt2"``: byte-level BPE);
the ``smollm`` pre-tokenizer splits digits one by one before the GPT-2 pattern, as llama.cpp does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..layouts.base import CheckpointError
from .deps import require
from .llama import LlamaConfig, LlamaDecoder
from .tokenizer import TextTokenizer

#: token types in ``tokenizer.ggml.token_type`` that are special (never split, skipped when decoding): control
CONTROL_TOKEN = 3
#: GGUF pre-tokenizer names whose digits are split one by one
_DIGIT_SPLITTING = {"smollm", "llama3", "llama-bpe", "qwen2", "deepseek-llm"}


@dataclass
class GGUFModel:
    """What a GGUF file holds: the model, its tokenizer, its special token ids and its chat template."""

    model: LlamaDecoder
    tokenizer: TextTokenizer
    bos_id: int | None
    eos_id: int
    chat_template: str | None
    metadata: dict


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_metadata(reader) -> dict:
    """Scalar and string metadata (the long vocabulary arrays are left out)."""
    skip = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"}
    return {k: f.contents() for k, f in reader.fields.items() if k not in skip and not k.startswith("GGUF.")}


def config_from_metadata(meta: dict, n_vocab: int, tied: bool) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    p = "llama."
    heads = int(meta[p + "attention.head_count"])
    width = int(meta[p + "embedding_length"])
    return LlamaConfig(
        vocab_size=int(meta.get(p + "vocab_size", n_vocab)), width=width, layers=int(meta[p + "block_count"]),
        heads=heads, kv_heads=int(meta.get(p + "attention.head_count_kv", heads)),
        head_dim=int(meta.get(p + "rope.dimension_count", width // heads)),
        mlp_dim=int(meta[p + "feed_forward_length"]), eps=float(meta[p + "attention.layer_norm_rms_epsilon"]),
        rope_theta=float(meta.get(p + "rope.freq_base", 10000.0)),
        max_positions=int(meta.get(p + "context_length", 2048)), tie_embeddings=tied)


def unpermute_rotary_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved pairs -> two halves per head)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _dequantize(tensor) -> torch.Tensor:
    quants = require("gguf.quants", "reading GGUF tensors")
    data = quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(s) for s in reversed(tensor.shape))  # GGUF lists dimensions fastest-first
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))  # a writable copy


def state_from_tensors(tensors: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """GGUF tensor names -> our state dict (fused qkv and gate_up, rotary rows permuted back)."""
    state = {"token_embed.weight": tensors.pop("token_embd.weight"), "norm.weight": tensors.pop("output_norm.weight")}
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = tensors.pop("output.weight")
    for i in range(cfg.layers):
        b = f"blk.{i}."
        q = unpermute_rotary_rows(tensors.pop(b + "attn_q.weight"), cfg.heads)
        k = unpermute_rotary_rows(tensors.pop(b + "attn_k.weight"), cfg.kv_heads)
        v = tensors.pop(b + "attn_v.weight")
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, k, v])
        state[f"blocks.{i}.attn.out.weight"] = tensors.pop(b + "attn_output.weight")
        state[f"blocks.{i}.attn_norm.weight"] = tensors.pop(b + "attn_norm.weight")
        state[f"blocks.{i}.mlp_norm.weight"] = tensors.pop(b + "ffn_norm.weight")
        state[f"blocks.{i}.gate_up.weight"] = torch.cat([tensors.pop(b + "ffn_gate.weight"),
                                                         tensors.pop(b + "ffn_up.weight")])
        state[f"blocks.{i}.down.weight"] = tensors.pop(b + "ffn_down.weight")
    if tensors:
        extra = sorted(tensors)
        raise CheckpointError(f"GGUF tensors not used by a Llama of {cfg.layers} blocks: {extra[:8]}")
    return state


def tokenizer_from_gguf(reader, meta: dict, max_length: int) -> tuple[TextTokenizer, int | None, int]:
    """A byte-level BPE tokenizer from the file's vocabulary; returns it with the BOS and EOS ids."""
    tk = require("tokenizers", "the GGUF tokenizer")
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta.get("tokenizer.ggml.pre") in _DIGIT_SPLITTING:
        tok.pre_tokenizer = tk.pre_tokenizers.Sequence([tk.pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = tk.decoders.ByteLevel()
    tok.add_special_tokens([tk.AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL_TOKEN])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = int(meta["tokenizer.ggml.eos_token_id"])
    pad = int(meta.get("tokenizer.ggml.padding_token_id", eos))
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    text_tok = TextTokenizer(tok, max_length=max_length, pad_id=pad, add_special_tokens=False,
                             empty_id=int(unk) if unk is not None else eos, name=str(meta.get("general.name", "gguf")))
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        # the tokenizer itself adds BOS: a decoder that expects it gets it on every text
        text_tok.tokenizer.post_processor = tk.processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", special_tokens=[(tokens[bos], int(bos))])
        text_tok.add_special_tokens = True
    return text_tok, (int(bos) if bos is not None else None), eos


def load_gguf(path: str | Path, max_length: int | None = None) -> GGUFModel:
    """Read a Llama GGUF file: model (fp32, eval mode), tokenizer, special ids, chat template and metadata."""
    gguf = require("gguf", "reading GGUF files")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError / struct errors on other files
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from e
    meta = read_metadata(reader)
    tensors = {t.name: _dequantize(t) for t in reader.tensors}
    tied = "output.weight" not in tensors
    cfg = config_from_metadata(meta, tensors["token_embd.weight"].shape[0], tied)
    state = state_from_tensors(tensors, cfg)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["token_embed.weight"]
    with torch.device("meta"):
        model = LlamaDecoder(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.token_embed.weight
    tokenizer, bos, eos = tokenizer_from_gguf(reader, meta, max_length or cfg.max_positions)
    return GGUFModel(model.eval(), tokenizer, bos, eos, meta.get("tokenizer.chat_template"), meta)
