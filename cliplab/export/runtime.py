"""``OnnxCLIP``: the plain inference API of :class:`cliplab.CLIP`, run by ONNX Runtime on an exported directory.

Loading reads JSON and ONNX protobufs only (no pickles, no code from the directory). One ``InferenceSession`` per
tower is created on first use, so a text-only job never loads the image graph.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ..models.clip import encode_in_length_order
from .deps import require
from .graphs import IMAGE_INPUT, TEXT_INPUT
from .manifest import OnnxExportError, read_config, read_manifest

if TYPE_CHECKING:
    from ..models.config import ModelConfig
    from ..models.preprocess import Preprocessor
    from ..models.hf_tokenizer import CheckpointTokenizer
    from ..models.tokenizer import CLIPTokenizer, TokenizedBatch


def _maybe_normalize(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    return F.normalize(x, dim=-1) if normalize else x


class OnnxCLIP:
    """An exported CLIP run by ONNX Runtime: ``encode_image``, ``encode_text``, ``encode_texts``, ``encode_images``,
    ``tokenize``, ``preprocess`` behave like :class:`cliplab.CLIP`'s plain path and return CPU float32 tensors.

    Token-level outputs, hooks and interventions need the PyTorch model; they are not part of this backend.
    """

    def __init__(self, directory: str | Path, quantized: bool = False, threads: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",)):
        self.directory = Path(directory)
        self.manifest: dict[str, Any] = read_manifest(self.directory)
        self.config: ModelConfig = read_config(self.directory)
        self.quantized = quantized
        self.threads = threads if threads is not None else torch.get_num_threads()
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        self.providers = list(providers)
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._check_files()

    @classmethod
    def load(cls, directory: str | Path, quantized: bool = False, threads: int | None = None,
             providers: Sequence[str] = ("CPUExecutionProvider",)) -> OnnxCLIP:
        """Open an export directory. ``quantized`` selects the int8 graphs; ``threads`` sets ONNX Runtime's
        intra-op threads (default ``torch.get_num_threads()``)."""
        require("onnxruntime")
        return cls(directory, quantized=quantized, threads=threads, providers=providers)

    # --- towers ------------------------------------------------------------------------------------------------------
    @property
    def towers(self) -> tuple[str, ...]:
        """The towers this directory holds (``"image"``, ``"text"``)."""
        return tuple(self.manifest["towers"])

    def _file(self, tower: str) -> Path:
        entry = self.manifest["towers"].get(tower)
        if entry is None:
            raise OnnxExportError(f"the {tower} tower was not exported to {self.directory} (exported: "
                                  f"{', '.join(self.towers)}); export it with export_onnx(model, dir, "
                                  f"towers=({tower!r},))")
        if not self.quantized:
            return self.directory / entry["file"]
        if not entry.get("int8_file"):
            raise FileNotFoundError(f"{self.directory}: no int8 {tower} graph; run quantize_onnx({str(self.directory)!r}) "
                                    "or export with quantize='int8'")
        return self.directory / entry["int8_file"]

    def _check_files(self) -> None:
        """Fail at load time, not at the first batch, when int8 graphs are asked for but absent, or a listed graph
        file is gone."""
        if self.quantized and not self.manifest.get("quantized"):
            raise FileNotFoundError(f"{self.directory}: no int8 graphs; run quantize_onnx({str(self.directory)!r}) "
                                    "or export with quantize='int8'")
        for entry in self.manifest["towers"].values():
            name = entry.get("int8_file") if self.quantized else entry["file"]
            if name and not (self.directory / name).is_file():
                raise FileNotFoundError(f"{self.directory / name} is listed in the manifest but missing")

    def session(self, tower: str):
        """The tower's ``onnxruntime.InferenceSession``, created on first use."""
        session = self._sessions.get(tower)
        if session is None:
            path = self._file(tower)  # raises for a tower that was not exported, before taking the lock
            with self._lock:
                session = self._sessions.get(tower)
                if session is None:
                    session = self._sessions[tower] = self._new_session(path)
        return session

    def _new_session(self, path: Path):
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1  # the graphs are one chain of ops: parallelism is inside each op
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(str(path), options, providers=self.providers)

    # --- encoders ----------------------------------------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor | np.ndarray, normalize: bool = False) -> torch.Tensor:
        """``[B, 3, S, S]`` preprocessed pixels -> ``[B, embed_dim]`` image features (unnormalised by default)."""
        x = np.ascontiguousarray(_to_numpy(pixels, torch.float32))
        s = self.config.vision.image_size
        if x.ndim != 4 or x.shape[1:] != (3, s, s):
            raise ValueError(f"expected pixels of shape [B, 3, {s}, {s}], got {list(x.shape)}; "
                             "use model.preprocess(...) to resize")
        if x.shape[0] == 0:
            return torch.empty(0, self.config.embed_dim)
        (out,) = self.session("image").run(None, {IMAGE_INPUT: x})
        return _maybe_normalize(torch.from_numpy(out), normalize)

    def encode_text(self, tokens: torch.Tensor | np.ndarray | TokenizedBatch, normalize: bool = False) -> torch.Tensor:
        """``[B, L]`` token ids (or a :class:`TokenizedBatch`) -> ``[B, embed_dim]`` text features.

        The batch is cut to its longest sequence (through the last row's EOT) before it runs: exact, like the
        PyTorch path, because causal attention and EOT pooling make trailing padding irrelevant."""
        ids = tokens.ids if hasattr(tokens, "ids") else tokens
        ids = _to_numpy(ids, torch.int64)
        if ids.ndim != 2:
            raise ValueError(f"expected token ids of shape [B, L], got {list(ids.shape)}")
        if ids.shape[1] > self.config.text.context_length:
            raise ValueError(f"token ids have length {ids.shape[1]} > context length {self.config.text.context_length}")
        if ids.shape[0] == 0:
            return torch.empty(0, self.config.embed_dim)
        if self.config.text.causal and self.config.text.pool == "eot":  # SigLIP: padding counts, never cut
            ids = ids[:, : int(self.eot_index(ids).max()) + 1]
        (out,) = self.session("text").run(None, {TEXT_INPUT: np.ascontiguousarray(ids)})
        return _maybe_normalize(torch.from_numpy(out), normalize)

    def eot_index(self, ids: np.ndarray) -> np.ndarray:
        """First EOT position per row; rows without one: the largest id's (as ``TextTower.eot_index``)."""
        is_eot = ids == self.config.text.eot_token_id
        return np.where(is_eot.any(-1), is_eot.argmax(-1), ids.argmax(-1))

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, normalize: bool = False) -> torch.Tensor:
        """Tokenize and encode a list of strings; rows come back in input order (batches sorted by length, each
        cut to its own longest text, as :meth:`cliplab.CLIP.encode_texts`)."""
        return encode_in_length_order(self, texts, batch_size, normalize)

    def encode_images(self, images: Iterable, batch_size: int = 64, normalize: bool = False) -> torch.Tensor:
        """Preprocess and encode PIL images or paths in batches."""
        images = list(images)
        out = [self.encode_image(self.preprocessor.batch(images[i : i + batch_size]), normalize)
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.config.embed_dim)

    def forward(self, pixels, tokens) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits_per_image, logits_per_text)`` like :meth:`cliplab.CLIP.forward`."""
        logits = self.logit_scale.exp() * self.encode_image(pixels, True) @ self.encode_text(tokens, True).t()
        if self.manifest.get("logit_bias") is not None:  # SigLIP
            logits = logits + float(self.manifest["logit_bias"])
        return logits, logits.t()

    __call__ = forward

    # --- text and image front ends (the same classes as the PyTorch model) -------------------------------------------
    @cached_property
    def tokenizer(self) -> CLIPTokenizer | CheckpointTokenizer:
        """The exported model's own tokenizer (``tokenizer.json`` written by the export), else OpenAI's BPE."""
        from ..models.hf_tokenizer import TOKENIZER_FILE, CheckpointTokenizer
        from ..models.tokenizer import CLIPTokenizer

        if (self.directory / TOKENIZER_FILE).is_file():
            return CheckpointTokenizer.from_dir(self.directory, context_length=self.config.text.context_length,
                                                pool=self.config.text.pool)
        return CLIPTokenizer(context_length=self.config.text.context_length)

    @property
    def tokenizer_id(self) -> str:
        tok = self.tokenizer
        return tok.fingerprint if hasattr(tok, "fingerprint") else self.config.tokenizer

    def tokenize(self, texts: str | Sequence[str], truncate: bool = True) -> TokenizedBatch:
        """Tokenize to this model's context length; truncation is reported (warning + flags), or refused."""
        return self.tokenizer(texts, context_length=self.config.text.context_length, truncate=truncate, stacklevel=3)

    @cached_property
    def preprocessor(self) -> Preprocessor:
        from ..models.preprocess import PreprocessConfig, Preprocessor

        return Preprocessor(PreprocessConfig(**vars(self.config.preprocess)))

    def preprocess(self, image) -> torch.Tensor:
        """A PIL image (or path / bytes) -> ``[3, S, S]`` normalised pixels."""
        return self.preprocessor(image)

    # --- bookkeeping -------------------------------------------------------------------------------------------------
    @property
    def logit_scale(self) -> torch.Tensor:
        """The exported model's logit scale (a 0-d tensor, as the PyTorch model's parameter reads)."""
        return torch.tensor(float(self.manifest["logit_scale"]))

    @property
    def temperature(self) -> float:
        return 1.0 / math.exp(float(self.manifest["logit_scale"]))

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """Inputs and features are float32 (int8 graphs quantise weights inside; see :attr:`quantized`)."""
        return torch.float32

    def eval(self) -> OnnxCLIP:
        """A no-op, so code written for ``nn.Module`` models runs unchanged."""
        return self

    def __repr__(self) -> str:
        kind = "int8" if self.quantized else "fp32"
        return (f"OnnxCLIP({self.config.name!r}, {str(self.directory)!r}, {kind}, towers={list(self.towers)}, "
                f"threads={self.threads})")


def load_onnx(directory: str | Path, quantized: bool = False, threads: int | None = None,
              providers: Sequence[str] = ("CPUExecutionProvider",)) -> OnnxCLIP:
    """Open a directory written by :func:`cliplab.export.export_onnx` (see :meth:`OnnxCLIP.load`)."""
    return OnnxCLIP.load(directory, quantized=quantized, threads=threads, providers=providers)


def _to_numpy(x, dtype: torch.dtype) -> np.ndarray:
    """A tensor (any device or dtype, bf16 included) or array-like as a NumPy array of ``dtype``."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=dtype).numpy()
    return np.asarray(x, dtype=torch.empty(0, dtype=dtype).numpy().dtype)
