"""Finding checkpoints that are already on this machine, offline: the Hugging Face cache.

``cliplab.load("openai/clip-vit-base-patch32")`` works when ``transformers`` (or ``huggingface_hub``) downloaded that
repository earlier: the snapshot folder in the cache is a Hugging Face model directory that :func:`cliplab.load`
reads. Nothing is downloaded. The cache is ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub`` (the layout ``models--ORG--NAME/snapshots/REVISION/``, revision from ``refs/main``).
When ``huggingface_hub`` is installed its own lookup (``snapshot_download(local_files_only=True)``) is asked first.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def looks_like_repo_id(name: str) -> bool:
    """``org/name`` with no path separators beyond the one slash (and not an existing path)."""
    return bool(_REPO_ID.match(name)) and not os.path.exists(name)


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _snapshot(repo_dir: Path) -> Path | None:
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        candidate = snapshots / ref.read_text().strip()
        if candidate.is_dir():
            return candidate
    found = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    return found[0] if found else None


def find_cached(repo_id: str) -> Path | None:
    """The local snapshot folder of a Hugging Face model repository, or None."""
    try:
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(repo_id, local_files_only=True))
        except Exception:  # not in its cache (LocalEntryNotFoundError), or offline trouble: try the folder ourselves
            pass
    except ImportError:
        pass
    return _snapshot(hf_cache_dir() / f"models--{repo_id.replace('/', '--')}")


def cached_clip_models() -> dict[str, Path]:
    """``{repo_id: snapshot}`` of the CLIP-family checkpoints in the local cache (``model_type`` clip or siglip)."""
    root = hf_cache_dir()
    out: dict[str, Path] = {}
    if not root.is_dir():
        return out
    for repo_dir in sorted(root.glob("models--*")):
        snap = _snapshot(repo_dir)
        cfg = snap / "config.json" if snap else None
        if cfg is None or not cfg.is_file():
            continue
        try:
            model_type = json.loads(cfg.read_text()).get("model_type")
        except (OSError, ValueError):
            continue
        if model_type in ("clip", "siglip"):
            out[repo_dir.name[len("models--"):].replace("--", "/", 1)] = snap
    return out
