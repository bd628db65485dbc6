"""Naming a model for a job: load it from a pretrained name, a path, or (for tests and smoke runs) a registered
architecture with seeded random weights; record how to get the same weights back, with a fingerprint."""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_MODEL", "PretrainedRef", "resolve_model", "load_model_from_info", "fingerprint",
           "RandomWeightsWarning"]

#: the model the CLI uses when none is named (trained on the synthetic scenes, shipped in the package)
DEFAULT_MODEL = "shapes-tiny"


@dataclass(frozen=True)
class PretrainedRef:
    """An architecture and its weights file, OpenCLIP's ``create_model(arch, pretrained=file)`` spelling (the CLI's
    ``-m ViT-B-32 --pretrained FILE``); accepted wherever a model spec is."""

    arch: str
    file: str


class RandomWeightsWarning(UserWarning):
    """A bare architecture name was given: the model has seeded random weights, its embeddings mean nothing."""


def fingerprint(model) -> str:
    """A short hash of the architecture config and every weight (name, dtype, shape, bytes), including weights a
    model holds outside its ``state_dict`` (``model.external_state_dict()``: an LLM text tower's frozen embedder)."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    h.update(repr(sorted(model.config.to_dict().items())).encode())
    state = dict(model.state_dict())
    external = getattr(model, "external_state_dict", None)
    if callable(external):
        state.update(external())
    for name, t in sorted(state.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def resolve_model(spec=None, *, device: str = "cpu", seed: int = 0, warn_random: bool = True,
                  pretrained: str | os.PathLike | None = None):
    """``(model, info)`` for a ``CLIP`` object, a pretrained name, a checkpoint path, a Hugging Face hub id in the
    local cache, an architecture name with ``pretrained=FILE`` (OpenCLIP's spelling), or an architecture name alone
    (seeded random weights, with a :class:`RandomWeightsWarning`). A directory saved by
    ``cliplab.text.llm_tower.LLMTextCLIP.save`` (an LLM text tower) and such a model object count as a
    checkpoint path and a ``CLIP`` object. ``None`` means the default model
    (:data:`DEFAULT_MODEL`), which must be the shipped *trained* weights: it never falls back to random ones.
    ``info`` lets :func:`load_model_from_info` rebuild the same weights later (``source`` is ``None`` for an
    in-memory model)."""
    from cliplab.models import CLIP, create_model, list_models, list_pretrained, load
    from cliplab.models.hub import looks_like_repo_id
    from cliplab.models.loading import not_found_message
    from cliplab.text.llm_tower import LLMTextCLIP, is_llm_clip_dir, load_llm_clip

    allow_random = spec is not None
    if spec is None:
        spec = DEFAULT_MODEL
    if isinstance(spec, PretrainedRef):
        spec, pretrained = spec.arch, spec.file
    if pretrained is not None:
        path = os.path.abspath(os.fspath(pretrained))
        model = load(os.fspath(spec), pretrained=path, device=device)
        info = {"kind": "path", "source": path, "arch": os.fspath(spec)}
    elif isinstance(spec, (CLIP, LLMTextCLIP)):
        model, info = spec, {"kind": "object", "source": None}
    else:
        spec = os.fspath(spec)
        if spec in list_pretrained():
            model, info = load(spec, device=device), {"kind": "pretrained", "source": spec}
        elif Path(spec).exists():
            path = os.path.abspath(spec)
            model = load_llm_clip(path).to(device) if is_llm_clip_dir(path) else load(path, device=device)
            info = {"kind": "path", "source": path}
        elif looks_like_repo_id(spec):
            model, info = load(spec, device=device), {"kind": "hub", "source": spec}
        elif allow_random and spec in list_models():
            if warn_random:
                warnings.warn(f"{spec!r} is an architecture, not trained weights: using seeded random weights "
                              f"(seed {seed}); embeddings are only good for testing the machinery",
                              RandomWeightsWarning, stacklevel=2)
            model = create_model(spec, seed=seed).to(device).eval()
            info = {"kind": "random", "source": spec, "seed": seed}
        else:
            if not allow_random:
                raise FileNotFoundError(
                    f"the default model {DEFAULT_MODEL!r} is not shipped in this installation (pretrained: "
                    f"{list_pretrained()}); name one with --model: a checkpoint path, a pretrained name, "
                    "or an architecture such as 'test-tiny' (random weights, for smoke tests)")
            raise FileNotFoundError(not_found_message(spec) + " (an architecture name gives random weights; see "
                                    "cliplab models)")
    model.eval()
    info.update({"name": model.config.name, "embed_dim": model.config.embed_dim, "fingerprint": fingerprint(model)})
    return model, info


def load_model_from_info(info: dict[str, Any], *, device: str = "cpu"):
    """Rebuild the model a job or index recorded; raises ``ValueError`` if that is impossible or the weights
    differ from the recorded fingerprint."""
    kind, source = info.get("kind"), info.get("source")
    if kind == "object" or source is None:
        raise ValueError("the embeddings were made with an in-memory model that was not saved; pass the model "
                         "explicitly (--model)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        if info.get("arch"):  # OpenCLIP style: an architecture and its weights file
            model, new = resolve_model(info["arch"], device=device, pretrained=source)
        else:
            model, new = resolve_model(source, device=device, seed=info.get("seed", 0))
    if info.get("fingerprint") and new["fingerprint"] != info["fingerprint"]:
        raise ValueError(f"model {source!r} no longer has the weights the embeddings were made with "
                         f"(fingerprint {new['fingerprint']} != {info['fingerprint']}); pass the right one with --model")
    return model
