"""Training-free segmentation from dense patch-text similarity maps, its evaluation, and pictures of the result.

:func:`segment` labels every pixel with the best-matching label (argmax of the similarity maps of
:func:`cliplab.dense.maps.similarity_maps`), each label's text embedding being CLIP's prompt ensemble over
``templates`` (:class:`cliplab.zeroshot.ZeroShotClassifier`). Pixels go to the background by one of three rules
(``background``):

* ``"prompt"`` (default): "background" is one more text class put through the same templates, and competes in the
  argmax (MaskCLIP's and SCLIP's way for datasets with a background class);
* ``"threshold"``: a pixel whose best label cosine is at or below ``threshold`` is background (the threshold is
  model-specific: cosines of a small model sit in another range than OpenAI's);
* ``"none"``: every pixel gets a label.

Images of any size are resized to the model's square input *without cropping* (the aspect ratio is not kept), so
that every pixel is seen; the maps are upsampled back to each image's own size. Masks hold class indices: ``0`` the
background, ``k`` the label ``labels[k]`` of :class:`SegmentationResult` (the convention of
:mod:`cliplab.dense.data`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .data import BACKGROUND
from .maps import METHODS, similarity_maps, upsample_maps
from .metrics import SegmentationMeter, segmentation_scores

__all__ = ["BACKGROUND_RULES", "SegmentationResult", "label_features", "segment", "evaluate_segmentation",
           "class_colours", "mask_image", "overlay_image", "save_segmentation", "prepare_images"]

BACKGROUND_RULES = ("prompt", "threshold", "none")


@dataclass
class SegmentationResult:
    """What :func:`segment` found, one entry per image.

    * ``masks``: ``int64 [H, W]`` per image (each image's own size): ``0`` background, ``k`` -> ``labels[k]``;
    * ``maps``: ``float32 [1 + K, H, W]`` per image: row ``k >= 1`` the cosine map of ``labels[k]``, row 0 the
      background's score (its prompt's map; the threshold, constant; ``-inf`` with ``background="none"``); the
      mask is their argmax;
    * ``labels``: ``("background", *labels)``.
    """

    masks: list[torch.Tensor]
    maps: list[torch.Tensor]
    labels: tuple[str, ...]
    method: str
    background: str
    threshold: float | None = None

    def __len__(self) -> int:
        return len(self.masks)

    def areas(self) -> list[dict[str, float]]:
        """Per image, each label's share of the pixels (0..1), background included, in label order."""
        out = []
        for mask in self.masks:
            counts = torch.bincount(mask.flatten(), minlength=len(self.labels)).double() / mask.numel()
            out.append({name: float(c) for name, c in zip(self.labels, counts)})
        return out


def _check_labels(labels: Sequence[str], background: str, background_name: str) -> list[str]:
    labels = [str(s).strip() for s in labels]
    if not labels or any(not s for s in labels):
        raise ValueError(f"segmentation needs one or more non-empty labels, got {labels}")
    seen = {}
    for i, s in enumerate(labels):
        if s.lower() in seen:
            raise ValueError(f"labels must be distinct: {s!r} is given twice (label indices {seen[s.lower()]}, {i})")
        seen[s.lower()] = i
    if background == "prompt" and background_name.lower() in seen:
        raise ValueError(f"{background_name!r} is the background's own prompt; leave it out of the labels (it is "
                         "class 0), or use background='threshold' or 'none'")
    return labels


def label_features(model, labels: Sequence[str], templates="generic") -> torch.Tensor:
    """Unit-norm text embeddings ``[K, D]`` of ``labels``, each the mean over ``templates`` (a shipped set name,
    a file, or a list of templates with ``{}``), CLIP's prompt ensembling."""
    from ..zeroshot import ZeroShotClassifier

    return ZeroShotClassifier.from_classnames(model, list(labels), templates).weights


def prepare_images(model, images) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Images (PIL / paths) or preprocessed pixels ``[B, 3, S, S]`` -> pixels ``[B, 3, S, S]`` (each image resized to
    the tower's input without cropping, then normalised as the model's preprocessor does) and each image's
    ``(H, W)``."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"pixels must be [B, 3, S, S], got {tuple(images.shape)}")
        return images, [tuple(images.shape[-2:])] * images.shape[0]
    from ..models.preprocess import Preprocessor, load_image

    pre, s = model.preprocessor, model.config.vision.image_size
    if pre.config.image_size != s:  # a config whose preprocessing was not resized with its tower
        pre = Preprocessor(dataclasses.replace(pre.config, image_size=s))
    pixels, sizes = [], []
    for src in images:
        img = load_image(src)
        sizes.append((img.height, img.width))
        pixels.append(pre(img if img.size == (s, s) else img.resize((s, s), Image.BICUBIC)))
    return torch.stack(pixels), sizes


def segment(model, images, labels: Sequence[str], *, method: str = "maskclip", background: str = "prompt",
            threshold: float | None = None, templates="generic", background_name: str = BACKGROUND,
            batch_size: int = 32, text_features: torch.Tensor | None = None) -> SegmentationResult:
    """Per-pixel labels of ``images`` (PIL images, paths, or preprocessed pixels ``[B, 3, S, S]``) among ``labels``.

    ``method``: ``"naive"``, ``"maskclip"`` or ``"sclip"`` (:mod:`cliplab.dense.maps`); ``background``: ``"prompt"``,
    ``"threshold"`` (with ``threshold``, a cosine) or ``"none"`` (module docstring); ``templates``: prompt templates
    for every label (and the background prompt ``background_name``); ``text_features`` (``[1 + K, D]`` with the
    background prompt first, or ``[K, D]`` without): precomputed text embeddings instead. Runs without gradients."""
    if method not in METHODS:
        raise ValueError(f"unknown dense method {method!r}; choose from {', '.join(METHODS)}")
    if background not in BACKGROUND_RULES:
        raise ValueError(f"background must be one of {', '.join(BACKGROUND_RULES)}, got {background!r}")
    if (background == "threshold") != (threshold is not None):
        raise ValueError("a threshold goes with background='threshold' (and that rule needs one): pass both or "
                         "neither")
    labels = _check_labels(labels, background, background_name)
    images = images if isinstance(images, torch.Tensor) else list(images)
    with torch.no_grad():
        prompts = [background_name, *labels] if background == "prompt" else labels
        text = label_features(model, prompts, templates) if text_features is None else text_features
        if text.shape[0] != len(prompts):
            raise ValueError(f"text_features has {text.shape[0]} rows for {len(prompts)} prompts ({prompts})")
        masks, maps = [], []
        for start in range(0, len(images), batch_size):
            pixels, sizes = prepare_images(model, images[start:start + batch_size])
            square = similarity_maps(model, pixels.to(model.device), text, method)  # at the input size
            for one, size in zip(square, sizes):
                one = upsample_maps(one[None], size)[0]  # back to the image's own size
                if background == "prompt":
                    full = one
                else:
                    fill = float(threshold) if background == "threshold" else float("-inf")
                    full = torch.cat([torch.full_like(one[:1], fill), one])
                maps.append(full.cpu())
                masks.append(full.argmax(0).cpu())
    return SegmentationResult(masks, maps, (background_name, *labels), method, background, threshold)


def evaluate_segmentation(model, dataset, *, method: str = "maskclip", background: str = "prompt",
                          threshold: float | None = None, templates="generic", batch_size: int = 64,
                          progress: bool | None = False) -> dict:
    """mIoU and pixel accuracy of :func:`segment` on a segmentation dataset (:mod:`cliplab.dense.data`: samples with
    ``.image`` and ``.label``; ``classes[0]`` is the background, whose name is its prompt).

    Returns ``{"miou", "miou_foreground", "pixel_acc", "iou": {class: IoU or None}, ...}``: ``miou`` averages over
    every class present (background included), ``miou_foreground`` leaves the background out."""
    from ..progress import Progress

    classes = tuple(dataset.classes)
    meter = SegmentationMeter(classes)
    with torch.no_grad():  # the prompts once, not per batch
        text = label_features(model, classes if background == "prompt" else classes[1:], templates)
    with Progress(total=len(dataset), desc=f"segment ({method})", unit="image", enabled=progress) as bar:
        for start in range(0, len(dataset), batch_size):
            samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            res = segment(model, [s.image for s in samples], classes[1:], method=method, background=background,
                          threshold=threshold, background_name=classes[0], batch_size=batch_size,
                          text_features=text)
            for mask, sample in zip(res.masks, samples):
                meter.update(mask, sample.label)
            bar.update(len(samples))
    scores = meter.result()
    foreground = segmentation_scores(meter.conf, include_background=False, classes=classes)
    return {"method": method, "background": background, "threshold": threshold,
            "templates": templates if isinstance(templates, str) else list(templates), "images": len(dataset),
            "classes": list(classes), "miou": scores["miou"], "miou_foreground": foreground["miou"],
            "pixel_acc": scores["pixel_acc"], "iou": scores["iou"]}


# --- pictures -------------------------------------------------------------------------------------------------------
#: distinct colours for labels 1.. (Glasbey-like; background draws no tint)
_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
            (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
            (0, 0, 128), (128, 128, 128)]
BACKGROUND_COLOUR = (40, 40, 40)


def class_colours(n: int) -> list[tuple[int, int, int]]:
    """RGB colours of classes ``0 .. n-1`` (class 0, the background, dark grey; the palette repeats past 20)."""
    return [BACKGROUND_COLOUR] + [_PALETTE[(k - 1) % len(_PALETTE)] for k in range(1, n)]


def mask_image(mask: torch.Tensor | np.ndarray) -> Image.Image:
    """A mask as an 8-bit one-channel PNG image whose pixel values are the class indices (what
    :class:`~cliplab.dense.data.FolderSegmentation` reads)."""
    m = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if m.size and (m.min() < 0 or m.max() > 255):
        raise ValueError(f"class indices must fit a byte (0..255), got {m.min()}..{m.max()}")
    return Image.fromarray(m.astype(np.uint8), mode="L")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
        return ImageFont.load_default()


def overlay_image(image, mask: torch.Tensor | np.ndarray, labels: Sequence[str], *, alpha: float = 0.55,
                  min_side: int = 256, areas: dict[str, float] | None = None,
                  heat: torch.Tensor | np.ndarray | None = None) -> Image.Image:
    """The image with each labelled region tinted in its class colour (background untinted), outlined, enlarged to
    at least ``min_side`` pixels, and a legend on the right (colour, label, share of the pixels).

    ``heat`` (``[H, W]``, optional): instead of the mask, draw this map (e.g. one label's similarity) as a heat map
    over the image; the legend then shows the colour scale's ends."""
    from ..models.preprocess import load_image

    img = load_image(image)
    m = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if m.shape != (img.height, img.width):
        raise ValueError(f"mask of shape {m.shape} for an image of {img.height}x{img.width}")
    scale = max(1, -(-min_side // min(img.size)))
    big = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    m = np.kron(m, np.ones((scale, scale), dtype=m.dtype))
    base = np.asarray(big, dtype=np.float32)
    colours = np.asarray(class_colours(max(len(labels), int(m.max()) + 1)), dtype=np.float32)
    if heat is not None:
        h = heat.float().cpu().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat, dtype=np.float32)
        lo, hi = float(h.min()), float(h.max())
        t = np.kron((h - lo) / (hi - lo if hi > lo else 1.0), np.ones((scale, scale), dtype=np.float32))[..., None]
        tint = (1 - t) * np.array([30, 60, 200], np.float32) + t * np.array([250, 40, 30], np.float32)
        out = (1 - alpha) * base + alpha * tint
    else:
        tint = colours[m]
        fg = (m > 0)[..., None]
        out = np.where(fg, (1 - alpha) * base + alpha * tint, base)
        edge = np.zeros(m.shape, dtype=bool)  # region borders, so touching regions stay apart
        edge[1:, :] |= m[1:, :] != m[:-1, :]
        edge[:, 1:] |= m[:, 1:] != m[:, :-1]
        out[edge] = 255.0
    canvas_img = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    font = _font(max(11, canvas_img.height // 20))
    if heat is not None:
        rows = [((250, 40, 30), f"high {hi:.3f}"), ((30, 60, 200), f"low {lo:.3f}")]
    else:
        present = sorted(set(np.unique(m).tolist()) | set(range(1, len(labels))))
        rows = []
        for k in present:
            name = labels[k] if k < len(labels) else str(k)
            share = f" {100 * areas[name]:.1f}%" if areas and name in areas else ""
            rows.append((tuple(int(c) for c in colours[k]), f"{name}{share}"))
    line = int(font.size * 1.5) if hasattr(font, "size") else 16
    draw_probe = ImageDraw.Draw(canvas_img)
    text_w = max(int(draw_probe.textlength(t, font=font)) for _, t in rows) if rows else 0
    legend_w = line + 16 + text_w
    canvas = Image.new("RGB", (canvas_img.width + legend_w, max(canvas_img.height, line * len(rows) + 8)),
                       (255, 255, 255))
    canvas.paste(canvas_img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    x0 = canvas_img.width + 6
    for i, (colour, text) in enumerate(rows):
        y = 4 + i * line
        draw.rectangle([x0, y + 2, x0 + line - 6, y + line - 4], fill=colour, outline=(0, 0, 0))
        draw.text((x0 + line, y), text, fill=(0, 0, 0), font=font)
    return canvas


def save_segmentation(result: SegmentationResult, images: Sequence, out_dir: str | Path,
                      names: Sequence[str]) -> list[dict]:
    """Write ``NAME.mask.png`` (class indices) and ``NAME.overlay.png`` per image into ``out_dir``; returns per image
    ``{"mask": path, "overlay": path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for image, mask, areas, name in zip(images, result.masks, result.areas(), names):
        mask_path, overlay_path = out / f"{name}.mask.png", out / f"{name}.overlay.png"
        mask_image(mask).save(mask_path)
        overlay_image(image, mask, result.labels, areas=areas).save(overlay_path)
        written.append({"mask": str(mask_path), "overlay": str(overlay_path)})
    return written
