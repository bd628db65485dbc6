"""Saving and loading text embedders as directories, so a trained one is a name like any other:
``cliplab.text.load_embedder("runs/gem-smollm2")``, ``cliplab eval sts -m runs/gem-smollm2``.

A directory holds ``cliplab-text.json`` (the kind, the model's architecture, the tokenizer settings, the default
pooling and whatever the kind needs), ``model.safetensors`` and ``tokenizer.json``. A *kind* says how to rebuild the
embedder: ``encoder`` and ``decoder`` (plain :class:`EncoderEmbedder` / :class:`DecoderEmbedder`) are built in;
a method that embeds differently (special tokens, a combined representation) registers its own with
:func:`register_embedder_kind`. Kinds of ``cliplab.textrep`` modules are found on first use.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import torch

TEXT_CONFIG = "cliplab-text.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
FORMAT = "cliplab-text-embedder"

_KINDS: dict[str, Callable[[Path, dict], Any]] = {}


def register_embedder_kind(kind: str):
    """Decorator on ``loader(directory, meta) -> TextEmbedder`` for directories saved with ``kind``."""

    def register(loader):
        if kind in _KINDS and _KINDS[kind] is not loader:
            raise ValueError(f"text embedder kind {kind!r} is already registered")
        _KINDS[kind] = loader
        return loader

    return register


def is_saved_embedder(path) -> bool:
    return (Path(path) / TEXT_CONFIG).is_file()


def _architecture(model) -> dict:
    from ..models.lm import BertEncoder, LlamaDecoder

    if isinstance(model, BertEncoder):
        return {"type": "bert", "config": dataclasses.asdict(model.cfg)}
    if isinstance(model, LlamaDecoder):
        return {"type": "llama", "config": dataclasses.asdict(model.cfg)}
    raise TypeError(f"cannot save a {type(model).__name__} text model (bert and llama are supported)")


def build_model(architecture: dict):
    """An uninitialised model of a saved ``architecture`` (``{"type": "bert"|"llama", "config": {...}}``)."""
    from ..models.lm import BertConfig, BertEncoder, LlamaConfig, LlamaDecoder

    kinds = {"bert": (BertConfig, BertEncoder), "llama": (LlamaConfig, LlamaDecoder)}
    if architecture.get("type") not in kinds:
        raise ValueError(f"unknown text model type {architecture.get('type')!r}; known: {sorted(kinds)}")
    cfg_cls, model_cls = kinds[architecture["type"]]
    return model_cls(cfg_cls(**architecture["config"]))


def save_embedder(embedder, directory, kind: str | None = None, extra: dict | None = None,
                  state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``embedder`` (an encoder or decoder embedder) to ``directory``. ``kind`` (default ``encoder`` or
    ``decoder``) names the loader; ``extra`` is stored for it; ``state`` defaults to the model's weights (a method
    may add its own tensors, e.g. a head)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = embedder.tokenizer
    kind = kind or ("decoder" if getattr(embedder, "causal", False) else "encoder")
    meta = {"format": FORMAT, "format_version": 1, "kind": kind, "name": embedder.name,
            "default_pooling": embedder.default_pooling, "architecture": _architecture(embedder.model),
            "tokenizer": {"max_length": tok.max_length, "pad_id": tok.pad_id,
                          "add_special_tokens": tok.add_special_tokens, "empty_id": tok.empty_id, "name": tok.name},
            "extra": extra or {}}
    tensors = state if state is not None else embedder.model.state_dict()
    seen: dict[int, str] = {}
    clean = {}
    for k, v in tensors.items():  # tied weights (a decoder's lm_head) are stored once
        if v.data_ptr() in seen and v.shape == tensors[seen[v.data_ptr()]].shape:
            meta.setdefault("tied", {})[k] = seen[v.data_ptr()]
            continue
        seen[v.data_ptr()] = k
        clean[k] = v.detach().float().contiguous().cpu()
    save_file(clean, str(directory / WEIGHTS), metadata={"format": FORMAT})
    (directory / TOKENIZER).write_text(tok.tokenizer.to_str())
    (directory / TEXT_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def read_saved(directory) -> tuple[dict, dict[str, torch.Tensor], Any]:
    """``(meta, state, tokenizer)`` of a saved embedder directory."""
    from safetensors.torch import load_file

    from ..models.lm import TextTokenizer

    directory = Path(directory)
    meta = json.loads((directory / TEXT_CONFIG).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory / TEXT_CONFIG}: not a cliplab text embedder")
    state = load_file(str(directory / WEIGHTS))
    for k, src in meta.get("tied", {}).items():
        state[k] = state[src]
    t = meta["tokenizer"]
    tok = TextTokenizer.from_file(directory / TOKENIZER, max_length=t["max_length"], pad_id=t["pad_id"],
                                  add_special_tokens=t["add_special_tokens"], empty_id=t["empty_id"],
                                  name=t.get("name", meta["name"]))
    return meta, state, tok


def load_model_state(meta: dict, state: dict[str, torch.Tensor]):
    """The saved model with its weights (keys of ``state`` outside the model are ignored: a method's own)."""
    model = build_model(meta["architecture"])
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
    if getattr(model.cfg, "tie_embeddings", False):
        model.lm_head.weight = model.token_embed.weight
    return model.eval()


def load_saved(directory):
    """Rebuild a saved embedder through its kind's loader."""
    meta = json.loads((Path(directory) / TEXT_CONFIG).read_text())
    kind = meta.get("kind")
    if kind not in _KINDS:
        from ..methods import import_capability

        import_capability("textrep")  # methods register their kinds on import
    if kind not in _KINDS:
        raise ValueError(f"{directory}: unknown text embedder kind {kind!r}; known: {sorted(_KINDS)}")
    return _KINDS[kind](Path(directory), meta)
