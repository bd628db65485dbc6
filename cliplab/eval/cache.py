"""An on-disk embedding cache, so evaluations never encode the same image (or text) twice.

Layout::

    <root>/<model id>/<space id>/space.json           what the space is (kind, preprocessing / tokenizer)
    <root>/<model id>/<space id>/chunk-*.npz          keys [n] (hex digests) + features [n, D] float32

* **model id** (:func:`model_identity`): a digest of the model's weights (names, dtypes, shapes, bytes) and config, or,
  when the model was loaded from files, of the source path, the files' sizes and modification times and the config
  (cheap for large checkpoints). Pass your own string to pin it.
* **space id**: images and texts live in separate spaces; an image space is keyed by the preprocessing settings
  (size, mean/std, interpolation, crop rounding, alpha policy), a text space by the tokenizer and context length.
* **item key**: a digest of the item's identity: ``file:<abs path>:<mtime_ns>:<size>`` for files (an edited file is
  re-encoded), ``synthetic:<builder>:<params>:<index>`` for synthetic scenes, ``text:<string>`` for texts.

Features are written raw (unnormalised, float32) in chunks as encoding proceeds, each chunk atomically (temporary file
+ rename), so an interrupted run keeps everything up to its last finished chunk and the next run encodes only the
rest. Chunk files have unique names, so concurrent runs never clobber each other (at worst they encode an item twice).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..progress import Progress

__all__ = [
    "EmbeddingCache", "CacheSpace", "CachedEncoder", "model_identity", "file_identity", "item_key",
    "default_cache_dir", "image_space_params", "text_space_params",
]


def default_cache_dir() -> Path:
    """``$CLIPLAB_CACHE`` or ``$XDG_CACHE_HOME/cliplab/embeddings`` (``~/.cache/cliplab/embeddings``)."""
    if os.environ.get("CLIPLAB_CACHE"):
        return Path(os.environ["CLIPLAB_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cliplab" / "embeddings"


def _digest(text: str, size: int = 16) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=size).hexdigest()


def item_key(identity: str) -> str:
    """The cache key of an item identity string."""
    return _digest(identity)


def file_identity(path: str | os.PathLike) -> str:
    """``file:<absolute path>:<mtime_ns>:<size>``: changes whenever the file is replaced or edited."""
    p = Path(path).resolve()
    st = p.stat()
    return f"file:{p}:{st.st_mtime_ns}:{st.st_size}"


# --- model identity ------------------------------------------------------------------------------------------------
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".json")


def _hash_weights(model: torch.nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_identity(model, source: str | os.PathLike | None = None) -> str:
    """A stable id for ``model``'s embeddings (module docstring).

    With ``source`` (the path the model was loaded from) the id covers the path, the weight files' sizes and
    modification times, the config and the dtype; otherwise the weights themselves are hashed."""
    config = json.dumps(model.config.to_dict(), sort_keys=True)
    dtype = str(getattr(model, "dtype", ""))
    if source is not None and Path(source).exists():
        p = Path(source).resolve()
        files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix in _WEIGHT_SUFFIXES)
        stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        ident = f"source:{p}:{stamp}:{config}:{dtype}"
    else:
        ident = f"weights:{_hash_weights(model)}:{config}"
    return f"{model.config.name}-{_digest(ident, 8)}"


def image_space_params(model) -> dict[str, Any]:
    """What an image embedding depends on besides the model and the image: the preprocessing."""
    pre = model.preprocessor.config.to_dict()
    return {"kind": "image", "preprocess": pre, "alpha": getattr(model.preprocessor, "alpha", "drop")}


def text_space_params(model) -> dict[str, Any]:
    """What a text embedding depends on besides the model and the text: the tokenizer."""
    return {"kind": "text", "tokenizer": getattr(model, "tokenizer_id", model.config.tokenizer), "context_length": model.config.text.context_length}


# --- storage -------------------------------------------------------------------------------------------------------
class CacheSpace:
    """One (model, kind, preprocessing) namespace: key -> feature row."""

    def __init__(self, directory: Path, params: dict[str, Any]):
        self.dir = Path(directory)
        self.params = params
        self._rows: dict[str, np.ndarray] | None = None
        self.chunks_written = 0

    def _load(self) -> dict[str, np.ndarray]:
        if self._rows is None:
            rows: dict[str, np.ndarray] = {}
            for f in sorted(self.dir.glob("chunk-*.npz")):
                try:
                    with np.load(f, allow_pickle=False) as z:
                        keys, feats = z["keys"], z["features"]
                except Exception as e:  # a damaged chunk costs a re-encode, not the run
                    warnings.warn(f"ignoring unreadable cache chunk {f} ({type(e).__name__}: {e})", stacklevel=2)
                    continue
                for k, row in zip(keys.tolist(), feats):
                    rows[k] = row
            self._rows = rows
        return self._rows

    def __len__(self) -> int:
        return len(self._load())

    def __contains__(self, key: str) -> bool:
        return key in self._load()

    def missing(self, keys: Iterable[str]) -> list[str]:
        rows = self._load()
        return [k for k in dict.fromkeys(keys) if k not in rows]

    def get(self, keys: Sequence[str]) -> torch.Tensor:
        rows = self._load()
        if not keys:
            return torch.empty(0, 0)
        return torch.from_numpy(np.stack([rows[k] for k in keys]))

    def put(self, keys: Sequence[str], features: torch.Tensor) -> None:
        """Write one chunk (atomically) and remember it."""
        feats = features.detach().float().cpu().numpy()
        if len(keys) != feats.shape[0]:
            raise ValueError(f"{len(keys)} keys for {feats.shape[0]} feature rows")
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "space.json"
        if not meta.exists():
            _atomic_write(meta, (json.dumps(self.params, indent=2, sort_keys=True) + "\n").encode())
        buf = io.BytesIO()
        np.savez(buf, keys=np.asarray(list(keys), dtype=str), features=feats)
        _atomic_write(self.dir / f"chunk-{uuid.uuid4().hex}.npz", buf.getvalue())
        self.chunks_written += 1
        rows = self._load()
        for k, row in zip(keys, feats):
            rows[k] = row


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class EmbeddingCache:
    """``EmbeddingCache(root, model_id).space(params)`` -> :class:`CacheSpace`."""

    def __init__(self, root: str | os.PathLike, model_id: str):
        self.root = Path(root)
        self.model_id = model_id
        self._spaces: dict[str, CacheSpace] = {}

    def space(self, params: dict[str, Any]) -> CacheSpace:
        sid = f"{params.get('kind', 'x')}-{_digest(json.dumps(params, sort_keys=True), 8)}"
        if sid not in self._spaces:
            self._spaces[sid] = CacheSpace(self.root / self.model_id / sid, params)
        return self._spaces[sid]


# --- encoding through the cache --------------------------------------------------------------------------------------
class ImageLike(Protocol):
    key: str

    def load(self) -> Any: ...


class _MemorySpace(CacheSpace):
    """No disk: the same interface, for ``cache=None``."""

    def __init__(self, params):
        super().__init__(Path("."), params)
        self._rows = {}

    def put(self, keys, features):
        for k, row in zip(keys, features.detach().float().cpu().numpy()):
            self._rows[k] = row


class CachedEncoder:
    """Encode images and texts with ``model``, reading and writing ``cache`` (or only memory when ``None``).

    ``images(items)`` takes objects with ``.key`` (an identity string) and ``.load()`` (a PIL image or path);
    ``texts(strings)``. Both return L2-normalised float32 features in input order. Every encoded batch is one cache
    chunk. ``stats`` counts cached vs encoded items per kind. ``progress`` (:mod:`cliplab.progress`): ``False``
    silent, ``True`` a bar, ``None`` a bar on a terminal and a plain line every 10 s otherwise.

    ``image_encoder``: encodes pixels instead of ``model.encode_image`` (e.g. a
    :class:`cliplab.vision_tokens.ReducedImageEncoder`); its ``params`` dict joins the image cache key."""

    def __init__(self, model, cache: EmbeddingCache | None = None, *, batch_size: int = 64,
                 text_batch_size: int = 256, progress: bool | None = False, workers: int = 2, image_encoder=None):
        self.model = model
        self.image_encoder = image_encoder
        self.cache = cache
        self.batch_size = batch_size
        self.text_batch_size = text_batch_size
        self.progress = progress
        self.workers = workers
        ip, tp = image_space_params(model), text_space_params(model)
        if image_encoder is not None:
            ip = {**ip, **image_encoder.params}
        self.image_space = cache.space(ip) if cache is not None else _MemorySpace(ip)
        self.text_space = cache.space(tp) if cache is not None else _MemorySpace(tp)
        self.stats = {"image": {"cached": 0, "encoded": 0}, "text": {"cached": 0, "encoded": 0}}

    @torch.inference_mode()
    def images(self, items: Sequence[ImageLike], desc: str = "encoding images") -> torch.Tensor:
        keys = [item_key(it.key) for it in items]
        first = {}
        for k, it in zip(keys, items):
            first.setdefault(k, it)
        todo = self.image_space.missing(keys)
        self.stats["image"]["cached"] += len(first) - len(todo)
        self.stats["image"]["encoded"] += len(todo)
        if todo:
            self._encode_images([first[k] for k in todo], todo, desc)
        return F.normalize(self.image_space.get(keys), dim=-1) if keys else torch.empty(0, self.model.config.embed_dim)

    def _encode_images(self, items: list, keys: list[str], desc: str) -> None:
        model, pre = self.model, self.model.preprocessor
        batches = [(items[i: i + self.batch_size], keys[i: i + self.batch_size])
                   for i in range(0, len(items), self.batch_size)]

        def prepare(batch):
            return pre.batch([it.load() for it in batch])

        with Progress(total=len(items), desc=desc, unit="image", enabled=self.progress, leave=False) as bar, \
                ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            pending = pool.submit(prepare, batches[0][0])  # preprocess batch b+1 while b is encoded
            for b, (batch, bkeys) in enumerate(batches):
                pixels = pending.result()
                if b + 1 < len(batches):
                    pending = pool.submit(prepare, batches[b + 1][0])
                pixels = pixels.to(device=model.device, dtype=model.dtype)
                feats = model.encode_image(pixels) if self.image_encoder is None else self.image_encoder(pixels)
                self.image_space.put(bkeys, feats.float().cpu())
                bar.update(len(batch))

    @torch.inference_mode()
    def texts(self, texts: Sequence[str], desc: str = "encoding texts") -> torch.Tensor:
        from ..zeroshot.classifier import encode_prompts

        texts = list(texts)
        keys = [item_key("text:" + t) for t in texts]
        text_of = dict(zip(keys, texts))
        todo = self.text_space.missing(keys)
        self.stats["text"]["cached"] += len(text_of) - len(todo)
        self.stats["text"]["encoded"] += len(todo)
        if todo:
            encode_prompts(self.model, [text_of[k] for k in todo], batch_size=self.text_batch_size,
                           progress=self.progress, desc=desc,
                           on_batch=lambda idx, feats: self.text_space.put([todo[i] for i in idx], feats))
        return F.normalize(self.text_space.get(keys), dim=-1) if keys else torch.empty(0, self.model.config.embed_dim)

    def text_encoder(self) -> Callable[[list[str]], torch.Tensor]:
        """A ``text_encoder`` for :meth:`ZeroShotClassifier.from_prompts` that goes through this cache."""
        return lambda texts: self.texts(texts, desc="encoding prompts")
