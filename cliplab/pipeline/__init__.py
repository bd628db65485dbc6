"""Embedding pipeline: a source (image folder, CSV/JSONL/Parquet table, synthetic scenes) -> sharded Parquet
embeddings with a manifest and a rejects file; resumable after a crash at any instant; local or Ray engine.

See ``docs/pipeline.md``.
"""

from .embed import (
    EmbedJob, EmbedOptions, EmbedResult, Embeddings, JobLockedError, JobMismatchError, embed, read_embeddings,
    read_manifest,
)
from .modelref import DEFAULT_MODEL, PretrainedRef, RandomWeightsWarning, load_model_from_info, resolve_model
from .rejects import read_rejects
from .shards import read_table
from .sources import (
    FolderSource, Item, Source, SyntheticSource, TableSource, list_sources, register_source, resolve_source,
)

__all__ = [
    "embed", "EmbedJob", "EmbedOptions", "EmbedResult", "Embeddings", "JobLockedError", "JobMismatchError",
    "read_embeddings", "read_manifest", "read_rejects", "read_table",
    "DEFAULT_MODEL", "PretrainedRef", "RandomWeightsWarning", "resolve_model", "load_model_from_info",
    "Item", "Source", "FolderSource", "TableSource", "SyntheticSource", "register_source", "resolve_source",
    "list_sources",
]
