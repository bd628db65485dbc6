"""Synthetic "scene world": seeded scenes of coloured shapes with exact captions.

Designed so that the known failure modes of CLIP-style models can be trained
on and measured without any external data: attribute binding, spatial
relations, counting, long descriptions, small objects in clutter, brightness
and rendered text.  Depends on numpy and PIL only.

Layout:
    vocabulary  closed vocabulary (``VOCABULARY``) and brightness transform
    geometry    shape outlines, boxes, relations, regions
    scene       ``SceneObject``, ``Scene``, ``SceneWorld`` (sampling, layout)
    render      PIL rasteriser with exact per-object masks
    captions    short/long caption grammar, parser, semantic diff
    foils       hard-negative caption foils
    tasks       zero-shot, Winoground, composed retrieval, few-shot, datasets
"""

from .captions import (
    CaptionParseError,
    caption_diff,
    long_caption_content,
    long_caption_text,
    parse_caption,
    parse_long_caption,
    parse_short_caption,
    short_caption_content,
    short_caption_text,
)
from .foils import FOIL_KINDS, Foil, make_foils
from .render import render, render_with_masks
from .scene import Scene, SceneObject, SceneWorld, layout_ok
from .tasks import (
    CIRTriplet,
    FewShotExample,
    FewShotSplit,
    SceneDataset,
    WinogroundPair,
    ZeroShotTask,
    apply_modification,
    brightness_variants,
    cir_triplets,
    few_shot_split,
    parse_modification,
    modification_text,
    winoground_pairs,
    write_image_folder,
    zero_shot_task,
)
from .vocabulary import (
    BRIGHTNESS,
    COLOURS,
    RELATIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    VOCABULARY,
    WORDS,
    apply_brightness,
)

__all__ = [
    "VOCABULARY", "SHAPES", "COLOURS", "SIZES", "TEXTURES", "RELATIONS", "BRIGHTNESS", "WORDS",
    "apply_brightness",
    "SceneObject", "Scene", "SceneWorld", "layout_ok",
    "render", "render_with_masks",
    "CaptionParseError", "parse_caption", "parse_short_caption", "parse_long_caption", "caption_diff",
    "short_caption_content", "short_caption_text", "long_caption_content", "long_caption_text",
    "Foil", "FOIL_KINDS", "make_foils",
    "ZeroShotTask", "zero_shot_task", "WinogroundPair", "winoground_pairs",
    "CIRTriplet", "cir_triplets", "parse_modification", "modification_text", "apply_modification",
    "FewShotExample", "FewShotSplit", "few_shot_split",
    "SceneDataset", "write_image_folder", "brightness_variants",
]
