"""``OpenVINOCLIP``: the plain inference API of :class:`cliplab.CLIP`, run by OpenVINO on an ONNX export directory.

OpenVINO (``pip install openvino``) compiles the exported ``image.onnx`` / ``text.onnx`` for the CPU with two hints:

* ``PERFORMANCE_HINT``: the image tower compiles for ``THROUGHPUT`` (several streams, each with a share of the
  cores) and runs batches through an ``AsyncInferQueue`` in chunks of ``queue_batch`` images (by default the best
  chunk found for ViT-B/32 at each precision, :data:`DEFAULT_QUEUE_BATCH`), so the streams work side by side. The
  text tower compiles for ``LATENCY`` (one stream with every core): ``encode_texts`` runs one length-sorted batch
  after another, and a single text query is the common case (search, serve). ``performance_hint`` overrides both.
* ``INFERENCE_PRECISION_HINT``: ``f32`` (``precision="fp32"``) or ``bf16``. OpenVINO runs bf16 only where the CPU
  multiplies bf16 natively (AVX512-BF16 / AMX); elsewhere it silently keeps f32. :meth:`OpenVINOCLIP.inference_precision`
  reads back what the compiled model really uses.

``precision="int8"`` runs OpenVINO's own int8 graphs, written by NNCF post-training quantisation
(:mod:`cliplab.export.openvino_int8`, calibrated on your images); a tower without one (by default the text tower)
runs f32. OpenVINO is not given the export's dynamic int8 graphs (ONNX Runtime's ``DynamicQuantizeLinear`` +
``MatMulInteger``, from :func:`cliplab.export.quantize_onnx`): it runs them slower than its own f32 graphs
(shapes-tiny, one thread, measured under load: 0.74x the f32 images/s at batch 32, 0.47x the texts/s).

Compiled models are cached in ``<export>/openvino_cache/<precision>`` (OpenVINO's ``CACHE_DIR``): the next process
that opens the same export with the same settings loads the blob instead of compiling
(:meth:`OpenVINOCLIP.loaded_from_cache`). One folder per precision, because OpenVINO 2026.4 on an AVX-512 CPU without
native bf16 loaded a bf16 compile from a folder that held the f32 one and returned NaN features (found by
tests/test_backends.py; a bf16 compile in its own folder, fresh or cached, is correct).
Everything else (manifest checks, tokenizer, preprocessing, length-ordered text batching, the cut of text padding to
the longest EOT, input validation) is :class:`~cliplab.export.OnnxCLIP`'s, inherited unchanged: the two runtimes
see the same inputs.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .deps import NNCF_HINT, MissingDependencyError
from .manifest import openvino_int8_file
from .runtime import OnnxCLIP

OPENVINO_HINT = "pip install openvino"
CACHE_SUBDIR = "openvino_cache"
#: cliplab precision -> OpenVINO INFERENCE_PRECISION_HINT
INFERENCE_PRECISIONS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: the NNCF graphs; the rest in f32
PERFORMANCE_HINTS = ("throughput", "latency")
DEFAULT_HINTS = {"image": "throughput", "text": "latency"}
#: image rows per async request, by precision: the best chunk for ViT-B/32 at batch 64, one process, interleaved (f32
#: on 2 AVX-512 cores; bf16 and int8 on 2 AMX cores, 2026-12-07: bf16 108/132/142/146/79 images/s at 4/8/16/32/64,
#: int8 164/178/191/180/86 at 4/8/16/32/64)
DEFAULT_QUEUE_BATCH = {"fp32": 8, "bf16": 32, "int8": 16}


def require_openvino() -> ModuleType:
    """``import openvino``, or a :class:`MissingDependencyError` with the one-line install hint."""
    try:
        return importlib.import_module("openvino")
    except ImportError as e:
        raise MissingDependencyError(f"the OpenVINO backend needs the package 'openvino', which is not installed: "
                                     f"{OPENVINO_HINT}") from e


class CompiledTower:
    """One tower compiled by OpenVINO, with ``run(None, {name: array})`` as ONNX Runtime's ``InferenceSession`` has
    (so :class:`OnnxCLIP`'s encoders drive it unchanged). Inputs larger than ``queue_batch`` rows go through an
    ``AsyncInferQueue`` in chunks of ``queue_batch``; smaller ones through one synchronous request. A lock makes
    each call atomic: OpenVINO's requests and queues are not safe to share between threads."""

    def __init__(self, compiled, queue_batch: int | None):
        self.compiled = compiled
        self.queue_batch = queue_batch
        self.input_name = compiled.inputs[0].get_any_name()
        self._lock = threading.Lock()
        self._request = compiled.create_infer_request()
        self._queue = None  # created on the first large batch

    @property
    def jobs(self) -> int:
        """Requests in flight in the async queue (OpenVINO's optimal number for the compiled streams)."""
        return int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))

    def run(self, output_names, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """``[features]`` for ``{input_name: array}`` (``output_names`` is ignored: each graph has one output)."""
        (x,) = feed.values()
        if self.queue_batch is None or len(x) <= self.queue_batch:
            with self._lock:  # share_outputs=False (the default, said here): a copy, not the request's buffer
                return [self._request.infer({self.input_name: x}, share_outputs=False)[0]]
        with self.stream(len(x)) as stream:
            stream.submit(x, 0)
        return [stream.out]

    @contextlib.contextmanager
    def stream(self, rows: int):
        """Hold the tower while batches are submitted with ``stream.submit(x, first_row)``; their features land in
        ``stream.out`` (``[rows, D]``), complete when the block ends. Submitting returns once the chunks are queued,
        so the caller prepares the next batch while OpenVINO runs this one."""
        with self._lock:
            if self._queue is None:
                self._queue = require_openvino().AsyncInferQueue(self.compiled, self.jobs)
            stream = _Stream(self, self._queue, rows)
            try:
                yield stream
            finally:
                self._queue.wait_all()
                # drop the queue's hold on the stream (queue -> callback -> stream -> tower -> queue): left as a
                # cycle, the queue would be destroyed by the garbage collector at a random later moment
                self._queue.set_callback(_no_callback)


def _no_callback(request, userdata) -> None:
    pass


class _Stream:
    """Chunks submitted to an ``AsyncInferQueue``, their outputs written into one array by the callback."""

    def __init__(self, tower: CompiledTower, queue, rows: int):
        self.tower, self.queue = tower, queue
        self.out = np.empty((rows, tower.compiled.outputs[0].get_partial_shape()[1].get_length()), np.float32)
        queue.set_callback(self._collect)

    def _collect(self, request, rows: slice) -> None:
        self.out[rows] = request.get_output_tensor(0).data

    def submit(self, x: np.ndarray, first_row: int) -> None:
        step = self.tower.queue_batch or len(x)
        for start in range(0, len(x), step):
            rows = slice(first_row + start, first_row + min(start + step, len(x)))
            self.queue.start_async({self.tower.input_name: np.ascontiguousarray(x[start : start + step])}, rows)


class OpenVINOCLIP(OnnxCLIP):
    """An exported CLIP run by OpenVINO on the CPU: the plain API of :class:`cliplab.CLIP` (``encode_image``,
    ``encode_images``, ``encode_text``, ``encode_texts``, ``tokenize``, ``preprocess``), CPU float32 tensors out.

    ``precision``: ``"fp32"``, ``"bf16"`` (OpenVINO's bf16 inference precision; f32 on CPUs without native
    bf16) or ``"int8"`` (the export's NNCF int8 graphs, :mod:`cliplab.export.openvino_int8`; towers without one run
    bf16 where the CPU has it natively, else f32). ``threads``: OpenVINO's ``INFERENCE_NUM_THREADS`` (default
    ``torch.get_num_threads()``). ``performance_hint``: ``"throughput"`` or ``"latency"`` for both towers (default:
    throughput for images, latency for texts). ``queue_batch``: rows per async request for image batches (``None``:
    one synchronous request per batch; default ``"auto"``: :data:`DEFAULT_QUEUE_BATCH` for the precision).
    ``cache_dir``: where compiled models are cached (default
    ``<directory>/openvino_cache/<precision>``; ``False`` disables the cache). ``config``: extra OpenVINO properties, applied last.
    Each tower is compiled on first use.
    """

    def __init__(self, directory: str | Path, precision: str = "fp32", threads: int | None = None,
                 performance_hint: str | None = None, queue_batch: int | str | None = "auto",
                 cache_dir: str | Path | bool | None = None, config: dict[str, Any] | None = None):
        if precision not in INFERENCE_PRECISIONS:
            raise ValueError(f"precision must be one of {list(INFERENCE_PRECISIONS)}, got {precision!r}")
        if performance_hint is not None and performance_hint not in PERFORMANCE_HINTS:
            raise ValueError(f"performance_hint must be one of {PERFORMANCE_HINTS} or None, got {performance_hint!r}")
        if queue_batch == "auto":
            queue_batch = DEFAULT_QUEUE_BATCH[precision]
        if queue_batch is not None and (not isinstance(queue_batch, int) or queue_batch < 1):
            raise ValueError(f"queue_batch must be >= 1 or None, got {queue_batch}")
        super().__init__(directory, quantized=False, threads=threads)
        if precision == "int8" and not (self.manifest.get("openvino_int8") or {}).get("towers"):
            raise FileNotFoundError(f"{self.directory}: no OpenVINO int8 graphs yet; they are calibrated on your "
                                    "images: `cliplab embed IMAGES -o OUT --backend openvino --precision int8` makes "
                                    "them (as do load_backend(..., calibration=images) and cliplab.export."
                                    f"openvino_int8.quantize_openvino; {NNCF_HINT}); ONNX Runtime's dynamic int8 "
                                    "needs no calibration: backend onnxruntime")
        self.precision = precision
        self.performance_hint = performance_hint
        self.queue_batch = queue_batch
        if cache_dir is False:
            self.cache_dir = None
        else:
            self.cache_dir = Path(cache_dir) if cache_dir not in (None, True) else \
                self.directory / CACHE_SUBDIR / precision
        self.extra_config = dict(config or {})

    @classmethod
    def load(cls, directory: str | Path, precision: str = "fp32", threads: int | None = None,
             performance_hint: str | None = None, queue_batch: int | str | None = "auto",
             cache_dir: str | Path | bool | None = None, config: dict[str, Any] | None = None) -> OpenVINOCLIP:
        """Open an export directory (see the class docstring for the options)."""
        require_openvino()
        return cls(directory, precision=precision, threads=threads, performance_hint=performance_hint,
                   queue_batch=queue_batch, cache_dir=cache_dir, config=config)

    # --- compilation -------------------------------------------------------------------------------------------------
    def compile_config(self, tower: str) -> dict[str, Any]:
        """The OpenVINO properties ``tower`` is compiled with."""
        hint = self.performance_hint or DEFAULT_HINTS[tower]
        precision = INFERENCE_PRECISIONS[self.precision]
        if self.precision == "int8" and openvino_int8_file(self.directory, tower) is None:
            # a tower int8 does not cover runs bf16 where the CPU has it: well inside int8's 0.999 bar (ViT-B/32 texts
            # 0.99994) and 4x the f32 rate on AMX (781 against 183 texts/s)
            from ..models.hardware import native_bf16

            precision = "bf16" if native_bf16() else "f32"
        config: dict[str, Any] = {"PERFORMANCE_HINT": hint.upper(),
                                  "INFERENCE_PRECISION_HINT": precision,
                                  "INFERENCE_NUM_THREADS": self.threads}
        if self.cache_dir is not None:
            config["CACHE_DIR"] = str(self.cache_dir)
        config.update(self.extra_config)
        return config

    def session(self, tower: str) -> CompiledTower:
        """The tower compiled by OpenVINO (a :class:`CompiledTower`), on first use."""
        compiled = self._sessions.get(tower)
        if compiled is None:
            path = self._file(tower)  # raises for a tower that was not exported, before taking the lock
            with self._lock:
                compiled = self._sessions.get(tower)
                if compiled is None:
                    compiled = self._sessions[tower] = self._compile(tower, path)
        return compiled

    def _compile(self, tower: str, path: Path) -> CompiledTower:
        ov = require_openvino()
        if self.precision == "int8":
            path = openvino_int8_file(self.directory, tower) or path
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        compiled = ov.Core().compile_model(str(path), "CPU", self.compile_config(tower))
        return CompiledTower(compiled, self.queue_batch if tower == "image" else None)

    def loaded_from_cache(self, tower: str) -> bool:
        """Whether ``tower``'s compiled model came from the cache instead of a compilation (compiles it if needed)."""
        return bool(self.session(tower).compiled.get_property("LOADED_FROM_CACHE"))

    def inference_precision(self, tower: str = "image") -> str:
        """The precision OpenVINO really runs ``tower`` in (``"f32"`` or ``"bf16"``), after its CPU check."""
        return self.session(tower).compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    # --- encoders ----------------------------------------------------------------------------------------------------
    def encode_images(self, images: Iterable, batch_size: int = 64, normalize: bool = False) -> torch.Tensor:
        """Preprocess and encode PIL images or paths in batches of ``batch_size``. Each batch goes into the async
        queue (chunks of ``queue_batch``) and the next one is preprocessed while OpenVINO runs it."""
        images = list(images)
        if not images:
            return torch.empty(0, self.config.embed_dim)
        with self.session("image").stream(len(images)) as stream:
            for i in range(0, len(images), batch_size):
                stream.submit(self.preprocessor.batch(images[i : i + batch_size]).float().numpy(), i)
        feats = torch.from_numpy(stream.out)
        return F.normalize(feats, dim=-1) if normalize else feats

    def __repr__(self) -> str:
        return (f"OpenVINOCLIP({self.config.name!r}, {str(self.directory)!r}, {self.precision}, "
                f"towers={list(self.towers)}, threads={self.threads}, queue_batch={self.queue_batch})")


def load_openvino(directory: str | Path, precision: str = "fp32", threads: int | None = None,
                  performance_hint: str | None = None, queue_batch: int | str | None = "auto",
                  cache_dir: str | Path | bool | None = None,
                  config: dict[str, Any] | None = None) -> OpenVINOCLIP:
    """Open a directory written by :func:`cliplab.export.export_onnx` with OpenVINO (see :class:`OpenVINOCLIP`)."""
    return OpenVINOCLIP.load(directory, precision=precision, threads=threads, performance_hint=performance_hint,
                             queue_batch=queue_batch, cache_dir=cache_dir, config=config)


__all__ = ["OPENVINO_HINT", "CompiledTower", "OpenVINOCLIP", "load_openvino", "require_openvino"]
