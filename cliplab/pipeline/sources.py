"""Input sources for the embedding pipeline, and the registry that turns a ``SOURCE`` string into one.

A source lists *items* (an image, a caption, or both) in a deterministic order and knows how to open an item's
image. Built-in kinds:

``folder``     a directory, walked recursively (sorted, hidden entries skipped). Candidates are the files whose
               extension Pillow registers for an image format (``--all-files``: every file). Which files *are*
               images is then decided by their content, never by the extension: a GIF named ``.jpg`` is embedded,
               a text file named ``.jpg`` is rejected. Files skipped by extension are counted, not lost silently.
``table``      a ``.csv``/``.tsv``/``.jsonl``/``.ndjson``/``.parquet`` file of image paths and/or captions. Columns are
               detected (path: ``path``/``image``/``image_path``/``file``/``filename``/``filepath``; caption:
               ``caption``/``text``/``title``; id: ``id``) or named explicitly. Relative paths resolve against
               ``image_root`` (default: the table's directory).
``synthetic``  ``synthetic:N`` scenes of :class:`cliplab.data.SceneWorld`, rendered on the fly; options after a
               second colon: ``synthetic:500:seed=1,size=64,caption=long,offset=0``.

Add a kind with :func:`register_source`. Sources must be picklable (process/Ray workers rebuild nothing else).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = [
    "Item", "Source", "FolderSource", "TableSource", "SyntheticSource",
    "register_source", "resolve_source", "list_sources", "image_extensions",
]


@dataclass(frozen=True)
class Item:
    """One input. ``index`` is its position in the job's frozen plan; ``key`` is a source-specific locator (the scene
    number for synthetic sources); ``error`` marks an item that is already known to be unusable when listed (it is
    rejected with that reason, never silently dropped)."""

    index: int
    id: str
    path: str | None = None
    caption: str | None = None
    key: int | None = None
    error: str | None = None
    stamp: str | None = None  # "size:mtime_ns" of a listed file: tells a later run that it changed

    @property
    def has_image(self) -> bool:
        return self.path is not None or self.key is not None


class Source(ABC):
    """Base class: subclasses implement :meth:`iter_items` (``Item`` without a meaningful ``index``; the job numbers
    them) and :meth:`describe`; :meth:`open_image` loads an item's image as RGB (raising ``ImageLoadError``)."""

    kind = "source"
    #: a rerun lists the source again to embed new items and report changed or removed ones (incremental jobs)
    relist = True

    @abstractmethod
    def iter_items(self) -> Iterator[Item]:
        """The items of the source, in a stable order."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """A JSON-able description for the manifest."""

    def identity(self) -> dict[str, Any]:
        """What makes two runs "the same source" for resuming (settings only, nothing found while listing)."""
        return self.describe()

    def restore(self, info: dict[str, Any]) -> None:
        """Take back what the job's first run resolved (its :meth:`describe`), so a rerun lists the same way."""

    def image_input(self, item: Item):
        """What the preprocessor is given for ``item``: a path (decoded by ``load_image``) or a PIL image."""
        return item.path

    def open_image(self, item: Item):
        """The item's image as RGB PIL (``ImageLoadError`` if it cannot be read)."""
        from ..models.preprocess import load_image

        return load_image(self.image_input(item))

    def items(self) -> list[Item]:
        """All items, numbered ``0..n-1`` in listing order; ids must be unique."""
        out: list[Item] = []
        seen: dict[str, int] = {}
        for i, it in enumerate(self.iter_items()):
            if it.id in seen:
                raise ValueError(f"{self.kind} source: duplicate id {it.id!r} (items {seen[it.id]} and {i}); "
                                 "ids must be unique (pick another id column, or none to number the rows)")
            seen[it.id] = i
            out.append(Item(i, it.id, it.path, it.caption, it.key, it.error, it.stamp))
        return out


def image_extensions() -> frozenset[str]:
    """Lower-case extensions (with the dot) that Pillow registers for a format it can open."""
    from PIL import Image

    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


# --------------------------------------------------------------------------------------------------------------------
# folder


#: skipped (non-image) files named in the manifest, at most; the count is always exact
MAX_NAMED_SKIPS = 100


def file_stamp(path: str) -> str | None:
    """``"size:mtime_ns"`` of a file (None when it cannot be read): a cheap "has it changed" fingerprint."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


@dataclass
class FolderSource(Source):
    root: str
    all_files: bool = False
    skipped: int = field(default=0, init=False)
    skipped_files: list = field(default_factory=list, init=False)
    kind = "folder"

    def __post_init__(self):
        self.root = os.path.abspath(os.fspath(self.root))
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"no such directory: {self.root}")

    def iter_items(self) -> Iterator[Item]:
        exts = image_extensions()
        self.skipped = 0

        def walk_error(err: OSError):  # an unreadable sub-directory becomes a reject, not a crash
            pending_errors.append(err)

        pending_errors: list[OSError] = []
        skipped_names: list[str] = []
        entries: list[tuple[str, str | None]] = []
        for dirpath, dirnames, filenames in os.walk(self.root, onerror=walk_error, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                if not self.all_files and os.path.splitext(name)[1].lower() not in exts:
                    self.skipped += 1
                    if len(skipped_names) < MAX_NAMED_SKIPS:
                        skipped_names.append(Path(os.path.relpath(os.path.join(dirpath, name), self.root)).as_posix())
                    continue
                entries.append((os.path.join(dirpath, name), None))
        for err in pending_errors:
            entries.append((err.filename or self.root, f"cannot list directory ({err.strerror or err})"))
        entries.sort(key=lambda e: e[0])
        self.skipped_files = skipped_names[:MAX_NAMED_SKIPS]
        for path, error in entries:
            rel = Path(os.path.relpath(path, self.root)).as_posix()
            yield Item(0, rel, path, None, None, error, None if error else file_stamp(path))

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "root": self.root, "all_files": self.all_files}

    def describe(self) -> dict[str, Any]:
        return {**self.identity(), "skipped_by_extension": self.skipped, "skipped_files": list(self.skipped_files)}


# --------------------------------------------------------------------------------------------------------------------
# table

_PATH_COLUMNS = ("path", "image", "image_path", "filepath", "file", "filename", "img")
_CAPTION_COLUMNS = ("caption", "text", "title", "description")
_ID_COLUMNS = ("id",)
from ..data.tables import TABLE_SUFFIXES  # noqa: E402  (one list for every command)


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, table: str) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"{table}: no {what} column {wanted!r} (columns: {columns})")
        return wanted
    lower = {c.lower(): c for c in columns}
    for c in candidates:
        if c in lower:
            return lower[c]
    return None


@dataclass
class TableSource(Source):
    file: str
    path_column: str | None = None
    caption_column: str | None = None
    id_column: str | None = None
    image_root: str | None = None
    encoding: str = "utf-8"
    kind = "table"

    def __post_init__(self):
        self.file = os.path.abspath(os.fspath(self.file))
        if not os.path.isfile(self.file):
            raise FileNotFoundError(f"no such file: {self.file}")
        if self.image_root is not None:
            self.image_root = os.path.abspath(os.fspath(self.image_root))
            if not os.path.isdir(self.image_root):
                raise FileNotFoundError(f"image root is not a directory: {self.image_root}")
        self._columns: dict[str, str | None] | None = None
        self._root: str | None = None
        self.root_note: str | None = None

    def _read(self):
        from ..data.tables import image_root_for, read_table_rows

        table = read_table_rows(self.file, self.encoding)
        name = os.path.basename(self.file)
        cols = table.columns
        pcol = _pick(cols, self.path_column, _PATH_COLUMNS, "path", name)
        ccol = _pick(cols, self.caption_column, _CAPTION_COLUMNS, "caption", name)
        icol = _pick(cols, self.id_column, _ID_COLUMNS, "id", name)
        if pcol is None and ccol is None:
            raise ValueError(f"{name}: found neither an image path column {list(_PATH_COLUMNS)} nor a caption "
                             f"column {list(_CAPTION_COLUMNS)} among {cols}; name them with --path-column / "
                             "--caption-column")
        self._columns = {"path": pcol, "caption": ccol, "id": icol}
        if self._root is None:
            paths = [r.get(pcol) for r in table.rows] if pcol else []
            self._root, self.root_note = image_root_for(self.file, paths, self.image_root)
        return table, pcol, ccol, icol

    @property
    def root(self) -> str:
        """Where relative image paths resolve (see ``cliplab.data.tables.image_root_for``)."""
        if self._root is None:
            self._read()
        return self._root

    def iter_items(self) -> Iterator[Item]:
        table, pcol, ccol, icol = self._read()
        for n, (row, error) in enumerate(zip(table.rows, table.errors)):
            rid = row.get(icol) if icol else None
            item_id = str(n) if rid is None or rid == "" else str(rid)
            path = row.get(pcol) if pcol else None
            caption = row.get(ccol) if ccol else None
            if path is not None and not isinstance(path, str):
                error = error or f"path is a {type(path).__name__}, not a string"
                path = None
            if caption is not None and not isinstance(caption, str):
                error = error or f"caption is a {type(caption).__name__}, not a string"
                caption = None
            path = path if path and path.strip() else None
            caption = caption if caption and caption.strip() else None
            if path is not None:
                path = os.path.normpath(os.path.join(self._root, os.path.expanduser(path)))
            if error is None and path is None and caption is None:
                error = "row has neither an image path nor a caption"
            yield Item(0, item_id, path, caption, None, error)

    def identity(self) -> dict[str, Any]:
        # the root the user named (else the table's folder, as before the images/ rule): the resolved root is
        # recorded in describe() and restored on reruns, so a file deleted later cannot change the job's identity
        ident = {"kind": self.kind, "file": self.file, "image_root": self.image_root or os.path.dirname(self.file),
                 "path_column": self.path_column, "caption_column": self.caption_column, "id_column": self.id_column}
        if self.encoding != "utf-8":  # only then, so jobs written before the option existed still resume
            ident["encoding"] = self.encoding
        return ident

    def describe(self) -> dict[str, Any]:
        return {**self.identity(), "resolved_image_root": self.root, "columns_used": self._columns,
                "image_root_note": self.root_note}

    def restore(self, info: dict[str, Any]) -> None:
        if self.image_root is None and info.get("resolved_image_root"):
            self._root = info["resolved_image_root"]


# --------------------------------------------------------------------------------------------------------------------
# synthetic


@dataclass
class SyntheticSource(Source):
    n: int
    seed: int = 0
    size: int = 64
    caption: str = "short"
    offset: int = 0
    kind = "synthetic"
    relist = False  # its items follow from its settings: nothing can appear, change or vanish

    def __post_init__(self):
        if self.n < 0:
            raise ValueError(f"synthetic source needs N >= 0, got {self.n}")
        if self.caption not in ("short", "long", "none"):
            raise ValueError(f"synthetic caption must be short, long or none, got {self.caption!r}")
        self._world = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_world"] = None
        return state

    @property
    def world(self):
        if self._world is None:
            from ..data.synthetic import SceneWorld

            self._world = SceneWorld(image_size=self.size, seed=self.seed)
        return self._world

    def iter_items(self) -> Iterator[Item]:
        for i in range(self.offset, self.offset + self.n):
            scene = self.world.sample(i)
            cap = None if self.caption == "none" else (scene.short_caption if self.caption == "short"
                                                         else scene.long_caption)
            yield Item(0, f"scene-{i:07d}", None, cap, i, None)

    def image_input(self, item: Item):
        return self.world.sample(item.key).render()

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "n": self.n, "seed": self.seed, "image_size": self.size, "caption": self.caption,
                "offset": self.offset}

    @classmethod
    def parse(cls, spec: str, **options: Any) -> "SyntheticSource":
        """``synthetic:N[:key=value,...]`` (keys: seed, size, caption, offset); keyword options override."""
        parts = spec.split(":", 2)
        try:
            n = int(parts[1])
        except (IndexError, ValueError):
            raise ValueError(f"bad synthetic source {spec!r}: expected synthetic:N, e.g. synthetic:500") from None
        kw: dict[str, Any] = {}
        if len(parts) == 3 and parts[2]:
            for pair in parts[2].split(","):
                k, sep, v = pair.partition("=")
                k = k.strip()
                if not sep or k not in ("seed", "size", "caption", "offset"):
                    raise ValueError(f"bad synthetic option {pair!r} in {spec!r} (keys: seed, size, caption, offset)")
                kw[k] = v.strip() if k == "caption" else int(v)
        kw.update({k: v for k, v in options.items() if v is not None})
        return cls(n, **kw)


# --------------------------------------------------------------------------------------------------------------------
# registry


@dataclass
class _Entry:
    name: str
    match: Callable[[str], bool]
    factory: Callable[..., Source]
    help: str


_REGISTRY: list[_Entry] = []


def register_source(name: str, match: Callable[[str], bool], factory: Callable[..., Source], help: str = "",
                    first: bool = True) -> None:
    """Register a source kind: ``match(spec)`` says whether the SOURCE string is one, ``factory(spec, **options)``
    builds it (unknown options must raise ``TypeError``). New kinds are tried before the built-in ones."""
    entry = _Entry(name, match, factory, help)
    _REGISTRY[:] = [e for e in _REGISTRY if e.name != name]
    if first:
        _REGISTRY.insert(0, entry)
    else:
        _REGISTRY.append(entry)


def list_sources() -> list[dict[str, str]]:
    return [{"name": e.name, "help": e.help} for e in _REGISTRY]


def resolve_source(spec: "str | os.PathLike[str] | Source", **options: Any) -> Source:
    """A :class:`Source` for ``spec`` (a source object is returned as is). Options that are ``None`` are ignored;
    an option the source kind does not take is a ``ValueError``."""
    if isinstance(spec, Source):
        return spec
    spec = os.fspath(spec)
    options = {k: v for k, v in options.items() if v is not None and v is not False}
    for e in _REGISTRY:
        if e.match(spec):
            try:
                return e.factory(spec, **options)
            except TypeError as exc:
                if "unexpected keyword" in str(exc) or "got an unexpected" in str(exc):
                    raise ValueError(f"option(s) {sorted(options)} do not all apply to a {e.name} source "
                                     f"({exc})") from None
                raise
    if not os.path.exists(spec):
        raise FileNotFoundError(f"no such file or directory: {spec}")
    raise ValueError(f"cannot tell what kind of source {spec!r} is: expected a directory, a table "
                     f"({', '.join(TABLE_SUFFIXES)}) or synthetic:N")


def _is_table(spec: str) -> bool:
    return os.path.splitext(spec)[1].lower() in TABLE_SUFFIXES and not os.path.isdir(spec)


register_source("synthetic", lambda s: s.startswith("synthetic:"), SyntheticSource.parse,
                "synthetic:N[:seed=S,size=P,caption=short|long|none,offset=O] generated scenes", first=False)
register_source("folder", os.path.isdir, lambda s, **kw: FolderSource(s, **kw),
                "a directory of images (recursive)", first=False)
register_source("table", _is_table, lambda s, **kw: TableSource(s, **kw),
                "a CSV/TSV/JSONL/Parquet file of image paths and/or captions", first=False)
