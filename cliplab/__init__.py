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
    load,
    register_config,
)

from .index import Index  # noqa: E402  (the vector index: Index.build / Index.load / index.search)
from .export import load_onnx  # noqa: E402  (the ONNX Runtime backend; onnxruntime is imported on first use)

from .version import __version__  # noqa: E402

__all__ = [
    "CLIP", "CheckpointError", "ModelConfig", "convert", "create_model", "get_config", "list_models",
    "list_pretrained", "load", "register_config", "Index", "load_onnx", "__version__",
]
