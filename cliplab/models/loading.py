"""``load(source)``: read a checkpoint in any supported layout into our CLIP, safely.

Sources, in the order they are tried:

* a registered pretrained name (``list_pretrained()``), shipped with the package;
* a directory written by ``model.save`` (``cliplab.json`` + ``model.safetensors``);
* a Hugging Face directory (``config.json`` with ``model_type: clip`` + ``model.safetensors`` or ``pytorch_model.bin``);
* a single weights file (``.safetensors``, ``.pt``, ``.pth``, ``.bin``) in any registered layout; the architecture
  comes from ``arch=`` (a registered name, a ``ModelConfig`` or a JSON path) or is inferred from tensor shapes;
  OpenCLIP's spelling ``load(ARCH, pretrained=FILE)`` is the same;
* a Hugging Face hub id (``openai/clip-vit-base-patch32``) already in the local cache (:mod:`cliplab.models.hub`;
  nothing is downloaded).

A name that matches nothing fails with where cliplab looked and the names it may have meant.

Nothing here unpickles arbitrary objects: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path
from typing import Callable

import torch

from .clip import PRECISIONS, NATIVE_CONFIG_FILE, NATIVE_WEIGHTS_FILE, CLIP
from .compiled import compile_mode
from .config import ModelConfig
from .hf_tokenizer import attach_checkpoint_tokenizer
from .hub import cached_clip_models, find_cached, hf_cache_dir, looks_like_repo_id
from .layouts import CheckpointError, detect_layout, get_layout
from .layouts.base import describe_key_problems
from .layouts.hf import config_from_hf, config_to_hf, preprocessor_to_hf
from .layouts.siglip import config_from_siglip, config_to_siglip, preprocessor_to_siglip
from .registry import find_matching_config, get_config

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")

# Models shipped inside the package: every ``pretrained/<name>/`` holding a cliplab.json is loadable by name.
PRETRAINED_DIR = Path(__file__).parent / "pretrained"
_PRETRAINED: dict[str, Callable[[], Path]] = {}


def register_pretrained(name: str, locate: Callable[[], Path]) -> None:
    """Make ``cliplab.load(name)`` load the native-format directory returned by ``locate()``."""
    _PRETRAINED[name] = locate


def _register_shipped() -> None:
    for d in sorted(PRETRAINED_DIR.glob("*/")):
        if (d / NATIVE_CONFIG_FILE).exists():
            register_pretrained(d.name, lambda d=d: d)


def list_pretrained() -> list[str]:
    return sorted(_PRETRAINED)


# --- reading files ---------------------------------------------------------------------------------------------------
def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, without executing code from it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if _is_torchscript(path):
        raise CheckpointError(
            f"{path} is a TorchScript archive (like OpenAI's original .pt downloads). Loading it would run code "
            "from the file, so cliplab refuses. Export its state dict once in a trusted environment "
            "(torch.jit.load(p).state_dict() -> safetensors) and load that."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types here (even KeyError for a text file): one clear message
        raise CheckpointError(f"{path}: {_why_unloadable(path, e)}") from e
    return _unwrap(obj, path)


def _why_unloadable(path: Path, e: Exception) -> str:
    """Our own words for a failed ``torch.load(weights_only=True)`` (PyTorch's suggest unsafe workarounds)."""
    import re

    with open(path, "rb") as f:
        head = f.read(4)
    is_zip = zipfile.is_zipfile(path)
    if not is_zip and head[:2] == b"PK":
        return "a damaged zip archive (truncated or corrupt): not a readable PyTorch checkpoint"
    if not is_zip and head[:1] != b"\x80":
        return "not a PyTorch checkpoint: neither a zip archive nor a pickle (expected .safetensors, .pt, .pth, .bin)"
    text = str(e)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return (f"refused: the file's pickle builds Python objects beyond tensors (e.g. {found.group(1)}), and "
                "unpickling them could run code from the file. Save its state_dict with safetensors in a trusted "
                "environment and load that.")
    return f"not a readable PyTorch checkpoint (corrupt or truncated: {type(e).__name__})"


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """Training checkpoints nest the weights (``{"state_dict": ...}``) and DDP prefixes them with ``module.``."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a mapping of names to tensors, found a {type(obj).__name__}")
    odd = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise CheckpointError(f"{path}: expected a mapping of names to tensors; {len(odd)} entr(ies) are not tensors "
                              f"(e.g. {odd[0]!r}: {type(obj[odd[0]]).__name__})")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


# --- building --------------------------------------------------------------------------------------------------------
def resolve_arch(arch: str | Path | ModelConfig) -> ModelConfig:
    if isinstance(arch, ModelConfig):
        return arch
    if isinstance(arch, Path) or str(arch).endswith(".json"):
        return ModelConfig.load(arch)
    return get_config(str(arch))


def build_from_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> CLIP:
    """Our model holding exactly ``state`` (our layout); refuses missing, unexpected or mis-shaped tensors by name."""
    with torch.device("meta"):
        model = CLIP(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}"
                 for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k]]
    if missing or unexpected or misshaped:
        raise CheckpointError(describe_key_problems("cliplab", cfg.name, missing, unexpected, misshaped))
    # Fresh storage for every tensor: safetensors/mmap buffers can be unaligned, and unaligned weights take other
    # SIMD paths in matmul, so features would differ in the last bits from the model that was saved.
    model.load_state_dict({k: (v.float() if v.is_floating_point() else v).clone() for k, v in state.items()},
                          strict=True, assign=True)
    return model


def model_from_state(state: dict[str, torch.Tensor], arch=None, layout: str | None = None) -> CLIP:
    """Detect (or take) the layout, choose the config (``arch`` or inferred from shapes), convert and build.

    The centre-crop convention follows the checkpoint's origin (the layout), whatever ``arch`` says."""
    lay = get_layout(layout) if layout else detect_layout(state)
    if arch is not None:
        cfg = resolve_arch(arch)
    elif lay.name == "cliplab":
        raise CheckpointError("a bare cliplab-layout weights file needs arch= (or load its directory with cliplab.json)")
    else:
        cfg = lay.infer_config(state)
        match = find_matching_config(cfg)
        if match is not None:
            cfg = get_config(match).replace(preprocess=cfg.preprocess)
    if lay.crop_rounding is not None:
        cfg = cfg.replace(preprocess=dataclasses.replace(cfg.preprocess, crop_rounding=lay.crop_rounding))
    return build_from_state(lay.to_cliplab(state, cfg), cfg)


def _load_native_dir(d: Path) -> CLIP:
    meta = json.loads((d / NATIVE_CONFIG_FILE).read_text())
    if meta.get("format") != "cliplab":
        raise CheckpointError(f"{d / NATIVE_CONFIG_FILE}: not a cliplab model config")
    cfg = ModelConfig.from_dict(meta["config"])
    model = build_from_state(read_state_dict(d / NATIVE_WEIGHTS_FILE), cfg)
    attach_checkpoint_tokenizer(model, d)
    return model


#: ``model_type`` of a Hugging Face config.json -> (layout, config reader); anything else reads as CLIP.
_HF_DIR_KINDS = {"siglip": ("siglip", config_from_siglip), "siglip2": ("siglip", config_from_siglip)}


def _load_hf_dir(d: Path, arch=None) -> CLIP:
    hf = json.loads((d / "config.json").read_text())
    pre_path = d / "preprocessor_config.json"
    pre = json.loads(pre_path.read_text()) if pre_path.exists() else None
    layout, from_hf = _HF_DIR_KINDS.get(hf.get("model_type", "clip"), ("hf", config_from_hf))  # siglip(2): its own
    if arch is not None:
        cfg = resolve_arch(arch)
    else:
        cfg = from_hf(hf, pre, name=d.name)
        cfg = cfg.replace(name=find_matching_config(cfg) or cfg.name)
    for fname in ("model.safetensors", "pytorch_model.bin"):
        if (d / fname).exists():
            model = model_from_state(read_state_dict(d / fname), arch=cfg, layout=layout)
            attach_checkpoint_tokenizer(model, d)
            return model
    raise CheckpointError(f"{d}: Hugging Face config found but no model.safetensors or pytorch_model.bin")


def load(source: str | Path, arch=None, precision: str = "fp32", device: str | torch.device = "cpu",
         layout: str | None = None, pretrained: str | Path | None = None, compile: bool | str = False) -> CLIP:
    """Load a CLIP model from a pretrained name, a directory, a weights file or a Hugging Face hub id already in the
    local cache (see the module docstring).

    ``arch`` overrides the architecture; ``layout`` forces a layout instead of detecting it; ``precision`` is
    ``"fp32"`` (default, exact) or the fast mode ``"bf16"`` (``"fp16"``): weights and compute in that type, features
    returned in fp32 (:meth:`CLIP.set_precision`). OpenCLIP's spelling works too: ``load("ViT-B-32",
    pretrained="open_clip_model.safetensors")`` is ``load(file, arch="ViT-B-32")``. ``compile=True`` runs the plain
    encode paths through ``torch.compile`` (:meth:`CLIP.set_compiled`: faster after minutes of compiling on first
    use); a mode name (``compile="max-autotune"``) compiles in that mode. The model is returned in eval mode.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    mode = compile_mode(compile)
    if pretrained is not None:
        if arch is not None:
            raise ValueError("give the architecture once: load(ARCH, pretrained=FILE) or load(FILE, arch=ARCH)")
        arch, source = source, pretrained
        if not Path(source).is_file():
            raise FileNotFoundError(f"pretrained={str(source)!r} is not a file: OpenCLIP's pretrained tags (e.g. "
                                    "laion2b_s34b_b79k) are not downloaded here; pass the weights file that "
                                    "open_clip saved (its cache is ~/.cache/huggingface/hub or ~/.cache/clip)")
    model = _load_any(source, arch, layout)
    return model.to(device=device).set_precision(precision).eval().set_compiled(bool(compile), mode=mode)


def _load_any(source, arch, layout) -> CLIP:
    if isinstance(source, str) and source in _PRETRAINED:
        return _load_native_dir(_PRETRAINED[source]())
    if isinstance(source, str) and looks_like_repo_id(source):
        snapshot = find_cached(source)
        if snapshot is None:
            raise FileNotFoundError(f"{source!r} looks like a Hugging Face hub id, but it is not in the local cache "
                                    f"({hf_cache_dir()}; nothing is downloaded): download it once with transformers "
                                    "or huggingface_hub, or pass a directory or weights file")
        source = snapshot
    path = Path(source)
    if path.is_dir():
        if (path / "onnx_export.json").exists() and not (path / NATIVE_WEIGHTS_FILE).exists():
            raise CheckpointError(f"{path} is an ONNX export: open it with cliplab.export.load_onnx({str(path)!r})")
        if (path / NATIVE_CONFIG_FILE).exists():
            return _load_native_dir(path)
        if (path / "config.json").exists():
            return _load_hf_dir(path, arch)
        raise CheckpointError(f"{path}: directory has neither {NATIVE_CONFIG_FILE} nor a Hugging Face config.json")
    if path.is_file():
        try:
            return model_from_state(read_state_dict(path), arch=arch, layout=layout)
        except CheckpointError as e:  # name the file, as every other loading error does
            if str(path) in str(e):
                raise
            raise CheckpointError(f"{path}: {e}") from e
    raise FileNotFoundError(not_found_message(str(source)))


def not_found_message(name: str) -> str:
    """Why ``name`` did not load: what it was taken for, where cliplab looked, and close names it may have meant."""
    import difflib

    from .registry import list_models

    known = list_pretrained()
    candidates = [c for c in dict.fromkeys(known + list_models() + sorted(cached_clip_models())) if c != name]
    near = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    near += [c for c in candidates if name.lower() in c.lower() and c not in near][: 3 - len(near)]
    hint = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near and name not in list_models() else ""
    arch = (f" {name!r} is an architecture: cliplab.create_model({name!r}) gives random weights, and "
            f"load({name!r}, pretrained=FILE) loads a checkpoint into it." if name in list_models() else "")
    return (f"{name!r} is not a pretrained name ({', '.join(known) or 'none shipped'}), an existing file or "
            f"directory, or a Hugging Face hub id in the local cache ({hf_cache_dir()}){hint}{arch}")


# --- writing other layouts ------------------------------------------------------------------------------------------
def export_state(model: CLIP, layout: str) -> dict[str, torch.Tensor]:
    """The model's tensors in another layout (exact: renames, transposes and splits only)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_layout(_hf_layout_of(model, layout)).from_cliplab(state, model.config)


def _hf_layout_of(model: CLIP, layout: str) -> str:
    """A SigLIP model's Hugging Face layout is ``SiglipModel``'s, not ``CLIPModel``'s."""
    return "siglip" if layout == "hf" and model.config.family == "siglip" else layout


def convert(model: CLIP, layout: str, out: str | Path) -> Path:
    """Write ``model`` in ``layout``: ``cliplab`` (a directory), ``hf`` (a directory ``CLIPModel.from_pretrained``
    reads; for a SigLIP model, ``SiglipModel``'s; ``siglip`` names that layout too) or ``openai`` (a single
    ``.safetensors`` file)."""
    from safetensors.torch import save_file

    out = Path(out)
    if layout == "cliplab":
        return model.save(out)
    state = export_state(model, layout)
    layout = _hf_layout_of(model, layout)
    if layout in ("hf", "siglip"):
        to_hf, pre_to_hf = (config_to_hf, preprocessor_to_hf) if layout == "hf" else (config_to_siglip,
                                                                                       preprocessor_to_siglip)
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(to_hf(model.config), indent=2) + "\n")
        (out / "preprocessor_config.json").write_text(json.dumps(pre_to_hf(model.config), indent=2) + "\n")
        if model.checkpoint_tokenizer is not None:  # the directory stays self-contained: its tokenizer goes along
            model.checkpoint_tokenizer.save(out)
        return out
    if out.suffix != ".safetensors":
        raise ValueError(f"write the {layout} layout to a .safetensors file, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out))
    return out


_register_shipped()
