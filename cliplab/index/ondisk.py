"""IVF inverted lists stored on disk (faiss ``OnDiskInvertedLists``) in ``index.ivfdata`` next to ``index.faiss``.

Why: the lists are nearly all of an IVF index (10M x 512 IVF-Flat: 20 GB). On disk, neither the build nor a query
server holds them in memory: the file is memory-mapped and a query pages in only the lists it probes.

How the build stays bounded: chunks are added to small copies of the trained empty index ("blocks", about
:data:`BLOCK_BYTES` of codes each, with their global ids), each block is written to a scratch file, and the blocks'
lists are merged into one compact ``OnDiskInvertedLists`` (``merge_from_multiple``) with the block files only
memory-mapped. Every list holds the same entries in the same order as an in-memory build adding the same chunks in
turn, so the two search alike (tested).

Relocation: faiss records the data file's name inside ``index.faiss`` and opens it from there. We record only its
base name and read with ``IO_FLAG_ONDISK_SAME_DIR`` (the name resolved against the index file's folder), so a saved
index folder can be moved or copied as a whole.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import sys
from pathlib import Path
from typing import Iterable

import numpy as np

from .faiss_ops import load_faiss

__all__ = ["ONDISK_FILE", "BLOCK_BYTES", "add_on_disk", "merge_blocks_on_disk",
           "ondisk_lists", "write_index", "read_flags", "quiet_c_stdout"]

ONDISK_FILE = "index.ivfdata"
#: codes (and ids) held in memory per block while building on disk
BLOCK_BYTES = 512 * 2**20


@contextlib.contextmanager
def quiet_c_stdout():
    """Silence what faiss's C++ code prints on file descriptor 1 (``resizing ...``, ``IO_FLAG_ONDISK_SAME_DIR:
    updating ...``), so that ``--json`` output stays clean; Python's own stdout is flushed first and restored."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):  # no real descriptor 1 (embedded interpreters)
        yield
        return
    libc = ctypes.CDLL(None)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        libc.fflush(None)  # C stdio's buffer goes to /dev/null, not to the restored descriptor later
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def ondisk_lists(index):
    """The ``OnDiskInvertedLists`` of an IVF index (also behind an OPQ rotation), or None."""
    faiss = load_faiss()
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def merge_blocks_on_disk(index, block_paths: list[Path], data_path: Path):
    """``index`` (trained, empty) with the lists of the block index files, in order, merged into a new compact
    ``OnDiskInvertedLists`` at ``data_path``. The blocks are memory-mapped, not read; they may be deleted after."""
    faiss = load_faiss()
    ivf = faiss.extract_index_ivf(index)
    blocks = [faiss.read_index(str(p), faiss.IO_FLAG_MMAP) for p in block_paths]
    lists = faiss.InvertedListsPtrVector()
    for b in blocks:
        lists.push_back(faiss.extract_index_ivf(b).invlists)
    ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(data_path))
    with quiet_c_stdout():
        total = ondisk.merge_from_multiple(lists.data(), lists.size(), False, False)  # False: keep the global ids
    ondisk.this.disown()  # the index owns it from here (else Python and faiss would both free it)
    ivf.replace_invlists(ondisk, True)
    ivf.ntotal = total
    index.ntotal = total  # an OPQ wrapper counts its own vectors
    del blocks
    return index


def add_on_disk(index, chunks: Iterable[np.ndarray], scratch: str | os.PathLike, *, block_bytes: int | None = None):
    """Add ``chunks`` (in order; ids 0..n-1) to the trained empty IVF ``index``, its lists ending up in
    ``scratch/index.ivfdata``. Memory: one block of codes (``block_bytes``, default :data:`BLOCK_BYTES`) at a
    time."""
    faiss = load_faiss()
    if index.ntotal:
        raise ValueError("add_on_disk expects an empty trained index")
    scratch = Path(scratch)
    ivf = faiss.extract_index_ivf(index)
    block_rows = max(1, (block_bytes or BLOCK_BYTES) // (ivf.code_size + 8))
    blob = faiss.serialize_index(index)
    paths: list[Path] = []
    block, start = None, 0

    def flush():
        paths.append(scratch / f"block-{len(paths):05d}.faiss")
        faiss.write_index(block, str(paths[-1]))

    for chunk in chunks:
        if block is None:
            block = faiss.deserialize_index(blob)
        block.add_with_ids(np.ascontiguousarray(chunk, np.float32),
                           np.arange(start, start + len(chunk), dtype=np.int64))
        start += len(chunk)
        if block.ntotal >= block_rows:
            flush()
            block = None
    if block is not None:
        flush()
    try:
        return merge_blocks_on_disk(index, paths, scratch / ONDISK_FILE)
    finally:
        for p in paths:
            p.unlink(missing_ok=True)


def write_index(index, directory: Path, index_name: str, tmp_name: str) -> None:
    """Write ``index`` to ``directory/index_name`` (via ``tmp_name``, then renamed); an on-disk index records its
    data file by base name and the file is put next to it (hard-linked when it can be, else copied)."""
    faiss = load_faiss()
    lists = ondisk_lists(index)
    target = directory / ONDISK_FILE
    if lists is None:
        faiss.write_index(index, str(directory / tmp_name))
        os.replace(directory / tmp_name, directory / index_name)
        if target.exists():  # an older index's lists do not belong to this one
            target.unlink()
        return
    source = Path(lists.filename)
    if not (target.exists() and os.path.samefile(source, target)):
        tmp = directory / f".{ONDISK_FILE}.{tmp_name}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:  # another file system: copy
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    recorded = lists.filename
    lists.filename = ONDISK_FILE  # relative: resolved against index.faiss's folder on load
    try:
        faiss.write_index(index, str(directory / tmp_name))
    finally:
        lists.filename = recorded
    os.replace(directory / tmp_name, directory / index_name)


def read_flags(on_disk: bool) -> int:
    """Extra ``read_index`` flags for an index whose lists are on disk: found next to the index file, mapped
    read-only."""
    if not on_disk:
        return 0
    faiss = load_faiss()
    return faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
