"""Binary codes and Hamming-space search: packing {0,1} codes, a FAISS binary index, and the XOR-popcount reference.

Shared by anything that retrieves with short binary codes (Binary Paragraph Vectors in :mod:`.binary_pv_dsg`). The
FAISS index (``faiss.IndexBinaryFlat``: exhaustive search, distances by XOR + popcount on packed bytes) is the fast
path; :func:`hamming_distances` is the plain numpy reference it is tested against.
"""

from __future__ import annotations

import numpy as np

__all__ = ["pack_codes", "unpack_codes", "hamming_distances", "hamming_ranking", "HammingIndex"]

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int32)


def pack_codes(codes) -> np.ndarray:
    """``{0,1}`` codes ``[n, bits]`` (bits a multiple of 8) -> packed bytes ``[n, bits / 8]`` (first bit = MSB)."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be [n, bits], got shape {codes.shape}")
    if codes.shape[1] % 8:
        raise ValueError(f"{codes.shape[1]} bits: use a multiple of 8 (FAISS packs codes in bytes)")
    if not np.isin(codes, (0, 1)).all():
        raise ValueError("codes must be exactly 0 or 1; round them first")
    return np.packbits(codes.astype(np.uint8), axis=1)


def unpack_codes(packed: np.ndarray) -> np.ndarray:
    return np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=1)


def hamming_distances(queries: np.ndarray, database: np.ndarray) -> np.ndarray:
    """Reference Hamming distances ``[q, n]`` of packed codes: popcount of the bytewise XOR."""
    q, d = np.asarray(queries, dtype=np.uint8), np.asarray(database, dtype=np.uint8)
    return _POPCOUNT[q[:, None, :] ^ d[None, :, :]].sum(axis=2)


def hamming_ranking(distances: np.ndarray) -> np.ndarray:
    """Row-wise ranking by distance, ties broken by the lower database index (a stable sort)."""
    return np.argsort(distances, axis=1, kind="stable")


class HammingIndex:
    """Exhaustive Hamming search over packed codes with ``faiss.IndexBinaryFlat``."""

    def __init__(self, bits: int):
        import faiss

        if bits % 8:
            raise ValueError(f"{bits} bits: use a multiple of 8")
        self.bits = int(bits)
        self.index = faiss.IndexBinaryFlat(self.bits)

    def add(self, packed: np.ndarray) -> "HammingIndex":
        packed = np.ascontiguousarray(packed, dtype=np.uint8)
        if packed.shape[1] * 8 != self.bits:
            raise ValueError(f"codes of {packed.shape[1] * 8} bits for an index of {self.bits}")
        self.index.add(packed)
        return self

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, packed_queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(distances [q, k], ids [q, k])``, nearest first."""
        dist, ids = self.index.search(np.ascontiguousarray(packed_queries, dtype=np.uint8), int(k))
        return dist.astype(np.int64), ids.astype(np.int64)

    def rank(self, packed_queries: np.ndarray) -> np.ndarray:
        """Every database id per query, by distance, ties by lower id (matches :func:`hamming_ranking`)."""
        dist, ids = self.search(packed_queries, len(self))
        order = np.lexsort((ids, dist), axis=1)
        return np.take_along_axis(ids, order, axis=1)
