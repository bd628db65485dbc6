"""Evaluation datasets: a registry of adapters that turn files (or the synthetic world) into three shapes of data.

* :class:`ClassificationData`: images with integer labels and class names (zero-shot classification);
* :class:`CaptionData`: images with one or more captions each (retrieval, CLIPScore);
* :class:`WinogroundData`: pairs ``(image0, caption0, image1, caption1)`` (compositional scores).

Every image is an :class:`ImageItem`: an identity string (the embedding cache's key) and a way to load it, so cached
images are never opened. Adapters register with :func:`register_dataset`; build one with
``load_dataset(name, **options)``; ``list_datasets()`` names them.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .cache import file_identity

__all__ = [
    "ImageItem", "ClassificationData", "CaptionData", "WinogroundData", "DatasetEntry", "DATASETS",
    "register_dataset", "load_dataset", "list_datasets", "prettify_classname", "IMAGE_EXTENSIONS",
    "CIFAR10_CLASSES",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# CLIP's CIFAR-10 class names (openai/CLIP data/prompts.md), in label order; common folder spellings map onto them.
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_CIFAR10_ALIASES = {"plane": "airplane", "aeroplane": "airplane", "car": "automobile", "auto": "automobile",
                    "lorry": "truck"}


@dataclass(frozen=True)
class ImageItem:
    """``key``: identity for the cache; ``source``: a path, a PIL image, or a zero-argument callable giving one."""

    key: str
    source: Any = field(compare=False)

    def load(self):
        return self.source() if callable(self.source) else self.source

    @classmethod
    def from_path(cls, path: str | Path) -> "ImageItem":
        return cls(file_identity(path), str(path))


@dataclass
class ClassificationData:
    name: str
    classnames: list[str]
    items: list[ImageItem]
    labels: list[int]
    prompts: list[list[str]] | None = None  # the dataset's own prompts per class (used when no templates are given)
    info: dict[str, Any] = field(default_factory=dict)

    kind = "classification"

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class CaptionData:
    name: str
    items: list[ImageItem]
    captions: list[str]
    caption_image: list[int]  # index into ``items`` of each caption's image
    info: dict[str, Any] = field(default_factory=dict)

    kind = "captions"

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class WinogroundData:
    """``items[2p]``/``items[2p+1]`` are pair p's image0/image1, ``captions[2p]``/``captions[2p+1]`` its captions."""

    name: str
    items: list[ImageItem]
    captions: list[str]
    kinds: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    scenes: list[Any] | None = None  # synthetic scenes of ``items`` (same order), when known: region-aware scorers

    kind = "winoground"

    def __len__(self) -> int:
        return len(self.kinds)


@dataclass
class DatasetEntry:
    name: str
    kind: str
    builder: Callable[..., Any]
    help: str
    path_option: str | None  # the option the CLI's --data fills

    def options(self) -> dict[str, Any]:
        sig = inspect.signature(self.builder)
        return {n: (None if p.default is inspect.Parameter.empty else p.default) for n, p in sig.parameters.items()}


DATASETS: dict[str, DatasetEntry] = {}
_KINDS = ("classification", "captions", "winoground", "cir")


def register_dataset(name: str, kind: str, *, path_option: str | None = None, overwrite: bool = False):
    """Decorator: register ``builder(**options) -> data`` under ``name``. ``kind`` is ``"classification"``,
    ``"captions"``, ``"winoground"`` or ``"cir"`` (composed image retrieval, :mod:`cliplab.cir`); ``path_option`` names the option that the CLI's ``--data`` sets."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")

    def deco(fn):
        if name in DATASETS and not overwrite:
            raise ValueError(f"dataset {name!r} is already registered")
        doc = (inspect.getdoc(fn) or "").split("\n\n")[0].replace("\n", " ")
        DATASETS[name] = DatasetEntry(name, kind, fn, doc, path_option)
        return fn

    return deco


def list_datasets(kind: str | None = None) -> list[str]:
    return sorted(n for n, e in DATASETS.items() if kind is None or e.kind == kind)


def load_dataset(name: str, **options):
    """Build dataset ``name`` with ``options`` (unknown options are refused by name)."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {list_datasets()}")
    entry = DATASETS[name]
    known = entry.options()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"dataset {name!r}: unknown options {unknown}; it takes {sorted(known)}")
    data = entry.builder(**options)
    data.info.setdefault("dataset", name)
    data.info.setdefault("options", {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()})
    return data


# --- class names -----------------------------------------------------------------------------------------------------
def prettify_classname(folder: str) -> str:
    """Folder name -> class name: strips a numeric prefix (``"003_bird"``, ``"3.bird"``), turns ``_``/``-`` into
    spaces, splits camelCase, lower-cases all-caps-free words (``"maple_tree"`` -> ``"maple tree"``,
    ``"PickupTruck"`` -> ``"pickup truck"``)."""
    s = re.sub(r"^\d+[._\-\s]+", "", folder)
    s = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", s)
    s = re.sub(r"[_\-]+", " ", s)
    s = " ".join(s.split())
    return s.lower() if s and not s.isupper() else s


def _cifar10_name(folder: str) -> str:
    name = prettify_classname(folder)
    return _CIFAR10_ALIASES.get(name, name)


def _read_classnames(spec) -> list[str] | dict[str, str] | None:
    """``classnames`` option: a list, a dict folder->name, or a file (``.json`` list/dict, or one name per line)."""
    if spec is None or isinstance(spec, (list, dict)):
        return spec
    import json

    path = Path(spec)
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


# --- file adapters ---------------------------------------------------------------------------------------------------
def _folder_classification(root, per_class, classnames, extensions, namer, name) -> ClassificationData:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder at {root}")
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise ValueError(f"{root}: no class subfolders")
    exts = tuple(e.lower() for e in extensions)
    names_spec = _read_classnames(classnames)
    if isinstance(names_spec, list):
        if len(names_spec) != len(folders):
            raise ValueError(f"classnames: {len(names_spec)} names for {len(folders)} class folders")
        names = list(names_spec)
    elif isinstance(names_spec, dict):
        names = [names_spec.get(d.name, namer(d.name)) for d in folders]
    else:
        names = [namer(d.name) for d in folders]
    items, labels = [], []
    for label, d in enumerate(folders):
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in exts and f.is_file())
        if per_class is not None:
            files = files[: int(per_class)]
        items += [ImageItem.from_path(f) for f in files]
        labels += [label] * len(files)
    if not items:
        raise ValueError(f"{root}: no images with extensions {exts}")
    return ClassificationData(name, names, items, labels,
                              info={"root": str(root), "folders": [d.name for d in folders],
                                    "names_from": "folders" if names_spec is None else "classnames"})


@register_dataset("image-folder", "classification", path_option="root")
def image_folder(root: str, per_class: int | None = None, classnames=None,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS) -> ClassificationData:
    """One subfolder per class (sorted folder order = label order); class names prettified from folder names.

    ``per_class`` keeps the first N files (sorted) of each class; ``classnames`` overrides the names (a list in
    folder order, a dict folder->name, or a .json/.txt file)."""
    return _folder_classification(root, per_class, classnames, extensions, prettify_classname, "image-folder")


@register_dataset("cifar-folder", "classification", path_option="root")
def cifar_folder(root: str, per_class: int | None = None, classnames=None,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS) -> ClassificationData:
    """A CIFAR-style image folder (``<class>/NNNN.jpg``), class names mapped onto CLIP's CIFAR-10 names.

    Common spellings (``plane``, ``car``, ``automobile``) become CLIP's (``airplane``, ``automobile``); other names
    (e.g. CIFAR-100's ``maple_tree``) are prettified (``maple tree``)."""
    return _folder_classification(root, per_class, classnames, extensions, _cifar10_name, "cifar-folder")


@register_dataset("captions-csv", "captions", path_option="csv_path")
def captions_csv(csv_path: str, images: str | None = None, limit: int | None = None, image_column: str = "image",
                 caption_column: str = "caption", encoding: str = "utf-8") -> CaptionData:
    """A table (CSV/TSV/JSONL/Parquet) of ``image,caption`` rows (several rows per image allowed). Relative image paths
    follow the rule every command uses (``cliplab.data.tables.image_root_for``): ``images`` when given, else the
    table's folder, or the ``images/`` folder beside it when the paths are there. Rows that do not decode
    (``encoding``) are left out with a warning naming file and line; an image that is missing is an error naming its
    line (the benchmark would change). ``limit`` keeps the first N images (in order of first appearance) and all
    their captions."""
    import warnings

    from ..data.tables import image_root_for, read_table_rows

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"no captions CSV at {csv_path}")
    table = read_table_rows(csv_path, encoding)
    missing = {image_column, caption_column} - set(table.columns)
    if missing:
        raise ValueError(f"{csv_path}: missing columns {sorted(missing)} (has {table.columns})")
    bad = [e for e in table.errors if e]
    if bad:
        warnings.warn(f"{len(bad)} row(s) of {csv_path} left out: {'; '.join(bad[:3])}" + (" ..." if len(bad) > 3
                                                                                          else ""), stacklevel=2)
    order: dict[str, int] = {}
    first_line: dict[str, int] = {}
    captions, caption_image = [], []
    for row, line, error in zip(table.rows, table.lines, table.errors):
        name, caption = row.get(image_column), row.get(caption_column)
        if error or not name or not caption:
            continue
        if name not in order:
            if limit is not None and len(order) >= int(limit):
                continue
            order[name] = len(order)
            first_line[name] = line
        captions.append(caption)
        caption_image.append(order[name])
    if not order:
        raise ValueError(f"{csv_path}: no rows")
    root, note = image_root_for(csv_path, list(order), images)
    if note:
        warnings.warn(note, stacklevel=2)
    image_dir = Path(root)
    items = []
    for name in order:
        path = image_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{csv_path.name}:{first_line[name]}: image {name!r} not found in {image_dir} "
                                    "(the images option sets the folder)")
        items.append(ImageItem.from_path(path))
    return CaptionData("captions-csv", items, captions, caption_image,
                       info={"csv": str(csv_path), "images": str(image_dir)})


# --- the synthetic world ---------------------------------------------------------------------------------------------
def _synthetic_key(builder: str, params: dict[str, Any], index) -> str:
    ps = ",".join(f"{k}={params[k]!r}" for k in sorted(params))
    return f"synthetic:{builder}:{ps}:{index}"


@register_dataset("synthetic-zeroshot", "classification")
def synthetic_zeroshot(kind: str = "colour", n_per_class: int = 10, seed: int = 0,
                       image_size: int = 64) -> ClassificationData:
    """Single-object synthetic scenes labelled by ``kind``: ``colour``, ``shape`` or ``colour_shape``; carries the
    task's own prompts (``"a red circle"``, ...) for use when no templates are given."""
    from ..data.synthetic import zero_shot_task

    task = zero_shot_task(kind, n_per_class, image_size=image_size, seed=seed)
    params = {"kind": kind, "n_per_class": n_per_class, "seed": seed, "image_size": image_size}
    items = [ImageItem(_synthetic_key("zero_shot_task", params, i), img) for i, img in enumerate(task.images)]
    return ClassificationData(f"synthetic-zeroshot-{kind}", list(task.classnames), items, list(task.labels),
                              prompts=[list(p) for p in task.prompts], info={"synthetic": params})


@register_dataset("synthetic-winoground", "winoground")
def synthetic_winoground(n: int = 100, seed: int = 0, image_size: int = 64,
                         kinds: Sequence[str] | str = ("colour", "size", "texture", "relation")) -> WinogroundData:
    """``n`` Winoground-style pairs: same objects and words, attribute or relation swapped (cycling ``kinds``)."""
    from ..data.synthetic import winoground_pairs

    kinds = [k.strip() for k in kinds.split(",")] if isinstance(kinds, str) else list(kinds)
    pairs = winoground_pairs(n, kinds=kinds, image_size=image_size, seed=seed)
    params = {"seed": seed, "image_size": image_size, "kinds": tuple(kinds)}
    items, captions = [], []
    for p, pair in enumerate(pairs):
        items += [ImageItem(_synthetic_key("winoground_pairs", params, (p, 0)), pair.image0),
                  ImageItem(_synthetic_key("winoground_pairs", params, (p, 1)), pair.image1)]
        captions += [pair.caption0, pair.caption1]
    return WinogroundData("synthetic-winoground", items, captions, [p.kind for p in pairs],
                          info={"synthetic": {**params, "n": n}},
                          scenes=[s for pair in pairs for s in (pair.scene0, pair.scene1)])


@register_dataset("synthetic-retrieval", "captions")
def synthetic_retrieval(n: int = 100, seed: int = 0, image_size: int = 64, caption: str = "short",
                        offset: int = 0) -> CaptionData:
    """A retrieval gallery of ``n`` scenes of the synthetic world (``SceneWorld(seed)``, scenes ``offset..``), one
    caption each (``short`` or ``long``). Images render lazily, so cached ones are never drawn."""
    from ..data.synthetic import SceneWorld

    if caption not in ("short", "long"):
        raise ValueError("caption must be 'short' or 'long'")
    world = SceneWorld(image_size=image_size, seed=seed)
    params = {"seed": seed, "image_size": image_size}
    items, captions = [], []
    for i in range(offset, offset + n):
        scene = world.sample(i)
        captions.append(scene.short_caption if caption == "short" else scene.long_caption)
        items.append(ImageItem(_synthetic_key("SceneWorld.sample", params, i),
                               lambda i=i: world.sample(i).render()))
    return CaptionData("synthetic-retrieval", items, captions, list(range(n)),
                       info={"synthetic": {**params, "n": n, "offset": offset, "caption": caption}})
