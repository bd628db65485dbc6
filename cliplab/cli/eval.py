"""``cliplab eval ...``: zero-shot classification, retrieval, CLIPScore and Winoground evaluations.

    cliplab eval zeroshot  -m M --dataset cifar-folder --data DIR --set per_class=20 --templates prompts.md#CIFAR10
    cliplab eval retrieval -m M --dataset captions-csv --data captions.csv --set limit=50
    cliplab eval clipscore -m M --dataset captions-csv --data captions.csv
    cliplab eval winoground -m M --dataset synthetic-winoground --set n=200
    cliplab eval sts -m all-MiniLM-L6-v2 --data sts-test.csv --json
    cliplab eval datasets | tasks

``-m/--model`` takes what ``cliplab embed --model`` takes (default: the shipped ``shapes-tiny``). Every run writes
``results.json`` and ``summary.md`` (and ``confusion.png`` for zero-shot) to ``-o/--out`` and prints a plain-text
summary. Image and text embeddings are cached on disk (``--cache-dir``); an interrupted run resumes from the cache.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .app import main
from .common import (
    AliasedOption,
    emit,
    json_option,
    model_option,
    out_option,
    parse_settings,
    precision_option,
    progress_option,
    set_option,
    warnings_to_stderr,
)

_DEFAULT_DATASET = {"zeroshot": "synthetic-zeroshot", "retrieval": "synthetic-retrieval",
                    "clipscore": "synthetic-retrieval", "winoground": "synthetic-winoground",
                    "sce": "synthetic-retrieval", "fclipscore": "synthetic-retrieval",
                    "cir": "synthetic-cir"}

EVAL_MODEL_HELP = ("Model, as for `cliplab embed`: a pretrained name (cliplab models), a checkpoint file or "
                   "directory, or an architecture name (seeded random weights, --seed; for smoke tests) "
                   "[default: shapes-tiny, the shipped model].")


def _common(fn):
    opts = [
        model_option(help=EVAL_MODEL_HELP),
        click.option("--random-init", is_flag=True,
                     help="Build --model as a randomly initialised architecture on purpose (no warning)."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of random weights (--random-init or an architecture name)."),
        click.option("--arch", default=None, help="Architecture of --model when it cannot be inferred."),
        click.option("--dataset", default=None, help="Registered dataset adapter (see `cliplab eval datasets`)."),
        click.option("--data", "data_path", default=None, help="The dataset's path (folder or CSV)."),
        set_option(help="Dataset option (repeatable), e.g. --set per_class=20, --set classnames=names.txt "
                        "(values parsed as JSON; see `cliplab eval datasets`).", aliases=("-O", "--option")),
        out_option(help="Output folder [default: cliplab-eval/<task>-<dataset>]."),
        click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                     help="Embedding cache folder [default: $CLIPLAB_CACHE or ~/.cache/cliplab/embeddings]."),
        click.option("--no-cache", is_flag=True, help="Keep embeddings in memory only."),
        click.option("--batch-size", type=int, default=64, show_default=True, help="Images per batch / cache chunk."),
        click.option("--text-batch-size", type=int, default=256, show_default=True),
        click.option("--device", default="cpu", show_default=True),
        precision_option(),
        click.option("--reduce", "reduction", default=None, metavar="NAME[:KEEP][@LAYER]",
                     help="Encode images with fewer vision tokens: a reducer of cliplab.vision_tokens (tome, "
                          "centerclip, tcc_compress, recoverable_compression, keep-random, keep-cls-attention), the "
                          "share of patch tokens kept (default 0.5) and the block it runs before (default: the "
                          "method's own), e.g. centerclip:0.25@3."),
        progress_option(),
        json_option(help="Print the results JSON instead of the summary."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _run(task: str, p: dict, **task_options) -> None:
    from ..eval import DATASETS, evaluate, load_model, render_text
    from ..eval.report import results_json

    dataset = p["dataset"] or _DEFAULT_DATASET[task]
    if dataset not in DATASETS:
        raise KeyError(f"unknown dataset {dataset!r}; known: {sorted(DATASETS)}")
    options = parse_settings(p["settings"])
    if p["data_path"] is not None:
        key = DATASETS[dataset].path_option
        if key is None:
            raise click.BadParameter(f"dataset {dataset!r} takes no path", param_hint="--data")
        options[key] = p["data_path"]
    out_dir = p["out_dir"] or str(Path("cliplab-eval") / f"{task}-{dataset}")
    cache_dir = None if p["no_cache"] else (p["cache_dir"] or "default")
    with warnings_to_stderr():
        model, mid, info = load_model(p["model"], random_init=p["random_init"], seed=p["seed"], device=p["device"],
                                      precision=p["precision"], arch=p["arch"], details=True)
        image_encoder = None
        if p["reduction"] is not None:
            from ..vision_tokens import ReducedImageEncoder

            try:
                image_encoder = ReducedImageEncoder(model, p["reduction"])
            except (KeyError, ValueError) as e:
                raise click.BadParameter(str(e).strip("'\""), param_hint="--reduce") from None
        try:
            res = evaluate(task, model, dataset, dataset_options=options, model_id=mid, cache_dir=cache_dir,
                           out_dir=out_dir, batch_size=p["batch_size"], text_batch_size=p["text_batch_size"],
                           progress=p["progress"], model_info=info, image_encoder=image_encoder, **task_options)
        except KeyboardInterrupt:
            where = "the embedding cache" if cache_dir is not None else "nowhere (--no-cache)"
            click.echo(f"interrupted: finished chunks are kept in {where}; re-run the same command to resume",
                       err=True)
            sys.exit(130)
    if p["as_json"]:
        click.echo(results_json(res), nl=False)
    else:
        click.echo(render_text(res), nl=False)


@main.group("eval")
def eval_group():
    """Evaluate a model: zero-shot classification, retrieval, CLIPScore, Winoground, sentence similarity.

    \b
    Example:
      cliplab eval zeroshot --dataset image-folder --data photos/ --templates generic -o runs/photos
    """


@eval_group.command("zeroshot")
@_common
@click.option("--templates", default=None,
              help="Shipped set (generic, single, synthetic), a .txt/.json file, or prompts.md#DATASET "
                   "[default: the dataset's own prompts, else generic]. A source that lists classes (CLIP's "
                   "ImageNet JSON) also gives the class names.")
@click.option("--descriptions", default=None, help="JSON file {classname: [description, ...]}.")
@click.option("--description-mode", type=click.Choice(["pool", "balanced", "only"]), default="pool",
              show_default=True)
@click.option("--description-template", default=None, help="Default: 'a photo of a {c}, which has {d}.'")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Learned prompts (from `cliplab train --preset coop` or mocoop) instead of templates; they must "
                   "cover the dataset's classes.")
def zeroshot_cmd(templates, descriptions, description_mode, description_template, prompts_file, **p):
    """Zero-shot classification: top-1/top-5, mean per-class recall, confusion matrix (PNG).

    Class names come from the dataset (folder names), from --set classnames=FILE (one name per line or a JSON
    list, in folder order), or from a --templates source that lists them. Folders named by ids (ImageNet's
    n01440764) need one of the last two.

    \b
    Example:
      cliplab eval zeroshot --dataset cifar-folder --data cifar10-test --set per_class=20 \\
          --templates prompts.md#CIFAR10 -o runs/cifar10
      cliplab eval zeroshot --dataset image-folder --data imagenet-val --set classnames=imagenet-names.txt
      cliplab eval zeroshot --set kind=colour_shape --prompts runs/coop/prompts.safetensors
    """
    if prompts_file is not None and (templates is not None or descriptions is not None):
        raise click.UsageError("--prompts replaces --templates/--descriptions: give one or the other")
    options = {"prompts": prompts_file} if prompts_file is not None else {}
    _run("zeroshot", p, templates=templates, descriptions=descriptions, description_mode=description_mode,
         description_template=description_template, **options)


@eval_group.command("retrieval")
@_common
def retrieval_cmd(**p):
    """Image<->text retrieval: R@1/5/10 in both directions (any of an image's captions counts).

    \b
    Example:
      cliplab eval retrieval --dataset captions-csv --data flickr8k-1k/captions.csv --set limit=50 -o runs/flickr
    """
    _run("retrieval", p)


@eval_group.command("clipscore")
@_common
@click.option("-w", "weight", type=float, default=2.5, show_default=True, help="CLIPScore weight w.")
def clipscore_cmd(weight, **p):
    """CLIPScore and RefCLIPScore of image-caption sets (references: each image's other captions).

    \b
    Example:
      cliplab eval clipscore --dataset captions-csv --data flickr8k-1k/captions.csv --set limit=50
    """
    _run("clipscore", p, w=weight)


@eval_group.command("winoground")
@_common
@click.option("--scoring", type=click.Choice(["clip", "comclip"]), default="clip", show_default=True,
              help="clip: cosine of the global embeddings; comclip: ComCLIP's region sub-images of the caption's "
                   "entities and relations added to the image embedding (docs/methods/comclip.md).")
def winoground_cmd(scoring, **p):
    """Winoground text / image / group scores on caption-image pairs.

    \b
    Example:
      cliplab eval winoground --set n=200
      cliplab eval winoground --set n=200 --scoring comclip
      cliplab eval winoground -m test-tiny --random-init --set n=200 --no-cache
    """
    _run("winoground", p, scoring=scoring)


def _nan_to_none(obj):
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


@eval_group.command("sts")
@click.option("--model", "-m", "--embedder", "-e", "model", cls=AliasedOption, hidden_aliases=("--embedder", "-e"),
              default="all-MiniLM-L6-v2", show_default=True,
              help="A text embedder: all-MiniLM-L6-v2, smollm2-135m, a directory saved by embedder.save(), or any "
                   "CLIP model name or path (its text tower).")
@click.option("--pooling", "-p", default=None,
              help="A registered pooling (mean, first, last, max, weighted_mean, prompteol) or one the embedder "
                   "adds (a GEM model: gem_mean, gem_last; DupMAE: dupmae, dupmae_cls, dupmae_ot) [default: the "
                   "embedder's own].")
@click.option("--data", "data_path", required=True, type=click.Path(dir_okay=False),
              help="An STS-B style file: tab-separated genre, file, year, id, score, sentence 1, sentence 2.")
@click.option("--encoding", default="utf-8", show_default=True, help="Text encoding of --data.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Score only the first N pairs.")
@click.option("--token-prepending", "tp", is_flag=True,
              help="Token Prepending around a causal embedder (pooling last or prompteol).")
@click.option("--tp-exit", type=int, default=None, help="With --token-prepending: the block TP stops before.")
@click.option("--layer", "readout_layer", type=int, default=None,
              help="With --token-prepending: read this layer (early exit; negative counts from the end).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--progress/--no-progress", default=None, help="Progress bar [default: on a terminal].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def sts_cmd(model, pooling, data_path, encoding, limit, tp, tp_exit, readout_layer, precision, batch_size,
            progress, as_json):
    """Sentence similarity: Spearman x 100 of cosine vs gold scores (ties averaged), Pearson beside it.

    \b
    Example:
      cliplab eval sts -m all-MiniLM-L6-v2 --data ../shared/data/stsb/sts-test.csv --json
      cliplab eval sts -m smollm2-135m -p prompteol --token-prepending --data sts-dev.csv --limit 200
    """
    import warnings

    from ..eval.sts import STSRowWarning, evaluate_sts, read_sts
    from ..text import load_embedder

    if (tp_exit is not None or readout_layer is not None) and not tp:
        raise click.BadParameter("--tp-exit and --layer go with --token-prepending", param_hint="--token-prepending")
    pool = pooling or None  # a name: the embedder resolves it (methods add their own, e.g. gem_last, dupmae_cls)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", STSRowWarning)
        data = read_sts(data_path, encoding=encoding, limit=limit)
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    embedder = load_embedder(model, precision=precision)
    if tp:
        from ..text_edit.token_prepending import TokenPrependingEmbedder

        embedder = TokenPrependingEmbedder(embedder, exit=tp_exit, readout_layer=readout_layer)
    show = sys.stderr.isatty() if progress is None else progress
    res = evaluate_sts(embedder, data, pooling=pool, batch_size=batch_size, progress=show)
    res["precision"] = precision
    if as_json:  # an undefined correlation (every embedding alike) is null, not the invalid JSON token NaN
        click.echo(json.dumps(_nan_to_none(res), indent=2))
    else:
        click.echo(f"{res['embedder']} ({res['pooling']}, {precision}) on {res['n']} pairs of {res['data']}: "
                   f"Spearman {res['spearman']:.2f}, Pearson {res['pearson']:.2f}"
                   + (f"; {len(res['rejected'])} line(s) rejected" if res["rejected"] else ""))


@eval_group.command("paraphrase")
@click.option("--model", "-m", "model", default="all-MiniLM-L6-v2", show_default=True,
              help="A text embedder, as for `cliplab eval sts`.")
@click.option("--pooling", "-p", default=None,
              help="A pooling, as for `cliplab eval sts` [default: the embedder's own].")
@click.option("--data", "data_path", required=True, type=click.Path(dir_okay=False),
              help="A table of image,caption rows with several captions per image (Flickr8k's all_captions.csv).")
@click.option("--held-out", type=click.IntRange(min=2), default=1000, show_default=True,
              help="Images held out (scored); the same seeded split methods train beside "
                   "(cliplab.eval.paraphrase.split_groups).")
@click.option("--all", "use_all", is_flag=True, help="Score every image's captions instead of the held-out split.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the held-out split.")
@precision_option()
@click.option("--batch-size", type=int, default=64, show_default=True)
@json_option(help="Print the result as JSON.")
def paraphrase_cmd(model, pooling, data_path, held_out, use_all, seed, precision, batch_size, as_json):
    """Caption-to-caption retrieval: for each caption, are the other captions of its image ranked first?
    R@1/5/10 and MRR on held-out images.

    \b
    Example:
      cliplab eval paraphrase -m all-MiniLM-L6-v2 --data ../shared/data/flickr8k-1k/all_captions.csv
    """
    from ..eval.paraphrase import caption_retrieval, read_caption_groups, split_groups
    from ..text import load_embedder

    pool = pooling or None  # a name: the embedder resolves it (methods add their own, e.g. gem_last, dupmae_cls)
    if not Path(data_path).is_file():
        raise FileNotFoundError(f"no caption table at {data_path}")
    groups = read_caption_groups(data_path)
    if len(groups) < 2:
        raise ValueError(f"{data_path}: {len(groups)} image(s) with two or more captions; retrieval needs at least 2")
    scored = groups if use_all else split_groups(groups, held_out=held_out, seed=seed)[1]
    embedder = load_embedder(model, precision=precision)
    res = caption_retrieval(embedder, scored, pooling=pool, batch_size=batch_size)
    res.update({"embedder": getattr(embedder, "name", str(model)), "pooling": pooling or "default",
                "images": len(scored), "data": str(data_path), "split": "all" if use_all else
                f"held_out={held_out},seed={seed}", "precision": precision})
    emit(res, as_json, lambda r: click.echo(
        f"{r['embedder']} ({r['pooling']}) on {r['n']} captions of {r['images']} images: R@1 {r['r@1']:.3f}, "
        f"R@5 {r['r@5']:.3f}, R@10 {r['r@10']:.3f}, MRR {r['mrr']:.3f}"))


@eval_group.command("datasets")
@json_option()
def datasets_cmd(as_json):
    """List the registered dataset adapters and their options (set them with --set KEY=VALUE).

    \b
    Example:
      cliplab eval datasets
      cliplab eval datasets --json
    """
    from ..eval import DATASETS

    data = {n: {"kind": e.kind, "data": e.path_option, "options": e.options(), "help": e.help}
            for n, e in sorted(DATASETS.items())}
    emit(data, as_json, lambda d: [click.echo(
        f"{n} ({v['kind']}{', --data = ' + v['data'] if v['data'] else ''}): {v['help']}\n"
        f"    options: {', '.join(f'{k}={o!r}' for k, o in v['options'].items() if k != v['data'])}")
        for n, v in d.items()])


@eval_group.command("sce")
@_common
@click.option("--kernel", type=click.Choice(["rff", "gaussian", "cosine", "linear"]), default="rff", show_default=True,
              help="Kernel of the covariance embedding (rff: random Fourier features of the Gaussian kernel).")
@click.option("--sigma", type=float, default=None, help="Gaussian kernel width [default: the method's].")
@click.option("--rff-dim", type=click.IntRange(1), default=None, help="Random Fourier features [default: 2500].")
@click.option("--normalized", is_flag=True, help="Normalised (Vendi-style) entropy instead of the official form.")
def sce_cmd(kernel, sigma, rff_dim, normalized, **p):
    """Schur Complement Entropy (Dissecting CLIP): what the image embeddings hold beyond their captions, with a
    shuffled-pairing control (docs/methods/sce.md).

    \b
    Example:
      cliplab eval sce --dataset captions-csv --data flickr8k-1k/captions.csv --kernel linear
    """
    from ..methods import import_capability

    import_capability("metrics")
    opts = {k: v for k, v in (("sigma", sigma), ("rff_dim", rff_dim)) if v is not None}
    _run("sce", p, kernel=kernel, normalized=normalized, **opts)


@eval_group.command("fclipscore")
@_common
@click.option("--mode", type=click.Choice(["threshold", "most_negative"]), default="threshold", show_default=True,
              help="threshold: every word below --eps is misaligned; most_negative: the single lowest word.")
@click.option("--eps", type=float, default=None, help="Threshold on word attributions [default: -5e-5].")
@click.option("--template", default=None, help='Prompt template [default: "A photo depicts "].')
@click.option("--start-layer", type=int, default=-3, show_default=True, help="First text block attributed.")
@click.option("--clamp", is_flag=True, help="Clamp gradient x attention at 0 (Chefer-style; for comparison).")
def fclipscore_cmd(mode, eps, template, start_layer, clamp, **p):
    """F-CLIPScore and the misaligned words of every image-caption pair (CLIP4DM), beside CLIPScore
    (docs/methods/clip4dm.md).

    \b
    Example:
      cliplab eval fclipscore --dataset captions-csv --data flickr8k-1k/captions.csv --set limit=20
    """
    from ..methods import import_capability

    import_capability("metrics")
    opts = {k: v for k, v in (("eps", eps), ("template", template)) if v is not None}
    _run("fclipscore", p, mode=mode, start_layer=start_layer, clamp=clamp, **opts)


@eval_group.command("cir")
@_common
@click.option("--query", type=click.Choice(["phi", "image", "text", "sum"]), default=None,
              help="How a query is made: phi (the reference image as a pseudo-word in 'a photo of $ that ...'), "
                   "image or text alone, or their summed embeddings [default: phi with --phi, else sum].")
@click.option("--phi", "phi_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A pseudo-word projection from `cliplab cir phi` (Phi.save).")
@click.option("--text-model", type=click.Path(exists=True), default=None,
              help="The text tower of the composed queries, e.g. RTD's tuned copy from `cliplab cir rtd` "
                   "[default: --model].")
@click.option("--template", default=None, help='Composed-query template [default: "a photo of $ that {}"].')
def cir_cmd(query, phi_path, text_model, template, **p):
    """Zero-shot composed image retrieval (reference image + modification text -> target image): R@1/5/10 on the
    synthetic CIR benchmark (docs/methods/rtd.md).

    \b
    Examples:
      cliplab eval cir --set n=200                               # image + text summed: the baseline
      cliplab eval cir --phi phi.pt --text-model rtd-model/      # phi + RTD's tuned text tower
    """
    from ..methods import import_capability

    import_capability("cir")
    query = query or ("phi" if phi_path else "sum")
    if query != "phi" and (phi_path or text_model or template):
        raise click.BadParameter("--phi, --text-model and --template apply to --query phi", param_hint="--query")
    if query == "phi" and not phi_path:
        raise click.BadParameter("--query phi needs --phi FILE (train one with `cliplab cir phi`)",
                                 param_hint="--phi")
    opts = {k: v for k, v in (("phi", phi_path), ("text_model", text_model), ("template", template))
            if v is not None}
    _run("cir", p, query=query, **opts)


@eval_group.command("tasks")
@json_option()
def tasks_cmd(as_json):
    """List the evaluation tasks and their metrics.

    \b
    Example:
      cliplab eval tasks --json
    """
    from ..eval import TASKS, list_metrics
    from ..methods import import_capability

    import_capability("metrics")  # tasks that method modules register (sce, fclipscore, cir)
    import_capability("cir")
    data = {n: {"dataset_kind": e.data_kind, "metrics": list_metrics(n), "help": e.help}
            for n, e in sorted(TASKS.items())}
    emit(data, as_json, lambda d: [click.echo(f"{n} ({v['dataset_kind']}): {v['help']}") for n, v in d.items()])


@eval_group.command("segmentation")
@model_option(help=EVAL_MODEL_HELP)
@click.option("--method", type=click.Choice(["naive", "maskclip", "sclip"]), default="maskclip", show_default=True,
              help="Dense maps (cliplab.dense.maps): naive last-layer patch tokens, maskclip or sclip.")
@click.option("--synthetic", "n_synthetic", type=click.IntRange(min=1), default=None,
              help="Score N scenes of the synthetic world (labels from the renderer's object masks) "
                   "[default: 100, unless --folder].")
@click.option("--by", type=click.Choice(["shape", "colour"]), default="shape", show_default=True,
              help="With --synthetic: label objects by shape or by colour.")
@click.option("--seed", type=int, default=1, show_default=True,
              help="With --synthetic: the world's seed (shapes-tiny trained on seed 0's scenes; 1 is held out).")
@click.option("--folder", type=click.Path(exists=True, file_okay=False), default=None,
              help="A folder of NAME.png + NAME.mask.png pairs with classes.txt (background first).")
@click.option("--background", type=click.Choice(["prompt", "threshold", "none"]), default="prompt",
              show_default=True, help="Background rule (see cliplab segment --help).")
@click.option("--threshold", type=float, default=None, help="With --background threshold: the cosine threshold.")
@click.option("--templates", default="generic", show_default=True, help="Prompt templates for every class.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@out_option(help="Write results.json here.")
@precision_option()
@progress_option()
@json_option(help="Print the results as JSON.")
def segmentation_cmd(model, method, n_synthetic, by, seed, folder, background, threshold, templates, batch_size,
                     out_dir, precision, progress, as_json):
    """Training-free segmentation: mIoU (with and without the background) and pixel accuracy.

    Every class name of the dataset (the background's too, with --background prompt) is a text prompt; each pixel
    gets the class whose text is most similar to its patch feature.

    \b
    Examples:
      cliplab eval segmentation --synthetic 500 --by colour --method sclip
      cliplab eval segmentation --folder my-masks/ -m ViT-B-32 --json
    """
    from ..dense.segment import evaluate_segmentation
    from ..eval import load_model

    if folder is not None and n_synthetic is not None:
        raise click.UsageError("choose one dataset: --synthetic N or --folder DIR")
    if (background == "threshold") != (threshold is not None):
        raise click.UsageError("--threshold goes with --background threshold (and that rule needs it)")
    if folder is not None:
        from ..dense.data import FolderSegmentation

        data, described = FolderSegmentation(folder), {"folder": str(folder)}
    else:
        from ..data.synthetic import SceneWorld
        from ..dense.data import SyntheticSegmentation

        n = n_synthetic or 100
        data = SyntheticSegmentation(SceneWorld(image_size=64, seed=seed), n=n, by=by)
        described = {"synthetic": n, "by": by, "seed": seed}
    with warnings_to_stderr():
        net, mid, info = load_model(model, precision=precision, details=True)
        res = evaluate_segmentation(net, data, method=method, background=background, threshold=threshold,
                                    templates=templates, batch_size=batch_size, progress=progress)
    res = {"task": "segmentation", "dataset": described, "model": {"name": net.config.name, "id": mid, **info},
           **res}
    res = _nan_to_none(res)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "results.json").write_text(json.dumps(res, indent=2), encoding="utf-8")

    def render(r):
        pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}"  # noqa: E731
        click.echo(f"segmentation ({r['method']}, background: {r['background']}) of {r['images']} images, "
                   f"{json.dumps(r['dataset'])}, model {r['model']['name']}")
        click.echo(f"  mIoU {pct(r['miou'])}  mIoU without background {pct(r['miou_foreground'])}  "
                   f"pixel accuracy {pct(r['pixel_acc'])}")
        click.echo("  IoU: " + ", ".join(f"{k} {pct(v)}" for k, v in r["iou"].items()))

    emit(res, as_json, render)
