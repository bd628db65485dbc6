"""The embedding job: a source -> sharded Parquet embeddings + manifest + rejects, resumable after any crash.

::

    from cliplab.pipeline import embed, read_embeddings
    result = embed("photos/", "out/", model="shapes-tiny")      # or synthetic:500, captions.csv, ...
    emb = read_embeddings("out/")                                # ids, paths, captions, image/text arrays

How a job is made exactly-once (see ``docs/pipeline.md``):

1. The item list is written once into ``plan.parquet`` (then ``job.json``, which names the source, the model
   fingerprint and the options that change the output). A rerun reads the plan back and lists the source again:
   new items are appended as a new *segment* (one atomic rewrite of the plan), changed and removed ones are only
   reported, so committed rows never shift between shards; a rerun with a different job refuses (``overwrite=True``
   starts over).
2. Each segment's shard ``j`` holds its items ``[j * shard_size, (j + 1) * shard_size)`` (:func:`plan_segments`). A
   shard is committed by an atomic rename after its rejects file is written; a rerun skips every committed shard and
   redoes the others from scratch.
3. The manifest and the merged ``rejects.jsonl`` are recomputed from the committed shards.

Bad input never stops a job: every item ends up either as a row or as a reject with a reason.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import os
import platform
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .context import JobContext
from .modelref import resolve_model
from .rejects import REJECTS_DIR, REJECTS_FILE, write_jsonl_atomic
from .shards import (
    JOB_FILE, MANIFEST_FILE, PLAN_FILE, SHARDS_DIR, ShardStore, atomic_write_json, crashpoint,
    fixed_list_to_numpy, read_table,
)
from .runtime_choice import AUTO, choose_runtime
from .sources import Item, Source, resolve_source

__all__ = ["EmbedOptions", "EmbedJob", "EmbedResult", "Embeddings", "JobMismatchError", "JobLockedError", "embed",
           "read_embeddings", "read_manifest"]

FORMAT = "cliplab-embeddings"
FORMAT_VERSION = 1
ENGINES = ("local", "ray")
WHAT = ("auto", "image", "text")
_IDENTITY_OPTIONS = ("what", "dtype", "normalize", "truncate", "shard_size")


class JobMismatchError(ValueError):
    """The output directory holds a different job (source, model or options); resume refused."""


class JobLockedError(RuntimeError):
    """Another process is writing to the same output directory."""


@dataclass
class EmbedOptions:
    """Job settings. ``what``: ``auto`` embeds every image and caption present, ``image``/``text`` only one kind
    (items without it are rejected). ``truncate=False`` rejects captions longer than the context instead of cutting
    them. ``workers``: decode threads (local) or CPUs (ray); default ``min(8, cpu_count)``. ``progress``: a bar on
    stderr (``None``: a bar on a terminal, a plain line every 10 s otherwise; ``cliplab.progress``). ``precision``:
    ``fp32`` (exact) or ``bf16`` (the model's fast mode; recorded in the job, so a rerun cannot mix the two).
    ``backend``: ``torch`` (default), or ``onnxruntime`` / ``openvino`` on the model's ONNX export (exported on first
    use, cached by weight fingerprint; precisions as :func:`cliplab.export.load_backend` offers them; local engine,
    CPU only; recorded in the job like ``precision``). ``"auto"`` for either (the CLI's default) picks the fastest
    full-fidelity runtime here, or the one an existing job in the output directory was started with
    (:mod:`cliplab.pipeline.runtime_choice`). ``compile``: run the torch model through ``torch.compile``
    (:meth:`cliplab.CLIP.set_compiled`: minutes of compiling first, then faster; the same features to float rounding,
    so not part of the job's identity; local engine, torch backend); a mode name (``"max-autotune"``) compiles in
    that mode."""

    batch_size: int = 64
    text_batch_size: int = 256
    shard_size: int = 1000
    workers: int | None = None
    dtype: str = "float32"
    normalize: bool = True
    truncate: bool = True
    what: str = "auto"
    device: str = "cpu"
    engine: str = "local"
    progress: bool | None = None
    precision: str = "fp32"
    backend: str = "torch"
    compile: bool | str = False

    def __post_init__(self):
        for name in ("batch_size", "text_batch_size", "shard_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.workers is None:
            self.workers = max(1, min(8, os.cpu_count() or 1))
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be float32 or float16, got {self.dtype!r}")
        if self.what not in WHAT:
            raise ValueError(f"what must be one of {WHAT}, got {self.what!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if AUTO not in (self.backend, self.precision):  # else checked once the job has resolved them
            self.check_runtime()

    def check_runtime(self) -> None:
        """The backend, precision and compile settings make a runnable combination (a one-line ValueError if not)."""
        if self.backend == "torch":
            if self.precision not in ("fp32", "bf16"):
                hint = "; int8 runs on backend='onnxruntime'" if self.precision == "int8" else ""
                raise ValueError(f"precision must be fp32 or bf16 with backend='torch', got {self.precision!r}{hint}")
        else:
            from ..export.backends import check_backend

            check_backend(self.backend, self.precision)
            if self.engine != "local" or self.device != "cpu":
                raise ValueError(f"backend={self.backend!r} runs on the local engine on the CPU: use "
                                 "--engine local --device cpu, or backend='torch'")
        from ..models.compiled import compile_mode

        compile_mode(self.compile)  # a mode torch.compile does not know is a one-line ValueError
        if self.compile and (self.backend != "torch" or self.engine != "local"):
            raise ValueError("compile runs the torch backend on the local engine (ONNX backends and Ray workers "
                             "use their own graphs)")


# --------------------------------------------------------------------------------------------------------------------
# the job

def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: changed and removed item ids listed in the manifest, at most (the counts are exact)
MAX_LISTED_CHANGES = 100


def _item_changed(old: Item, new: Item) -> bool:
    """Same id, different content: another path or caption, or a file whose size or modification time moved."""
    if (old.path, old.caption, old.key) != (new.path, new.caption, new.key):
        return True
    return old.stamp is not None and new.stamp is not None and old.stamp != new.stamp


def describe_mismatch(old: dict, new: dict) -> str:
    """What differs between two job identities, as ``a.b: x -> y`` (nested keys flattened), for people."""
    def flat(d, prefix=""):
        out = {}
        for k, v in (d or {}).items():
            key = f"{prefix}{k}"
            out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
        return out

    a, b = flat(old), flat(new)
    for d in (a, b):  # options recorded only when not the default read as the default
        d.setdefault("options.precision", "fp32")
    diffs = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(diffs) or "unknown difference"


@dataclass
class EmbedResult:
    out_dir: Path
    manifest: dict[str, Any]
    shards_written: int
    shards_skipped: int
    seconds: float

    @property
    def changes(self) -> dict[str, Any]:
        """What this run found when it listed the source again: ``added`` (items it appended to the plan),
        ``changed`` and ``removed`` (counts; ids in ``changed_ids`` / ``removed_ids``; rows kept as they were)."""
        return self.manifest.get("source_changes", {})

    @property
    def rows(self) -> int:
        return self.manifest["counts"]["rows"]

    @property
    def rejects(self) -> int:
        return self.manifest["counts"]["rejects"]

    def read(self) -> "Embeddings":
        return read_embeddings(self.out_dir)


def _versions(engine: str) -> dict[str, str]:
    import PIL
    import pyarrow
    import torch

    from ..version import __version__

    v = {"cliplab": __version__, "python": platform.python_version(), "torch": torch.__version__,
         "numpy": np.__version__, "pillow": PIL.__version__, "pyarrow": pyarrow.__version__}
    if engine == "ray":
        try:
            import ray

            v["ray"] = ray.__version__
        except ImportError:  # pragma: no cover
            pass
    return v


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class EmbedJob:
    """One embedding job. ``source``: a SOURCE string / path or a :class:`Source`; ``model``: a ``CLIP``, a
    pretrained name, a checkpoint path, an architecture name (random weights), or ``None`` for the shipped default
    (:data:`~cliplab.pipeline.DEFAULT_MODEL`). See :class:`EmbedOptions`."""

    def __init__(self, source, out_dir, model=None, *, source_options: dict[str, Any] | None = None,
                 overwrite: bool = False, seed: int = 0, on_shard: Callable[[int, dict], None] | None = None,
                 **options):
        self.options = EmbedOptions(**options)
        self.out = Path(out_dir)
        self.source: Source = resolve_source(source, **(source_options or {}))
        self.source_spec = source if isinstance(source, str) else None
        self.overwrite = overwrite
        self.seed = seed
        self.on_shard = on_shard
        self.model, self.model_info = resolve_model(model, device=self.options.device, seed=seed)
        self.auto = {k: getattr(self.options, k) == AUTO for k in ("backend", "precision")}
        if any(self.auto.values()):
            o = self.options
            o.backend, o.precision = choose_runtime(o.backend, o.precision, engine=o.engine, device=o.device,
                                                    compile=o.compile, out_dir=self.out, overwrite=overwrite)
            o.check_runtime()
        if self.options.backend != "torch":  # the fingerprint stays that of the fp32 weights it was exported from
            from ..export.backends import load_backend

            calibration = self._calibration_images() if (self.options.backend, self.options.precision) == \
                ("openvino", "int8") else None
            self.model = load_backend(self.model, self.options.backend, self.options.precision,
                                      calibration=calibration)
        elif self.options.precision != "fp32":  # the fingerprint stays that of the fp32 weights
            if self.model_info["kind"] == "object":  # the caller's model is theirs: cast a copy
                import copy

                self.model = copy.deepcopy(self.model)
            self.model.set_precision(self.options.precision)
        if self.options.compile and not self.model.compiled:
            if self.model_info["kind"] == "object" and self.options.precision == "fp32":  # the caller's model: a copy
                import copy

                self.model = copy.deepcopy(self.model)
            from ..models.compiled import compile_mode

            self.model.set_compiled(True, mode=compile_mode(self.options.compile))
        self.store = ShardStore(self.out)
        self._done: dict[int, dict[str, Any]] = {}
        self._lock_fd: int | None = None
        self.ctx: JobContext | None = None
        self._job_meta: dict[str, Any] = {}
        self._segments: dict[int, int] = {}
        self.changes: dict[str, Any] = {"added": 0, "changed": 0, "removed": 0, "changed_ids": [], "removed_ids": []}
        self._t0 = 0.0
        self._written = 0

    def _calibration_images(self, limit: int = 300) -> list:
        """The source's first ``limit`` readable images: what OpenVINO int8 calibrates on (images like the ones to
        embed; an unreadable one is skipped here and rejected with its reason by the job)."""
        from ..models.preprocess import ImageLoadError

        out = []
        for item in self.source.iter_items():
            if item.error or not item.has_image:
                continue
            try:
                out.append(self.source.open_image(item))
            except (ImageLoadError, OSError):
                continue
            if len(out) >= limit:
                break
        if not out:
            raise ValueError("backend='openvino' with precision='int8' calibrates on the source's images and found "
                             "none: use precision='fp32' for a text-only job")
        return out

    # --- identity, lock, plan -----------------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        opts = asdict(self.options)
        options = {k: opts[k] for k in _IDENTITY_OPTIONS}
        if self.options.precision != "fp32":  # only then: jobs written before the option existed still resume
            options["precision"] = self.options.precision
        if self.options.backend != "torch":
            options["backend"] = self.options.backend
        return {"source": self.source.identity(),
                "model": {"name": self.model_info["name"], "fingerprint": self.model_info["fingerprint"]},
                "options": options}

    def _lock(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JobLockedError(f"another cliplab job is writing to {self.out}") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _wipe(self) -> None:
        for name in (JOB_FILE, PLAN_FILE, MANIFEST_FILE, REJECTS_FILE):
            (self.out / name).unlink(missing_ok=True)
        for d in (SHARDS_DIR, REJECTS_DIR):
            shutil.rmtree(self.out / d, ignore_errors=True)

    def segments_of(self, items: list[Item]) -> list[int]:
        """The plan's segment number of every item (0 for plans written before segments existed)."""
        return [self._segments.get(it.index, 0) for it in items] if self._segments else [0] * len(items)

    def _write_plan(self, items: list[Item], segments: list[int]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({
            "index": pa.array([it.index for it in items], pa.int64()),
            "id": pa.array([it.id for it in items], pa.string()),
            "path": pa.array([it.path for it in items], pa.string()),
            "caption": pa.array([it.caption for it in items], pa.string()),
            "key": pa.array([it.key for it in items], pa.int64()),
            "error": pa.array([it.error for it in items], pa.string()),
            "stamp": pa.array([it.stamp for it in items], pa.string()),
            "segment": pa.array(segments, pa.int32()),
        })
        plan_path = self.out / PLAN_FILE
        tmp = plan_path.with_name(f".{plan_path.name}.tmp-{os.getpid()}")
        pq.write_table(table, tmp, compression="zstd")
        _fsync(tmp)
        os.replace(tmp, plan_path)  # one atomic step: a grown plan is there whole, or not at all
        _fsync(self.out)  # and the rename itself survives a power cut (the shards it points at are fsynced)

    def _load_or_make_plan(self) -> list[Item]:
        import json

        import pyarrow.parquet as pq

        job_path, plan_path = self.out / JOB_FILE, self.out / PLAN_FILE
        if self.overwrite:
            self._wipe()
        ident = self.identity()
        if job_path.exists():
            meta = json.loads(job_path.read_text())
            old = {k: meta.get(k) for k in ident}
            if old != ident:
                raise JobMismatchError(f"{self.out} holds a different embedding job ({describe_mismatch(old, ident)}); "
                                       "use another output directory, or --overwrite to start over")
            if not plan_path.exists():
                raise JobMismatchError(f"{self.out}: {JOB_FILE} exists but {PLAN_FILE} is missing; --overwrite "
                                       "to start over")
            self._job_meta = meta
            self.source.restore(meta.get("source_info") or {})  # e.g. the image root the job resolved at first
            rows = pq.read_table(plan_path).to_pylist()
            items = [Item(r["index"], r["id"], r["path"], r["caption"], r["key"], r["error"], r.get("stamp"))
                     for r in rows]
            self._segments = {r["index"]: int(r.get("segment") or 0) for r in rows}
            return self._grow(items) if self.source.relist else items
        if self.store.committed():
            raise JobMismatchError(f"{self.out} holds shards but no {JOB_FILE}; --overwrite to start over")
        items = self.source.items()
        self._segments = {}
        self._write_plan(items, [0] * len(items))
        crashpoint("plan:written")
        self._job_meta = {"format": "cliplab-embed-job", "format_version": FORMAT_VERSION, **ident,
                          "source_spec": self.source_spec, "source_info": self.source.describe(),
                          "model_info": self.model_info, "n_items": len(items), "created": _now()}
        atomic_write_json(job_path, self._job_meta)
        crashpoint("job:written")
        return items

    def _grow(self, items: list[Item]) -> list[Item]:
        """List the source again: append new items as a new segment; report changed and removed ones."""
        current = self.source.items()
        known = {it.id: it for it in items}
        seen = {it.id for it in current}
        added = [it for it in current if it.id not in known]
        changed = [it.id for it in current if it.id in known and _item_changed(known[it.id], it)]
        removed = [it.id for it in items if it.id not in seen]
        self.changes = {"added": len(added), "changed": len(changed), "removed": len(removed),
                        "changed_ids": changed[:MAX_LISTED_CHANGES], "removed_ids": removed[:MAX_LISTED_CHANGES]}
        if not added:
            return items
        segment = max(self._segments.values(), default=0) + 1
        base = len(items)
        new = [Item(base + j, it.id, it.path, it.caption, it.key, it.error, it.stamp) for j, it in enumerate(added)]
        items = items + new
        segments = self.segments_of(items[:base]) + [segment] * len(new)
        self._write_plan(items, segments)
        self._segments = {it.index: seg for it, seg in zip(items, segments)}
        crashpoint("plan:grown")
        self._job_meta = {**self._job_meta, "n_items": len(items), "updated": _now(),
                          "source_info": self.source.describe()}
        atomic_write_json(self.out / JOB_FILE, self._job_meta)
        return items

    # --- manifest -------------------------------------------------------------------------------------------------
    def _shard_committed(self, k: int, stats: dict[str, Any]) -> None:
        stats = dict(stats, file=f"{SHARDS_DIR}/{self.store.shard_path(k).name}")
        self._done[k] = stats
        self._written += 1
        self._write_manifest(complete=False)
        if self.on_shard is not None:
            self.on_shard(k, stats)

    def manifest(self, complete: bool) -> dict[str, Any]:
        ctx = self.ctx
        assert ctx is not None
        shards = [self._done[k] for k in sorted(self._done)]
        total = lambda key: int(sum(s.get(key, 0) for s in shards))  # noqa: E731
        cfg = self.model.config
        columns = [f.name for f in ctx.schema]
        elapsed = time.perf_counter() - self._t0
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "complete": complete, "updated": _now(),
            "created": self._job_meta.get("created"),
            "source": self._job_meta.get("source_info", self.source.describe()),
            "source_spec": self._job_meta.get("source_spec", self.source_spec),
            "model": {**self.model_info, "config": cfg.to_dict()},
            "preprocess": dict(cfg.to_dict()["preprocess"]),
            "tokenizer": {"name": getattr(self.model, "tokenizer_id", cfg.tokenizer), "context_length": cfg.text.context_length,
                          "truncate": self.options.truncate,
                          "policy": "truncate to the context and count" if self.options.truncate
                          else "reject captions longer than the context"},
            "embedding": {"dim": ctx.dim, "dtype": self.options.dtype, "normalized": self.options.normalize,
                          "image_column": "image_embedding" if ctx.with_image else None,
                          "text_column": "text_embedding" if ctx.with_text else None, "columns": columns},
            "options": asdict(self.options),
            "precision": self.options.precision,
            "backend": self.options.backend,
            "runtime_chosen_automatically": [k for k, v in self.auto.items() if v],
            "source_changes": dict(self.changes),
            "counts": {
                "items": len(ctx.items), "shards_total": ctx.n_shards, "shards": len(shards),
                "items_done": total("n_items"), "rows": total("n_rows"), "rejects": total("n_rejects"),
                "images": total("n_images"), "texts": total("n_texts"),
                "captions_truncated": total("n_truncated"), "tokens_dropped": total("tokens_dropped"),
                "captions_too_long_rejected": total("n_too_long_rejected"),
            },
            "shards": [{k: s[k] for k in ("file", "shard", "first_index", "n_items", "n_rows", "n_rejects")
                        if k in s} for s in shards],
            "rejects_file": REJECTS_FILE,
            "last_run": {"engine": self.options.engine, "shards_written": self._written,
                         "seconds": round(elapsed, 3),
                         # share of the run's wall time the model was computing: ~1 when decoding keeps up
                         "model_seconds": round(ctx.model_seconds, 3) if self.options.engine == "local" else None,
                         "model_busy": round(ctx.model_seconds / elapsed, 4)
                         if self.options.engine == "local" and elapsed > 0 else None},
            "versions": _versions(self.options.engine),
        }

    def _write_manifest(self, complete: bool) -> dict[str, Any]:
        m = self.manifest(complete)
        atomic_write_json(self.out / MANIFEST_FILE, m)
        return m

    # --- run --------------------------------------------------------------------------------------------------
    def run(self) -> EmbedResult:
        self._t0 = time.perf_counter()
        fresh = not self.out.exists()
        self._lock()
        try:
            try:
                items = self._load_or_make_plan()
            except BaseException:
                if fresh and not (self.out / JOB_FILE).exists():  # ours, and nothing in it yet: leave no debris
                    shutil.rmtree(self.out, ignore_errors=True)
                raise
            self.store.ensure()
            self.store.cleanup()
            with_image, with_text = self._columns(items)
            self.ctx = ctx = JobContext(self, items, with_image, with_text)
            self._done = {k: v for k, v in self.store.committed().items() if k < ctx.n_shards}
            pending = [k for k in range(ctx.n_shards) if k not in self._done]
            skipped = ctx.n_shards - len(pending)
            if pending:
                # say "unfinished" before any work: a grown job must not keep its old complete manifest if killed
                self._write_manifest(complete=False)
                self._run_engine(ctx, pending)
            rejects = self.store.read_rejects(self._done)
            write_jsonl_atomic(self.out / REJECTS_FILE, rejects)
            manifest = self._write_manifest(complete=True)
            n_trunc = manifest["counts"]["captions_truncated"]
            if n_trunc:
                from ..models.tokenizer import TruncationWarning

                warnings.warn(f"{n_trunc} caption(s) were truncated to the {ctx.context_length}-token context "
                              f"({manifest['counts']['tokens_dropped']} tokens dropped; counted in the manifest)",
                              TruncationWarning, stacklevel=2)
            return EmbedResult(self.out, manifest, len(pending), skipped, time.perf_counter() - self._t0)
        finally:
            self._unlock()

    def _columns(self, items: list[Item]) -> tuple[bool, bool]:
        """Which embeddings the job's shards hold (image, text), fixed when the job is first planned: a grown job
        keeps its schema, so every shard reads as one table (a new item of another kind gets only the job's kinds,
        or is rejected as having nothing to embed)."""
        saved = self._job_meta.get("columns")
        if saved is None:
            committed = sorted(self.store.committed())
            if committed:  # a job from before the columns were recorded: its shards say
                import pyarrow.parquet as pq

                names = pq.read_schema(self.store.shard_path(committed[0])).names
                saved = {"image": "image_embedding" in names, "text": "text_embedding" in names}
            else:
                opts = self.options
                image = opts.what in ("auto", "image") and any(it.has_image and not it.error for it in items)
                text = opts.what in ("auto", "text") and any(it.caption is not None and not it.error for it in items)
                if not image and not text:  # nothing embeddable: still a valid (empty) job
                    image, text = opts.what != "text", opts.what == "text"
                saved = {"image": image, "text": text}
            self._job_meta = {**self._job_meta, "columns": saved}
            atomic_write_json(self.out / JOB_FILE, self._job_meta)
        return bool(saved["image"]), bool(saved["text"])

    def _run_engine(self, ctx: JobContext, pending: list[int]) -> None:
        from ..models.tokenizer import TruncationWarning

        from ..progress import Progress

        todo = sum(len(ctx.shard_items(k)) for k in pending)
        bar = Progress(total=len(ctx.items), initial=len(ctx.items) - todo, unit="item", desc="embed",
                       enabled=self.options.progress)
        ctx.progress = bar if bar.active else None
        try:
            with warnings.catch_warnings():  # truncation is counted per row instead of warned per batch
                warnings.simplefilter("ignore", TruncationWarning)
                if self.options.engine == "ray":
                    from .engines.ray_engine import run_ray

                    run_ray(ctx, pending)
                else:
                    from .engines.local import run_local

                    run_local(ctx, pending)
        finally:
            if ctx.progress is not None:
                ctx.progress.close()
                ctx.progress = None


def embed(source, out_dir, model=None, *, source_options: dict[str, Any] | None = None,
          overwrite: bool = False, seed: int = 0, **options) -> EmbedResult:
    """Run (or resume) an embedding job; see :class:`EmbedJob` and :class:`EmbedOptions`."""
    return EmbedJob(source, out_dir, model, source_options=source_options, overwrite=overwrite, seed=seed,
                    **options).run()


# --------------------------------------------------------------------------------------------------------------------
# reading results


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    import json

    p = Path(out_dir) / MANIFEST_FILE
    if not p.exists():
        raise FileNotFoundError(f"no {MANIFEST_FILE} in {out_dir}: not an embedding job output (cliplab embed)")
    return json.loads(p.read_text())


@dataclass
class Embeddings:
    """The rows of a job in item order. ``image``/``text`` are float32 ``[n, dim]`` (zeros where the row has none;
    see ``image_valid``/``text_valid``) or ``None`` when the job did not embed that kind."""

    index: np.ndarray
    ids: list[str]
    paths: list[str | None]
    captions: list[str | None]
    image: np.ndarray | None
    image_valid: np.ndarray | None
    text: np.ndarray | None
    text_valid: np.ndarray | None
    manifest: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


def read_embeddings(out_dir: str | os.PathLike) -> Embeddings:
    """Read every committed row of a job (finished or not) into numpy arrays."""
    manifest = read_manifest(out_dir)
    table = read_table(out_dir)
    if table is None:
        dim = manifest["embedding"]["dim"]
        empty = np.zeros((0, dim), np.float32)
        e = manifest["embedding"]
        return Embeddings(np.zeros(0, np.int64), [], [], [], empty if e["image_column"] else None,
                          np.zeros(0, bool) if e["image_column"] else None, empty if e["text_column"] else None,
                          np.zeros(0, bool) if e["text_column"] else None, manifest)
    img = txt = img_v = txt_v = None
    if "image_embedding" in table.column_names:
        img, img_v = fixed_list_to_numpy(table.column("image_embedding"))
    if "text_embedding" in table.column_names:
        txt, txt_v = fixed_list_to_numpy(table.column("text_embedding"))
    return Embeddings(table.column("index").to_numpy(), table.column("id").to_pylist(),
                      table.column("path").to_pylist(), table.column("caption").to_pylist(), img, img_v, txt, txt_v,
                      manifest)
