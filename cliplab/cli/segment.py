"""``cliplab segment``: training-free segmentation of image files among a label list (masks + overlays)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from .app import main
from .common import emit, fail, json_option, model_option, out_option, precision_option, render_table, \
    warnings_to_stderr

#: maps.METHODS, then the seed-paper segmenters (kept here, not imported: --help stays fast)
METHOD_CHOICES = ("naive", "maskclip", "sclip", "denseclip", "read_sasp", "excel")


def _labels(text: str) -> list[str]:
    out = [s.strip() for s in text.split(",") if s.strip()]
    if not out:
        raise click.BadParameter("give one or more labels, e.g. --labels \"cat,dog\"", param_hint="--labels")
    seen: dict[str, int] = {}
    for i, s in enumerate(out):
        if s.lower() in seen:
            raise click.BadParameter(f"labels must be distinct; {s!r} is given twice", param_hint="--labels")
        seen[s.lower()] = i
    return out


def _image_paths(images: tuple[str, ...]) -> list[str]:
    from ..pipeline.sources import FolderSource

    out = []
    for p in images:
        if os.path.isdir(p):
            out.extend(it.path for it in FolderSource(p).iter_items())
        else:
            out.append(p)
    return out


def _unique_names(paths: list[str]) -> list[str]:
    """Output stems: the file's stem, with ``-2``, ``-3``... when two inputs share one."""
    names, used = [], {}
    for p in paths:
        stem = Path(p).stem
        used[stem] = used.get(stem, 0) + 1
        names.append(stem if used[stem] == 1 else f"{stem}-{used[stem]}")
    return names


@main.command("segment")
@click.argument("images", nargs=-1, required=True)
@click.option("--labels", default=None, help="Comma-separated labels, e.g. --labels \"circle,square,star\" "
                                            "(required, except with --method denseclip: its checkpoint's).")
@click.option("--method", type=click.Choice(METHOD_CHOICES), default="maskclip", show_default=True,
              help="Dense maps: naive (last-layer patch tokens), maskclip (value path of the last block) or sclip "
                   "(correlative self-attention in the last block); denseclip: a fitted DenseCLIP segmenter "
                   "(--checkpoint); read_sasp: READ's similarity-as-points prompting the shipped point segmenter "
                   "(sclip maps); excel: ExCEL pseudo masks, taking every label as present in every image.")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False), default=None,
              help="With --method denseclip: a directory saved by DenseCLIPSegmenter.save (cliplab.dense.denseclip).")
@click.option("--background", type=click.Choice(["prompt", "threshold", "none"]), default="prompt",
              show_default=True, help="Background rule: a 'background' prompt competes with the labels, a cosine "
                                      "threshold (--threshold), or none (every pixel gets a label).")
@click.option("--threshold", type=float, default=None,
              help="With --background threshold: pixels whose best label cosine is at or below this are "
                   "background.")
@click.option("--templates", default="generic", show_default=True,
              help="Prompt templates: a shipped set (generic, single, synthetic) or a .txt/.json file.")
@model_option()
@precision_option()
@out_option(help="Folder for NAME.mask.png (class indices) and NAME.overlay.png.", default="cliplab-segment")
@json_option(help="Print the label areas and files as JSON.")
def segment_cmd(images, labels, method, checkpoint, background, threshold, templates, model, precision, out_dir,
                as_json):
    """Segment IMAGES (files or folders) among the given labels, without training.

    Every pixel gets the label whose text embedding is most similar to its patch feature (class 0 is the
    background). For each image, writes a mask PNG whose pixel values are class indices (0 background, k the k-th
    label) and an overlay PNG with the classes colour-coded over the image and a legend; prints each label's share
    of the pixels. Images that cannot be read are reported (exit status 1) without stopping the others.

    \b
    Examples:
      cliplab segment scene.png --labels "circle,square,star" -o masks/
      cliplab segment photos/ --labels "cat,dog" --method sclip --json
    """
    from ..dense.segment import save_segmentation, segment
    from ..models.preprocess import ImageLoadError, load_image
    from ..pipeline import resolve_model

    if (method == "denseclip") != (checkpoint is not None):
        raise click.UsageError("--checkpoint DIR goes with --method denseclip (and that method needs it)")
    if labels is None and method != "denseclip":
        raise click.UsageError("give the labels: --labels \"circle,square,star\"")
    names_list = _labels(labels) if labels is not None else None
    if (background == "threshold") != (threshold is not None):
        raise click.UsageError("--threshold goes with --background threshold (and that rule needs it)")
    paths = _image_paths(images)
    if not paths:
        fail(f"no image files found in {', '.join(images)}", 2)
    loaded, errors = [], []
    for p in paths:
        try:
            loaded.append((p, load_image(p)))
        except ImageLoadError as e:
            errors.append({"image": p, "error": e.reason})
    if not loaded:
        fail(f"no readable image ({errors[0]['image']}: {errors[0]['error']})" if len(errors) == 1 else
             f"none of the {len(errors)} images could be read (e.g. {errors[0]['image']}: {errors[0]['error']})", 2)
    for e in errors:
        click.echo(f"warning: {e['image']}: {e['error']}", err=True)
    results = []
    with warnings_to_stderr():
        if method == "denseclip":  # a trained segmenter: its own model and classes
            from ..dense.denseclip import load_for_cli

            seg = load_for_cli(checkpoint, names_list, precision)
            net, names_list = seg.clip, list(seg.classes[1:])
            res = seg.segmentation_result([im for _, im in loaded])
            background = res.background
        else:
            net, _ = resolve_model(model)
            if precision != "fp32":
                net.set_precision(precision)
            images_in = [im for _, im in loaded]
            if method in ("read_sasp", "excel"):  # their own background rule: a probability / CAM threshold
                if background != "prompt" or threshold is not None or templates != "generic":
                    raise click.UsageError(f"--method {method} has its own background rule; --background, "
                                           "--threshold and --templates do not apply")
                if method == "read_sasp":
                    from ..dense.read_sasp import sasp_segmentation as run
                else:
                    from ..dense.excel import excel_segmentation as run
                res = run(net, images_in, names_list)
                background, threshold = res.background, res.threshold
            else:
                res = segment(net, images_in, names_list, method=method, background=background,
                              threshold=threshold, templates=templates)
        stems = _unique_names([p for p, _ in loaded])
        files = save_segmentation(res, [im for _, im in loaded], out_dir, stems)
        for (p, im), areas, written in zip(loaded, res.areas(), files):
            results.append({"image": p, "size": [im.width, im.height], "areas": areas, **written})
    data = {"model": net.config.name, "method": method, "background": background, "threshold": threshold,
            "labels": ["background", *names_list],
            "out": str(out_dir), "results": results, "errors": errors}

    def render(d):
        rows = []
        for r in d["results"]:
            shown = sorted(r["areas"].items(), key=lambda kv: -kv[1])
            for j, (name, share) in enumerate(s for s in shown if s[1] > 0):
                rows.append([r["image"] if j == 0 else "", name, f"{100 * share:.1f}%"])
        render_table(f"segmentation ({d['method']}, {d['model']})", ["image", "label", "area"], rows)
        click.echo(f"wrote masks and overlays of {len(d['results'])} image(s) to {d['out']}", err=True)

    emit(data, as_json, render)
    if errors:
        fail(f"{len(errors)} of {len(paths)} image(s) could not be read", 1)
