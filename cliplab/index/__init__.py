"""Vector index and search over embedding-job output (FAISS): ``Index.build(dir)``, ``index.save(path)``,
``Index.load(path)`` (memory-mapped), ``index.search(vectors)`` / ``search_text`` / ``search_image``.
See ``docs/search.md``."""

from .core import (APPROX_THRESHOLD, KINDS, SELF_TOLERANCE, Hit, IncompleteJobError, Index, faiss_available,
                   resident_memory_mb)
from .sizing import IndexPlan, parse_bytes, plan_index

__all__ = ["Index", "Hit", "IncompleteJobError", "APPROX_THRESHOLD", "KINDS", "SELF_TOLERANCE", "faiss_available",
           "resident_memory_mb", "IndexPlan", "parse_bytes", "plan_index"]
