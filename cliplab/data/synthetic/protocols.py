"""What captioning, rendering and dataset views read from a scene: attributes, not the :class:`Scene` class.

``captions``, ``render`` and ``views`` type their arguments with these protocols, so they depend on nothing above
them and ``scene`` (which uses all three) sits on top: every import in this package points one way.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence


class ObjectLike(Protocol):
    shape: str
    colour: str
    size: str
    texture: str
    x: float
    y: float
    radius: float


class SceneLike(Protocol):
    """The fields and geometry of one scene (see :class:`cliplab.data.synthetic.Scene`)."""

    image_size: int
    objects: Sequence[ObjectLike]
    brightness: str
    background: int
    clutter: bool
    clutter_seed: int
    word: str | None
    word_shade: int

    @property
    def word_box(self) -> tuple[int, int, int, int] | None: ...

    @property
    def counts(self) -> dict[str, int]: ...

    def relation(self, i: int, j: int) -> str: ...

    def region(self, i: int) -> str: ...


class CaptionedScene(SceneLike, Protocol):
    """A scene that renders itself and has its captions (what dataset views hand out)."""

    @property
    def short_caption(self) -> str: ...

    @property
    def long_caption(self) -> str: ...

    @property
    def image(self) -> Any: ...

    def render(self) -> Any: ...


class SceneSource(Protocol):
    """Anything that gives scene number ``index`` (a :class:`SceneWorld`)."""

    def sample(self, index: int) -> CaptionedScene: ...
