"""``cliplab dense``: train, evaluate and use the seed papers' dense methods (DenseCLIP, MAFT+, CLOC) from the shell.

    cliplab dense train denseclip -o runs/dc --steps 400 --by colour
    cliplab dense eval denseclip runs/dc --json
    cliplab dense regions scene.png --boxes "4,4,30,30;32,8,60,40" --texts "a red circle,a blue star" --checkpoint DIR

``train`` fits on the synthetic world with each method's own defaults (``fit_denseclip``'s, ``MaftConfig``'s,
``ClocConfig``'s; none are copied here), saves with the method's own ``save()`` and writes ``dense.json`` beside it:
the method, the settings of the run and its held-out metric. ``eval`` loads the directory with the method's own
``load()`` and scores it with the module's evaluator on held-out scenes.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from pathlib import Path

import click

from .app import main
from .common import emit, fail, json_option, model_option, on_interrupt, out_option, progress_option, \
    render_table, warnings_to_stderr

METHOD_CHOICES = ("denseclip", "maft_plus", "cloc")
#: written beside the saved model: method, settings and held-out metric of the run
SUMMARY_FILE = "dense.json"
#: DenseCLIP's training scenes when --scenes is not given: the measured run's (docs/methods/denseclip.md);
#: fit_denseclip takes a dataset, so it has no default of its own
DENSECLIP_TRAIN_SCENES = 512
#: held-out scenes: DenseCLIP's measured run (scenes from 100,000 on), CLOC's (world seed 1); MAFT+'s is its
#: evaluator's own default
DENSECLIP_TEST_OFFSET = 100_000
DEFAULT_EVAL_SCENES = {"denseclip": 200, "cloc": 100}
CLOC_EVAL_WORLD_SEED = 1


# --- the methods, each as (train, load, evaluate) -------------------------------------------------------------------
def _eval_scenes(method: str, n: int | None) -> int:
    if n is not None:
        return n
    if method == "maft_plus":
        import inspect

        from ..dense.maft_plus import evaluate_open_vocab

        return inspect.signature(evaluate_open_vocab).parameters["n"].default
    return DEFAULT_EVAL_SCENES[method]


def _train_denseclip(clip, steps, by, scenes, seed, progress):
    import inspect

    from ..dense import SyntheticSegmentation
    from ..dense.denseclip import fit_denseclip

    defaults = {k: p.default for k, p in inspect.signature(fit_denseclip).parameters.items()
                if p.default is not inspect.Parameter.empty}
    steps = steps if steps is not None else defaults["steps"]
    scenes = scenes if scenes is not None else DENSECLIP_TRAIN_SCENES
    by = by or "shape"
    seed = seed if seed is not None else defaults["seed"]
    train = SyntheticSegmentation(n=scenes, offset=0, by=by)
    seg = fit_denseclip(clip, train, steps=steps, seed=seed, progress=progress)
    settings = {"steps": steps, "scenes": scenes, "by": by, "seed": seed,
                **{k: seg.fit_settings[k] for k in ("batch_size", "lr", "weight_decay", "backbone_lr_mult")},
                "config": seg.config.to_dict(), "final_loss": seg.history[-1]["loss"]}
    return seg, settings


def _train_maft_plus(clip, steps, by, scenes, seed, progress):
    import dataclasses

    from ..dense.maft_plus import MaftConfig, train_maft_plus

    fields = {"steps": steps, "pool_scenes": scenes, "seed": seed}
    cfg = MaftConfig(**{k: v for k, v in fields.items() if v is not None})
    maft = train_maft_plus(clip, cfg, log_every=max(1, cfg.steps // 10) if progress else 0)
    d = dataclasses.asdict(cfg)
    settings = {"steps": cfg.steps, "scenes": cfg.pool_scenes, "seed": cfg.seed, "batch_size": cfg.batch_size,
                "seen": list(cfg.seen), "config": {**d, "seen": list(cfg.seen)}}
    return maft, settings


def _train_cloc(clip, steps, by, scenes, seed, progress):
    import dataclasses

    from ..dense.cloc import ClocConfig, train_cloc

    base = ClocConfig()
    scenes = scenes if scenes is not None else base.pool_scenes
    # a batch is at most the pool (as DenseCLIP's and MAFT+'s trainers do it); ClocConfig itself refuses a smaller pool
    fields = {"steps": steps, "pool_scenes": scenes, "seed": seed, "batch_size": min(base.batch_size, scenes)}
    cfg = ClocConfig(**{k: v for k, v in fields.items() if v is not None})
    cloc = train_cloc(clip, cfg, log_every=max(1, cfg.steps // 10) if progress else 0)
    settings = {"steps": cfg.steps, "scenes": cfg.pool_scenes, "seed": cfg.seed, "batch_size": cfg.batch_size,
                "config": dataclasses.asdict(cfg)}
    return cloc, settings


def _load(method: str, directory: str):
    if method == "denseclip":
        from ..dense.denseclip import DenseCLIPSegmenter as cls
    elif method == "maft_plus":
        from ..dense.maft_plus import MaftPlus as cls
    else:
        from ..dense.cloc import ClocModel as cls
    return cls.load(directory)


def _synthetic_by(classes) -> str:
    """Which labelling of the synthetic world a DenseCLIP segmenter was fitted on (its classes say)."""
    from ..data.synthetic import SceneWorld

    world = SceneWorld(image_size=64, seed=0)
    for by, names in (("shape", world.shapes), ("colour", world.colours)):
        if tuple(classes[1:]) == tuple(names):
            return by
    raise ValueError(f"its classes ({', '.join(classes[1:])}) are not the synthetic world's shapes or colours; "
                     "cliplab dense eval scores synthetic scenes only (evaluate_segmenter in Python takes any data)")


def _evaluate(method: str, obj, n: int, settings: dict) -> dict:
    """The module's own evaluator on ``n`` held-out scenes."""
    if method == "denseclip":
        from ..dense import SyntheticSegmentation
        from ..dense.denseclip import encode_segmentation, evaluate_segmenter

        by = settings.get("by") or _synthetic_by(obj.classes)
        test = SyntheticSegmentation(n=n, offset=DENSECLIP_TEST_OFFSET, by=by)
        encoded = encode_segmentation(obj.clip, test)  # one image-tower pass serves both read-outs
        head, score = evaluate_segmenter(obj, encoded), evaluate_segmenter(obj, encoded, use="score")
        return {"miou": head["miou"], "pixel_acc": head["pixel_acc"], "score_map_miou": score["miou"],
                "iou": head["iou"], "by": by, "scenes": n, "held_out": f"scenes {DENSECLIP_TEST_OFFSET}.."}
    if method == "maft_plus":
        from ..dense.maft_plus import evaluate_open_vocab

        seen = settings.get("seen")
        if seen is None:
            from ..dense.maft_plus import MaftConfig

            seen = list(MaftConfig().seen)
            click.echo(f"note: no {SUMMARY_FILE} in the directory; taking MaftConfig's seen classes "
                       f"({', '.join(seen)})", err=True)
        res = evaluate_open_vocab(obj, seen, n=n)
        return {**res, "seen": list(seen), "scenes": n}
    from ..data.synthetic import SceneWorld
    from ..dense.cloc import cloc_embedder, region_retrieval

    world = SceneWorld(obj.model.visual.cfg.image_size, seed=CLOC_EVAL_WORLD_SEED)
    res = region_retrieval([world.sample(i) for i in range(n)], cloc_embedder(obj), obj.model.encode_texts)
    return {**res, "scenes": n, "world_seed": CLOC_EVAL_WORLD_SEED}


#: the headline figure of each method's metric, for the plain summary
HEADLINE = {"denseclip": ("miou", "head mIoU", "score_map_miou", "score-map mIoU"),
            "maft_plus": ("unseen_miou", "held-out-class mIoU", "seen_miou", "seen-class mIoU"),
            "cloc": ("pool", "region retrieval (pool)", "within_scene", "within scene")}
TRAINERS = {"denseclip": _train_denseclip, "maft_plus": _train_maft_plus, "cloc": _train_cloc}
#: the train options each method takes (the rest are a usage error for it)
APPLIES = {"denseclip": {"--steps", "--by", "--scenes", "--seed"}, "maft_plus": {"--steps", "--scenes", "--seed"},
           "cloc": {"--steps", "--scenes", "--seed"}}


def _headline(method: str, metric: dict | None) -> str:
    if not metric:
        return "no held-out evaluation (--eval-scenes 0)"
    k1, n1, k2, n2 = HEADLINE[method]
    return f"{n1} {metric[k1]:.4f}, {n2} {metric[k2]:.4f} on {metric['scenes']} held-out scenes"


@contextlib.contextmanager
def _progress_to_stderr(enabled: bool):
    """The trainers print their progress lines on stdout; here they go to stderr (stdout is the result's)."""
    with contextlib.redirect_stdout(sys.stderr if enabled else io.StringIO()):
        yield


# --- commands -------------------------------------------------------------------------------------------------------
@main.group("dense")
def dense_group():
    """The seed papers' dense methods: train DenseCLIP / MAFT+ / CLOC on the synthetic world, score a saved one,
    and embed image regions with CLOC's Prompter.

    \b
    Examples:
      cliplab dense train denseclip -o runs/dc --steps 400
      cliplab dense eval denseclip runs/dc --json
      cliplab dense regions scene.png --boxes "4,4,30,30" --texts "a red circle,a blue star" --checkpoint runs/cloc
    """


@dense_group.command("train")
@click.argument("method", type=click.Choice(METHOD_CHOICES))
@out_option(help="Directory for the trained model (must not exist or be empty, unless --overwrite).", required=True)
@model_option()
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Optimizer steps [default: the method's own: fit_denseclip 200, MaftConfig 100, ClocConfig 300].")
@click.option("--by", type=click.Choice(["shape", "colour"]), default=None,
              help="DenseCLIP only: label the scenes by shape or by colour [default: shape].")
@click.option("--scenes", type=click.IntRange(min=1), default=None,
              help="Training scenes of the synthetic world (world seed 0) [default: DenseCLIP 512 (the measured "
                   "run's), MAFT+ MaftConfig.pool_scenes, CLOC ClocConfig.pool_scenes].")
@click.option("--seed", type=int, default=None, help="Seed of the new parameters and the batches [default: 0].")
@click.option("--eval-scenes", type=click.IntRange(min=0), default=None,
              help="Held-out scenes scored after training, as cliplab dense eval does (0: skip) [default: eval's].")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty --out.")
@progress_option()
@json_option(help="Print the run's summary as JSON.")
def train_cmd(method, out_dir, model, steps, by, scenes, seed, eval_scenes, overwrite, progress, as_json):
    """Train METHOD (denseclip, maft_plus or cloc) on the synthetic world and save it to --out.

    Each method runs with its own documented defaults (docs/methods/METHOD.md); --steps, --scenes and --seed set
    the matching fields of its config (for CLOC a batch is at most --scenes). The model is saved with the method's
    own save(), with dense.json beside it (settings and held-out metric). MAFT+ and CLOC fine-tune the model's
    last image blocks; DenseCLIP keeps it frozen.

    \b
    Examples:
      cliplab dense train denseclip -o runs/dc --steps 400 --by colour
      cliplab dense train maft_plus -o runs/maft --steps 100
      cliplab dense train cloc -o runs/cloc --steps 150 --scenes 256 --json
      cliplab dense eval cloc runs/cloc
    """
    from ..pipeline import resolve_model

    given = {"--steps": steps, "--by": by, "--scenes": scenes, "--seed": seed}
    extra = [name for name, value in given.items() if value is not None and name not in APPLIES[method]]
    if extra:
        raise click.UsageError(f"{', '.join(extra)} does not apply to {method} (it takes "
                               f"{', '.join(sorted(APPLIES[method]))})")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise click.UsageError(f"--out {out} is not empty (choose another folder, or --overwrite)")
    enabled = progress is not False
    with warnings_to_stderr():
        clip, _ = resolve_model(model)
        click.echo(f"{method}: training from {clip.config.name}", err=True)
        t0 = time.perf_counter()
        with on_interrupt(f"nothing was saved to {out}; run the command again"), _progress_to_stderr(enabled):
            trained, settings = TRAINERS[method](clip, steps, by, scenes, seed, enabled)
        seconds = time.perf_counter() - t0
        out.mkdir(parents=True, exist_ok=True)
        trained.save(out)
        n_eval = _eval_scenes(method, eval_scenes)
        metric = None
        if n_eval:
            click.echo(f"{method}: scoring {n_eval} held-out scenes", err=True)
            metric = _evaluate(method, trained, n_eval, settings)
    summary = {"method": method, "model": clip.config.name, "out": str(out), **settings,
               "seconds": round(seconds, 1), "metric": metric}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    emit(summary, as_json, lambda d: click.echo(
        f"trained {d['method']} from {d['model']}: {d['steps']} steps on {d['scenes']} scenes in {d['seconds']} s; "
        f"saved to {d['out']}\n{_headline(d['method'], d['metric'])}\nscore again: cliplab dense eval {d['method']} "
        f"{d['out']}"))


@dense_group.command("eval")
@click.argument("method", type=click.Choice(METHOD_CHOICES))
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--scenes", type=click.IntRange(min=1), default=None,
              help="Held-out scenes [default: DenseCLIP 200 (from scene 100,000 on), MAFT+ 100 (world seed 1, all "
                   "eight shapes), CLOC 100 (world seed 1)].")
@json_option(help="Print the metric as JSON.")
def eval_cmd(method, directory, scenes, as_json):
    """Score a saved DenseCLIP / MAFT+ / CLOC (DIRECTORY, from cliplab dense train or the method's save()) on
    held-out synthetic scenes with the module's evaluator.

    DenseCLIP: evaluate_segmenter's mIoU (the head's, and the score maps'); MAFT+: evaluate_open_vocab's mIoU on the
    held-out and the seen classes; CLOC: region_retrieval's top-1 (among all phrases, and within each scene).

    \b
    Examples:
      cliplab dense eval denseclip runs/dc
      cliplab dense eval maft_plus runs/maft --scenes 50 --json
    """
    summary_path = Path(directory) / SUMMARY_FILE
    settings = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if settings.get("method", method) != method:
        raise click.UsageError(f"{directory} holds a {settings['method']} model, not {method} "
                               f"(cliplab dense eval {settings['method']} {directory})")
    n = _eval_scenes(method, scenes)
    with warnings_to_stderr():
        obj = _load(method, directory)
        metric = _evaluate(method, obj, n, settings)
    data = {"method": method, "directory": str(directory), "metric": metric}
    emit(data, as_json, lambda d: click.echo(f"{d['method']} {d['directory']}: {_headline(d['method'], d['metric'])}"))


def _texts(text: str) -> list[str]:
    out = [s.strip() for s in text.split(",") if s.strip()]
    if not out:
        raise click.BadParameter("give one or more texts, e.g. --texts \"a red circle,a blue star\"",
                                 param_hint="--texts")
    return out


def parse_boxes(text: str, width: int, height: int) -> list[tuple[float, float, float, float]]:
    """``"x0,y0,x1,y1;..."`` in the image's pixels (x1/y1 exclusive) -> boxes; a malformed, empty or outside box is a
    one-line usage error naming it."""
    parts = [p.strip() for p in text.split(";") if p.strip()]
    if not parts:
        raise click.BadParameter("give one or more boxes, e.g. --boxes \"4,4,30,30;32,8,60,40\"", param_hint="--boxes")
    boxes = []
    for i, p in enumerate(parts, 1):
        try:
            box = tuple(float(v) for v in p.split(","))
        except ValueError:
            box = ()
        if len(box) != 4:
            raise click.BadParameter(f"box {i} {p!r} is not x0,y0,x1,y1 (four numbers, boxes separated by ';')",
                                     param_hint="--boxes")
        x0, y0, x1, y1 = box
        if not (x1 > x0 and y1 > y0):
            raise click.BadParameter(f"box {i} {p!r} is empty: it needs x1 > x0 and y1 > y0", param_hint="--boxes")
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise click.BadParameter(f"box {i} {p!r} is outside the {width}x{height} image (0 <= x0 < x1 <= {width}, "
                                     f"0 <= y0 < y1 <= {height})", param_hint="--boxes")
        boxes.append(box)
    return boxes


def region_scores(cloc, image, boxes, texts):
    """Cosine ``[R, T]`` of each box's region embedding (the Prompter, one image forward) with each text. Boxes are
    in ``image``'s pixels; the image is resized to the model's square input without cropping, the boxes with it."""
    import torch
    import torch.nn.functional as F

    from ..dense.segment import prepare_images

    model = cloc.model
    pixels, _ = prepare_images(model, [image])
    s = model.visual.cfg.image_size
    scale = torch.tensor([s / image.width, s / image.height] * 2, dtype=torch.float32)
    with torch.no_grad():
        scaled = torch.tensor(boxes, dtype=torch.float32)[None] * scale  # [1, R, 4] in the model's input pixels
        regions = cloc.region_embeddings(pixels.to(model.device), scaled, normalize=True)[0]
        text = F.normalize(model.encode_texts(texts), dim=-1)
    return regions.float() @ text.float().T.to(regions.device)


@dense_group.command("regions")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--boxes", required=True, help="Boxes in the image's pixels, x0,y0,x1,y1 (x1/y1 exclusive), "
                                             "separated by ';', e.g. --boxes \"4,4,30,30;32,8,60,40\".")
@click.option("--texts", required=True, help="Comma-separated texts, e.g. --texts \"a red circle,a blue star\".")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False), default=None,
              help="A CLOC directory (cliplab dense train cloc, or ClocModel.save) [default: -m's model with its "
                   "untrained Prompter: RoI-masked class-token pooling].")
@model_option(help="Without --checkpoint: the model whose untrained Prompter is used (a ViT with a class token) "
                   "[default: shapes-tiny, the shipped model].")
@json_option(help="Print the scores as JSON.")
def regions_cmd(image, boxes, texts, checkpoint, model, as_json):
    """Score each box of IMAGE against each text with CLOC's region embeddings (cosine).

    One image forward serves every box: the Prompter reads the image tower's tokens with each box as a prompt.
    Without --checkpoint, the plain model's Prompter at initialisation is used (a whole-image box then gives the
    image embedding; smaller boxes are RoI-masked class-token pooling, no training).

    \b
    Examples:
      cliplab dense regions scene.png --boxes "4,4,30,30;32,8,60,40" --texts "a red circle,a star" \\
          --checkpoint runs/cloc
      cliplab dense regions scene.png --boxes "0,0,64,64" --texts "a circle,a square" --json
    """
    from ..models.preprocess import ImageLoadError, load_image

    if checkpoint is not None and model is not None:
        raise click.UsageError("-m/--model goes without --checkpoint (a CLOC directory holds its own model)")
    names = _texts(texts)
    try:
        img = load_image(image)
    except ImageLoadError as e:
        fail(f"{image}: {e.reason}", 2)
    box_list = parse_boxes(boxes, img.width, img.height)
    with warnings_to_stderr():
        if checkpoint is not None:
            from ..dense.cloc import ClocModel

            cloc = ClocModel.load(checkpoint)
            prompter = f"trained ({checkpoint})"
        else:
            from ..dense.cloc import ClocModel
            from ..pipeline import resolve_model

            net, _ = resolve_model(model)
            cloc = ClocModel(net)
            prompter = f"untrained (the Prompter of {net.config.name} at initialisation)"
            click.echo(f"note: no --checkpoint: {prompter}", err=True)
        scores = region_scores(cloc, img, box_list, names)
    rows = [{"box": [int(v) if float(v).is_integer() else v for v in b],
             "scores": {t: float(scores[i, j]) for j, t in enumerate(names)},
             "best": names[int(scores[i].argmax())]} for i, b in enumerate(box_list)]
    data = {"image": image, "size": [img.width, img.height], "model": cloc.model.config.name, "prompter": prompter,
            "texts": names, "regions": rows}

    def render(d):
        render_table(f"region-text cosine ({d['model']}, {d['prompter']})", ["box", *d["texts"], "best"],
                     [[",".join(str(v) for v in r["box"]), *(f"{r['scores'][t]:.4f}" for t in d["texts"]), r["best"]]
                      for r in d["regions"]])

    emit(data, as_json, render)
