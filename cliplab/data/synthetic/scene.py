"""Scene description and seeded, index-addressable scene sampling."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from . import captions as _captions
from .geometry import bounding_radius, object_box, region_of, relation_between
from .render import render_with_masks, word_size
from .views import SceneDataset, write_image_folder
from .vocabulary import BRIGHTNESS, COLOURS, SHAPES, SIZE_RADIUS, SIZES, TEXTURES, WORDS

__all__ = ["SceneObject", "Scene", "SceneWorld", "layout_ok", "object_radius"]


def object_radius(size: str, image_size: int) -> float:
    return SIZE_RADIUS[size] * image_size


@dataclass(frozen=True)
class SceneObject:
    """One object: categorical attributes plus its (continuous) centre in pixels."""

    shape: str
    colour: str
    size: str
    texture: str
    x: float
    y: float
    radius: float

    @property
    def centre(self) -> tuple[float, float]:
        return (self.x, self.y)

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Pixel box (x0, y0, x1, y1), x1/y1 exclusive."""
        return object_box(self.shape, self.x, self.y, self.radius)

    def moved(self, x: float, y: float) -> "SceneObject":
        return dataclasses.replace(self, x=float(x), y=float(y))

    def with_attrs(self, image_size: int, **attrs: str) -> "SceneObject":
        """Copy with changed categorical attributes (radius follows ``size``)."""
        obj = dataclasses.replace(self, **attrs)
        if "size" in attrs:
            obj = dataclasses.replace(obj, radius=object_radius(obj.size, image_size))
        return obj


@dataclass(frozen=True)
class Scene:
    """A fully specified scene.  Rendering is a pure function of these fields."""

    image_size: int
    objects: tuple[SceneObject, ...]
    brightness: str = "normal"
    background: int = 120
    clutter: bool = False
    clutter_seed: int = 0
    word: str | None = None
    word_pos: tuple[int, int] | None = None
    word_shade: int = 245
    seed: int | None = field(default=None, compare=False)
    index: int | None = field(default=None, compare=False)

    # ----------------------------------------------------------- geometry
    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        return [o.box for o in self.objects]

    @property
    def word_box(self) -> tuple[int, int, int, int] | None:
        if not self.word:
            return None
        w, h = word_size(self.word, self.image_size)
        x, y = self.word_pos
        return (x, y, x + w, y + h)

    def relation(self, i: int, j: int) -> str:
        """Spatial relation of object ``i`` with respect to object ``j``."""
        return relation_between(self.objects[i].centre, self.objects[j].centre)

    @property
    def relations(self) -> list[tuple[int, str, int]]:
        n = len(self.objects)
        return [(i, self.relation(i, j), j) for i in range(n) for j in range(i + 1, n)]

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.objects:
            out[o.shape] = out.get(o.shape, 0) + 1
        return out

    def region(self, i: int) -> str:
        o = self.objects[i]
        return region_of(o.x, o.y, self.image_size)

    @property
    def attributes(self) -> dict[str, Any]:
        """Structured ground truth (plain Python types)."""
        return {
            "image_size": self.image_size,
            "objects": [
                {
                    "shape": o.shape,
                    "colour": o.colour,
                    "size": o.size,
                    "texture": o.texture,
                    "position": (o.x, o.y),
                    "box": o.box,
                    "region": self.region(i),
                }
                for i, o in enumerate(self.objects)
            ],
            "relations": self.relations,
            "counts": self.counts,
            "brightness": self.brightness,
            "background": self.background,
            "clutter": self.clutter,
            "word": self.word,
            "word_box": self.word_box,
        }

    # ----------------------------------------------------------- captions
    @property
    def short_caption(self) -> str:
        return _captions.short_caption(self)

    @property
    def long_caption(self) -> str:
        return _captions.long_caption(self)

    # ----------------------------------------------------------- rendering
    @cached_property
    def _rendered(self):
        img, masks = render_with_masks(self)
        masks.setflags(write=False)
        return img, masks

    def render(self):
        """A fresh RGB PIL image of the scene."""
        return self._rendered[0].copy()

    @property
    def image(self):
        """Cached RGB rendering (do not modify in place; use :meth:`render`)."""
        return self._rendered[0]

    @property
    def masks(self) -> np.ndarray:
        """Visible pixels of each object after occlusion, bool [n_objects, H, W]."""
        return self._rendered[1]

    def replace(self, **changes: Any) -> "Scene":
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------- layout


def layout_ok(
    objects: Sequence[SceneObject],
    image_size: int,
    word_box: tuple[int, int, int, int] | None = None,
    *,
    gap: float = 1.0,
    relation_margin: float = 0.0,
    border: float = 1.0,
) -> bool:
    """True when objects lie inside the image, keep ``gap`` px apart (bounding
    circles), avoid ``word_box`` and every pair has an unambiguous dominant axis."""
    for i, a in enumerate(objects):
        if not _fits(a, image_size, border) or not _clear_of_box(a, word_box, gap):
            return False
        for b in objects[:i]:
            if not _pair_ok(a, b, gap, relation_margin):
                return False
    return True


def _fits(o: SceneObject, s: int, border: float) -> bool:
    x0, y0, x1, y1 = o.box
    return x0 >= border and y0 >= border and x1 <= s - border and y1 <= s - border


def _clear_of_box(o: SceneObject, box, gap: float) -> bool:
    if box is None:
        return True
    x0, y0, x1, y1 = box
    dx = max(x0 - o.x, 0.0, o.x - x1)
    dy = max(y0 - o.y, 0.0, o.y - y1)
    return math.hypot(dx, dy) >= o.radius * bounding_radius(o.shape) + gap + 1.0


def _pair_ok(a: SceneObject, b: SceneObject, gap: float, margin: float) -> bool:
    dx = a.x - b.x
    dy = a.y - b.y
    need = a.radius * bounding_radius(a.shape) + b.radius * bounding_radius(b.shape) + gap
    if dx * dx + dy * dy < need * need:
        return False
    return abs(abs(dx) - abs(dy)) >= margin


# ----------------------------------------------------------------- world


def _choice(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
    return seq[int(rng.integers(len(seq)))]


class SceneWorld:
    """Seeded generator of synthetic scenes.

    ``world.sample(i)`` depends only on ``(seed, i)`` (and the constructor
    arguments), so datasets are reproducible and trivially shardable.
    """

    def __init__(
        self,
        image_size: int = 64,
        seed: int = 0,
        *,
        min_objects: int = 1,
        max_objects: int = 4,
        shapes: Sequence[str] | None = None,
        colours: Sequence[str] | None = None,
        sizes: Sequence[str] | None = None,
        textures: Sequence[str] | None = None,
        texture_probs: Sequence[float] | None = (0.5, 0.25, 0.25),
        brightness_probs: Mapping[str, float] | None = None,
        clutter_prob: float = 0.3,
        word_prob: float = 0.25,
        words: Sequence[str] | None = None,
        repeat_prob: float = 0.3,
        exclude_combos: Iterable[tuple[str, str]] = (),
        relation_margin: float | None = None,
        gap: float = 1.0,
    ) -> None:
        if image_size < 32:
            raise ValueError("image_size must be >= 32")
        if not 1 <= min_objects <= max_objects:
            raise ValueError("need 1 <= min_objects <= max_objects")
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.min_objects = min_objects
        self.max_objects = max_objects
        self.shapes = tuple(shapes or SHAPES)
        self.colours = tuple(colours or COLOURS)
        self.sizes = tuple(sizes or SIZES)
        self.textures = tuple(textures or TEXTURES)
        for name, vals, vocab in (
            ("shapes", self.shapes, SHAPES), ("colours", self.colours, COLOURS),
            ("sizes", self.sizes, SIZES), ("textures", self.textures, TEXTURES),
        ):
            bad = set(vals) - set(vocab)
            if bad:
                raise ValueError(f"unknown {name}: {sorted(bad)}")
        if texture_probs is not None and textures is None:
            tp = np.asarray(texture_probs, dtype=float)
        else:
            tp = np.ones(len(self.textures))
        self._texture_cdf = np.cumsum(tp / tp.sum())
        bp = dict(brightness_probs or {"dark": 0.2, "normal": 0.6, "bright": 0.2})
        if set(bp) - set(BRIGHTNESS):
            raise ValueError(f"unknown brightness levels: {sorted(set(bp) - set(BRIGHTNESS))}")
        self._brightness_levels = tuple(bp)
        p = np.asarray([bp[k] for k in self._brightness_levels], dtype=float)
        self._brightness_cdf = np.cumsum(p / p.sum())
        self.clutter_prob = float(clutter_prob)
        self.word_prob = float(word_prob)
        self.words = tuple(words or WORDS)
        self.repeat_prob = float(repeat_prob)
        self.exclude_combos = frozenset(tuple(c) for c in exclude_combos)
        self.relation_margin = 0.04 * self.image_size if relation_margin is None else float(relation_margin)
        self.gap = float(gap)

    def __repr__(self) -> str:
        return f"SceneWorld(image_size={self.image_size}, seed={self.seed})"

    # ------------------------------------------------------------ sampling
    def rng(self, index: int, *stream: int) -> np.random.Generator:
        """The generator for scene ``index`` (extra ints select sub-streams)."""
        return np.random.default_rng([self.seed, int(index), *stream])

    def sample(self, index: int) -> Scene:
        """Scene number ``index``; a pure function of ``(seed, index)``."""
        if index < 0:
            raise IndexError(index)
        rng = self.rng(index)
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        specs: list[dict[str, str]] = []
        for _ in range(n):
            specs.append(self._sample_spec(rng, specs))
        scene = self.compose(specs, rng)
        return dataclasses.replace(scene, seed=self.seed, index=int(index))

    def __getitem__(self, index: int) -> Scene:
        return self.sample(index)

    def shape_variants(self, scene: Scene, k: int, rng: np.random.Generator, tries: int = 20) -> list[Scene]:
        """``k`` scenes that differ from each other only in their objects' shapes (a minimal group).

        The first is ``scene`` itself. In the others every object takes a shape it has in no other variant (so any
        two variants differ in the shape of every object), drawn from this world's shapes and allowed colour/shape
        combinations. A draw whose shapes break the layout (shapes have different bounding circles) is redrawn, up to
        ``tries`` times; a variant that still does not fit is left out, so fewer than ``k`` may come back.
        """
        if not 1 <= k <= len(self.shapes):
            raise ValueError(f"k must be between 1 and the number of shapes ({len(self.shapes)}), got {k}")
        variants = [scene]
        for _ in range(k - 1):
            for _ in range(tries):
                objects = []
                for i, obj in enumerate(scene.objects):
                    used = {v.objects[i].shape for v in variants}
                    free = [s for s in self.shapes if s not in used and (obj.colour, s) not in self.exclude_combos]
                    if not free:  # this object has run out of allowed shapes: no further variant can exist
                        return variants
                    objects.append(obj.with_attrs(self.image_size, shape=_choice(rng, free)))
                else:
                    candidate = scene.replace(objects=tuple(objects))
                    if self.layout_ok(candidate):
                        variants.append(candidate)
                        break
        return variants

    #: Attributes :meth:`replace_attribute` can change.
    REPLACEABLE = ("shape", "colour", "size", "texture")

    def attribute_replacements(self, scene: Scene, attribute: str) -> list[Scene]:
        """Every negative of ``scene`` for its captions that changes one ``attribute`` value: a value present in the
        scene replaced, in every object that has it, by a value of this world that no object has (so each result is
        false of the image wherever a caption names that value; a caption that leaves the value out, as short captions
        leave out "plain", may stay true). Colour/shape pairs the world excludes are
        never formed. Positions stay, so relations do not change; the results are meant for their captions (a larger
        size or another shape may overlap a neighbour when rendered). In a fixed order: present values sorted, then
        the world's values in order."""
        if attribute not in self.REPLACEABLE:
            raise ValueError(f"attribute must be one of {list(self.REPLACEABLE)}, got {attribute!r}")
        values = {"shape": self.shapes, "colour": self.colours, "size": self.sizes, "texture": self.textures}[attribute]
        present = sorted({getattr(o, attribute) for o in scene.objects})
        out = []
        for old in present:
            hit = [o for o in scene.objects if getattr(o, attribute) == old]
            for new in values:
                if new in present or any(self._excluded(o, attribute, new) for o in hit):
                    continue
                objects = tuple(o.with_attrs(self.image_size, **{attribute: new}) if getattr(o, attribute) == old else o
                                for o in scene.objects)
                out.append(scene.replace(objects=objects))
        return out

    def replace_attribute(self, scene: Scene, attribute: str, rng: np.random.Generator) -> Scene | None:
        """One of :meth:`attribute_replacements`, drawn uniformly with ``rng``; ``None`` when there is none."""
        options = self.attribute_replacements(scene, attribute)
        return _choice(rng, options) if options else None

    def _excluded(self, obj: SceneObject, attribute: str, value: str) -> bool:
        """Whether giving ``obj`` this ``attribute`` value forms a colour/shape pair the world excludes."""
        if attribute == "shape":
            return (obj.colour, value) in self.exclude_combos
        if attribute == "colour":
            return (value, obj.shape) in self.exclude_combos
        return False

    def _sample_texture(self, rng: np.random.Generator) -> str:
        return self.textures[int(np.searchsorted(self._texture_cdf, rng.random(), side="right").clip(max=len(self.textures) - 1))]

    def _sample_spec(self, rng: np.random.Generator, previous: Sequence[Mapping[str, str]] = ()) -> dict[str, str]:
        for _ in range(100):
            if previous and rng.random() < self.repeat_prob:
                src = _choice(rng, previous)
                shape = src["shape"]
                colour = src["colour"] if rng.random() < 0.5 else _choice(rng, self.colours)
            else:
                shape = _choice(rng, self.shapes)
                colour = _choice(rng, self.colours)
            if (colour, shape) not in self.exclude_combos:
                break
        else:  # pragma: no cover - only with absurd exclusion sets
            raise RuntimeError("could not sample an allowed (colour, shape) combination")
        return {
            "shape": shape,
            "colour": colour,
            "size": _choice(rng, self.sizes),
            "texture": self._sample_texture(rng),
        }

    def fill_spec(self, spec: Mapping[str, str], rng: np.random.Generator) -> dict[str, str]:
        """Complete a partial object spec with random attributes."""
        out = dict(spec)
        for key in ("shape", "colour", "size", "texture"):
            if key not in out or out[key] is None:
                if key == "texture":
                    out[key] = self._sample_texture(rng)
                else:
                    out[key] = _choice(rng, getattr(self, key + "s"))
        return out

    def compose(
        self,
        specs: Sequence[Mapping[str, str]],
        rng: np.random.Generator | int,
        *,
        brightness: str | None = None,
        clutter: bool | None = None,
        word: str | None | bool = True,
        background: int | None = None,
    ) -> Scene:
        """Build a scene containing the given (possibly partial) object specs at
        random non-overlapping positions.  Unspecified scene-level attributes are
        sampled (``word=True``: sample with ``word_prob``; ``None``/``False``: none;
        a string: that word)."""
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        s = self.image_size
        specs = [self.fill_spec(sp, rng) for sp in specs]
        if brightness is None:
            u = rng.random()
            brightness = self._brightness_levels[min(int(np.searchsorted(self._brightness_cdf, u, side="right")), len(self._brightness_levels) - 1)]
        if background is None:
            background = int(rng.integers(100, 141))
        clutter_draw = rng.random()
        clutter_seed = int(rng.integers(2**31 - 1))
        if clutter is None:
            clutter = bool(clutter_draw < self.clutter_prob)
        word_draw = rng.random()
        if word is True:
            word = _choice(rng, self.words) if word_draw < self.word_prob else None
        elif word is False:
            word = None
        word_shade = 245 if rng.random() < 0.7 else 15

        for attempt in range(3):
            word_pos = None
            word_box = None
            if word:
                w, h = word_size(word, s)
                if w + 4 > s or h + 4 > s:
                    raise ValueError(f"word {word!r} does not fit in a {s}px image")
                x = int(rng.integers(2, s - w - 1))
                y = int(rng.integers(2, s - h - 1))
                word_pos = (x, y)
                word_box = (x, y, x + w, y + h)
            objects = self.place(specs, rng, word_box=word_box)
            if objects is not None:
                break
            if attempt == 1 and word:
                word = None  # a word that cannot be fitted is dropped
        else:  # pragma: no cover - layout limits make this practically unreachable
            raise RuntimeError(f"could not place {len(specs)} objects in a {s}px image")
        return Scene(
            image_size=s,
            objects=tuple(objects),
            brightness=brightness,
            background=background,
            clutter=clutter,
            clutter_seed=clutter_seed,
            word=word,
            word_pos=word_pos,
            word_shade=word_shade,
        )

    def place(
        self,
        specs: Sequence[Mapping[str, str]],
        rng: np.random.Generator,
        *,
        word_box=None,
        fixed: Sequence[SceneObject] = (),
        layouts: int = 20,
        tries: int = 60,
    ) -> list[SceneObject] | None:
        """Rejection-sample positions for ``specs`` (largest first) that keep
        ``layout_ok``; ``fixed`` objects stay where they are.  ``None`` on failure."""
        s = self.image_size
        radii = [object_radius(sp["size"], s) for sp in specs]
        order = sorted(range(len(specs)), key=lambda k: -radii[k] * bounding_radius(specs[k]["shape"]))
        for _ in range(layouts):
            placed: dict[int, SceneObject] = {}
            ok = True
            for k in order:
                sp = specs[k]
                r = radii[k]
                lo = r * bounding_radius(sp["shape"]) + 1.5
                hi = s - lo
                for _ in range(tries):
                    x, y = lo + (hi - lo) * rng.random(2)
                    cand = SceneObject(sp["shape"], sp["colour"], sp["size"], sp["texture"], float(x), float(y), r)
                    if not _fits(cand, s, 1.0) or not _clear_of_box(cand, word_box, self.gap):
                        continue
                    if all(_pair_ok(cand, o, self.gap, self.relation_margin) for o in (*placed.values(), *fixed)):
                        placed[k] = cand
                        break
                else:
                    ok = False
                    break
            if ok:
                return [placed[k] for k in range(len(specs))]
        return None

    def layout_ok(self, scene: Scene) -> bool:
        return layout_ok(scene.objects, self.image_size, scene.word_box, gap=self.gap,
                         relation_margin=self.relation_margin)

    # ------------------------------------------------------------ rendering / views
    def render(self, scene: Scene):
        """Render a scene to an RGB PIL image."""
        return scene.render()

    def dataset(self, n: int, offset: int = 0, caption: str = "short"):
        """Sequence of ``(PIL image, caption)`` for scenes ``offset .. offset+n-1``."""
        return SceneDataset(self, n, offset=offset, caption=caption)

    def write_folder(self, directory, n: int, offset: int = 0):
        """Write ``n`` scenes as PNGs plus ``captions.csv``; see :func:`views.write_image_folder`."""
        return write_image_folder(self, directory, n, offset=offset)
