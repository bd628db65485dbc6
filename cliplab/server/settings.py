"""What a server instance is allowed to do: limits and batching, with the defaults ``cliplab serve`` uses."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeSettings:
    """``max_upload_mb``: larger request bodies get 413. ``max_image_pixels``: larger images get 400 (checked from the
    header, before decoding). ``k_max``: the most hits one query may ask for. ``max_query_chars``: longer queries
    are cut (with a warning in the answer) before tokenizing; the model's context cuts further, also with a warning.
    ``max_embed_texts``: texts per ``/api/embed`` call. ``timeout_s``: a request waiting longer for the model gets 504.
    ``max_batch`` / ``batch_wait_ms``: micro-batching (see :class:`~cliplab.server.batcher.MicroBatcher`).
    ``precision``: the model's compute precision (``fp32`` exact, ``bf16`` fast; ``int8`` with ONNX Runtime).
    ``backend``: ``torch``, or ``onnxruntime`` / ``openvino`` on the model's ONNX export (docs/backends.md); per-word
    explanations need torch."""

    max_upload_mb: float = 20.0
    max_image_pixels: int = 50_000_000
    k_max: int = 100
    max_query_chars: int = 1000
    max_embed_texts: int = 256
    timeout_s: float = 30.0
    max_batch: int = 32
    batch_wait_ms: float = 4.0
    precision: str = "fp32"
    backend: str = "torch"
    thumb_size: int = 256

    def __post_init__(self):
        if self.max_upload_mb <= 0:
            raise ValueError(f"max_upload_mb must be > 0, got {self.max_upload_mb}")
        if self.k_max < 1:
            raise ValueError(f"k_max must be >= 1, got {self.k_max}")
        if self.backend == "torch":
            if self.precision not in ("fp32", "bf16"):
                raise ValueError(f"precision must be fp32 or bf16 with backend='torch', got {self.precision!r}")
        else:
            from ..export.backends import check_backend

            check_backend(self.backend, self.precision)
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
