"""cliplab: CLIP-family vision-language embeddings with every token in reach.

Public face::

    import cliplab
    cliplab.list_models("*B-32*")
    model = cliplab.load("path/to/checkpoint")      # OpenAI / OpenCLIP / Hugging Face / cliplab layouts
    feats = model.encode_text(model.tokenize(["a photo of a dog"]), normalize=True)
"""

from .models import (
    CLIP,
    CheckpointError,
    ModelConfig,
    convert,
    create_model,
    get_config,
    list_models,
    list_pretrained,
    register_config,
)
from .models import load as _load_torch

from .index import Index  # noqa: E402  (the vector index: Index.build / Index.load / index.search)
from .export import load_onnx  # noqa: E402  (the ONNX Runtime backend; onnxruntime is imported on first use)

from .version import __version__  # noqa: E402


def load(source, *args, backend: str = "torch", export_dir=None, **kwargs):
    """Load a model (:func:`cliplab.models.load`: a pretrained name, a directory, a weights file, a cached hub id).

    ``backend="onnxruntime"`` / ``"openvino"`` return the same plain inference API (``encode_image(s)``,
    ``encode_text(s)``, ``tokenize``, ``preprocess``) run by that runtime on the model's ONNX export (made on first
    use in ``export_dir`` or a cache keyed by the weights' fingerprint), at ``precision=`` ``fp32``, ``bf16``
    (OpenVINO) or ``int8`` (ONNX Runtime); see :func:`cliplab.export.load_backend` and docs/backends.md."""
    if backend == "torch":
        if export_dir is not None:
            raise ValueError("export_dir is for backend='onnxruntime' / 'openvino'")
        return _load_torch(source, *args, **kwargs)
    if args or set(kwargs) - {"precision"}:
        raise ValueError(f"backend={backend!r} takes only precision= and export_dir= (got "
                         f"{sorted(kwargs) or 'positional arguments'}); load with backend='torch' for the rest")
    from .export import load_backend

    return load_backend(source, backend, kwargs.get("precision", "fp32"), export_dir)


__all__ = [
    "CLIP", "CheckpointError", "ModelConfig", "convert", "create_model", "get_config", "list_models",
    "list_pretrained", "load", "register_config", "Index", "load_onnx", "__version__",
]
