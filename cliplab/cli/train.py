"""``cliplab train``: run a training preset or a TrainConfig JSON file."""

from __future__ import annotations

import json
import os

import click

from .app import main
from .common import (
    emit,
    fail,
    json_option,
    on_interrupt,
    parse_settings,
    progress_option,
    set_option,
    warnings_to_stderr,
)


#: data sources that read ``--data PATH`` as ``data.options.path`` (the curation presets' source reads a pairs table
#: with several caption versions per image)
TABLE_SOURCES = ("folder", "caption-versions")


@main.command("train")
@click.option("--preset", default=None, help="A named recipe (see --list-presets), e.g. tiny-smoke, shapes-tiny.")
@click.option("--config", "config_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="A TrainConfig JSON file (e.g. the config.json of an earlier run).")
@click.option("--out", "-o", "out", default=None, type=click.Path(file_okay=False),
              help="Output directory [default: the config's out_dir].")
@click.option("--steps", type=click.IntRange(1), default=None, help="Total number of steps (overrides the config).")
@click.option("--data", "data_path", default=None, type=click.Path(exists=True),
              help="Train on a table of image paths and captions (a captions.csv or the folder holding it): "
                   "data.source=folder, data.options.path=PATH.")
@click.option("--image-root", type=click.Path(exists=True, file_okay=False), default=None,
              help="With --data: base for relative image paths [default: the table's folder, or the images/ folder "
                   "beside it when the paths are there].")
@click.option("--init-from", default=None,
              help="Start from these weights (fine-tuning): a pretrained name (shapes-tiny), a checkpoint file or "
                   "directory, or a cached hub id. The weights bring their architecture (the config's model is ignored).")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in the output directory.")
@set_option(help="Override a config field; dotted keys reach nested ones (data.caption=mix, "
                 "loss_kwargs.label_smoothing=0.1). Values are JSON when they parse (1e-3, true, [\"text.*\"]).")
@click.option("--show", is_flag=True, help="Print the resolved config as JSON and exit.")
@click.option("--list-presets", is_flag=True, help="List the presets with what each trains, and exit.")
@progress_option()
@json_option(help="Print the run's summary (or, with --list-presets, the presets) as JSON.")
def train_cmd(preset, config_path, out, steps, data_path, image_root, init_from, resume, settings, show, list_presets,
              progress, as_json):
    """Train a CLIP model contrastively (see docs/training.md).

    Checkpoints go to OUT/checkpoints every config.checkpoint_every steps (and on Ctrl-C); --resume continues from
    the newest one, exactly. The final model is saved to OUT/final (load it with cliplab.load).

    \b
    Examples:
      cliplab train --preset tiny-smoke -o runs/smoke
      cliplab train --preset shapes-tiny --set steps=200 --set lr=1e-3
      cliplab train --preset tiny-smoke --data captions.csv --image-root images/ --init-from runs/smoke/final
      cliplab train --config runs/smoke/config.json --resume
      cliplab train --preset coop -o runs/coop      # learned prompts: runs/coop/prompts.safetensors
      cliplab train --preset llm2clip-stage2 --set embedder=runs/emb -o runs/llm2clip   # an LLM text tower
    """
    from ..train import Trainer, TrainConfig, get_preset, list_presets as _list_presets
    from ..train.runners import is_runner, runner_summaries
    from ..zeroshot.grain import GRAIN_PRESETS
    from ..zeroshot.nola import NOLA_PRESETS
    from ..zeroshot.prompt_learning import prompt_presets

    if list_presets:
        data = {name: _preset_summary(get_preset(name)) for name in _list_presets()}
        data.update(prompt_presets())
        data.update(GRAIN_PRESETS)
        data.update(NOLA_PRESETS)
        data.update(runner_summaries())
        emit(data, as_json, lambda d: [click.echo(f"{n:<14} {s}") for n, s in d.items()])
        return
    if (preset is None) == (config_path is None):
        raise click.UsageError("give exactly one of --preset NAME or --config FILE")
    if preset in GRAIN_PRESETS:
        _train_grain(preset, out, steps, settings, show, as_json,
                     unsupported={"--data": data_path, "--image-root": image_root, "--resume": resume or None,
                                  "--init-from": init_from})
        return
    if preset in NOLA_PRESETS:
        _train_nola(preset, out, steps, settings, init_from, show, as_json, data_path,
                    unsupported={"--image-root": image_root, "--resume": resume or None})
        return
    if preset in prompt_presets():
        _train_prompts(preset, out, steps, settings, init_from, show, as_json,
                       unsupported={"--data": data_path, "--image-root": image_root, "--resume": resume or None})
        return
    if is_runner(preset):
        _train_runner(preset, out, steps, data_path, image_root, init_from, resume, settings, show, progress, as_json)
        return
    if image_root is not None and data_path is None:
        raise click.UsageError("--image-root goes with --data")
    cfg = get_preset(preset) if preset else TrainConfig.load(config_path)
    sets = list(settings)
    if out is not None:
        sets.append(f"out_dir={json.dumps(out)}")
    if steps is not None:
        sets.append(f"steps={int(steps)}")
    if data_path is not None:
        if cfg.data.source not in TABLE_SOURCES:  # a preset that reads its own kind of table keeps its source
            sets.append('data.source="folder"')
        sets.append(f"data.options.path={json.dumps(data_path)}")
        if image_root is not None:
            sets.append(f"data.options.image_root={json.dumps(image_root)}")
    if init_from is not None:
        sets.append(f"init_from={json.dumps(init_from)}")
    if progress is not None:
        sets.append(f"progress={json.dumps(progress)}")
    cfg = cfg.with_overrides(sets).validate()
    if show:
        click.echo(cfg.to_json(), nl=False)
        return
    with warnings_to_stderr(), on_interrupt("run the same command with --resume to continue from the newest "
                                            "checkpoint, if any was written"):
        result = Trainer(cfg).fit(resume=resume)
    last = result.records[-1] if result.records else None
    data = {"out_dir": str(cfg.out_dir), "steps": cfg.steps, "reached": result.final_dir is not None,
            "start_step": result.start_step, "final": str(result.final_dir) if result.final_dir else None,
            "last_record": last}

    def render(d):
        summary = f"step {d['steps'] if d['reached'] else d['start_step']}"
        if last:
            summary += f", loss {last['loss']:.4f}, {last['samples_per_s']:.0f} samples/s"
        click.echo(f"{summary}; final model: {d['final'] or '(not reached)'}")

    emit(data, as_json, render)


def _method_preset(preset, steps, settings, show, as_json, unsupported, why: str, shown: dict, run, render) -> None:
    """The shared shell of the method presets that are not TrainConfig runs (prompt learning, GRAIN, NoLA): refuse
    flags that do not apply, pass --set keys (and --steps) as keywords to ``run(options)``, map an unknown key to a
    --set error, and print the summary ``run`` returns."""
    given = [flag for flag, value in unsupported.items() if value]
    if given:
        raise click.UsageError(f"{', '.join(given)} do(es) not apply to {preset!r} ({why})")
    options = parse_settings(settings)
    if steps is not None:
        options["steps"] = int(steps)
    if show:
        emit({"preset": preset, **shown, "options": options}, True, None)
        return
    with warnings_to_stderr():
        try:
            summary = run(options)
        except TypeError as e:  # an unknown --set key reaches a function as an unexpected keyword
            if "unexpected keyword" not in str(e):
                raise
            raise click.BadParameter(str(e), param_hint="--set") from None
    emit(summary, as_json, render)


def _train_prompts(preset, out, steps, settings, init_from, show, as_json, unsupported) -> None:
    """A prompt-learning preset (coop, mocoop): a frozen model, a few-shot synthetic task, a learned-prompts file
    written to -o (a .safetensors path, or a folder for prompts.safetensors). --set passes task and training
    options (shots=4, n_ctx=4, ctx_init="a photo of a", class_specific=true, names=unseen-colours, lr=0.01, ...)."""
    from ..pipeline import resolve_model
    from ..zeroshot.prompt_learning import prompts_path, run_prompt_preset

    def render(d):
        click.echo(f"{preset}: {d['steps']} steps, test accuracy {100 * d['test_accuracy']:.1f}% "
                   f"(hand prompt 'a photo of a {{}}.' {100 * d['hand_prompt_accuracy']:.1f}%) on {d['classes']} "
                   f"classes; learned prompts: {d['prompts']}")

    _method_preset(preset, steps, settings, show, as_json, unsupported,
                   "it trains on the synthetic few-shot task; see docs/methods/coop.md",
                   {"model": init_from or "shapes-tiny", "out": str(prompts_path(out, preset))},
                   lambda options: run_prompt_preset(preset, resolve_model(init_from)[0], out, **options), render)


def _train_grain(preset, out, steps, settings, show, as_json, unsupported) -> None:
    """GRAIN (region queries + boxes + descriptions) trains its own model from scratch on synthetic scenes: not a
    TrainConfig run. --set passes GrainConfig fields (steps=, batch_size=, seed=, ...) and control=true (CLIP's loss
    only, the paper's control)."""
    from ..zeroshot.grain import run_grain_preset

    target = out or f"runs/{preset}"
    _method_preset(preset, steps, settings, show, as_json, unsupported,
                   "it trains from scratch on the synthetic world; see docs/methods/grain.md", {"out": target},
                   lambda options: run_grain_preset(preset, target, log_every=0 if as_json else 50, **options),
                   lambda d: click.echo(json.dumps(d, indent=1)))


def _train_nola(preset, out, steps, settings, init_from, show, as_json, data_path, unsupported) -> None:
    """NoLA tunes a copy of a model (--init-from, default shapes-tiny) on unlabelled images and writes a NoLA
    classifier file: the synthetic blurred-shape task, or --data FOLDER (your images, unlabelled) with --set
    classes=a,b,c (and optionally descriptions=FILE.json, templates=..., ssl_encoder=FOLDER). --set passes
    NoLAConfig fields and the task's (n_train=, n_test=, ssl_encoder=)."""
    from ..pipeline import resolve_model
    from ..zeroshot.nola import run_nola_preset

    if data_path is not None and not os.path.isdir(data_path):
        raise click.BadParameter(f"{data_path} is not a folder: NoLA reads a folder of unlabelled images",
                                 param_hint="--data")

    def render(d):
        if "data" in d:
            click.echo(f"{preset}: {d['steps']} steps on {d['images']} unlabelled images in {d['data']} "
                       f"({d['unreadable']} unreadable), {d['classes']} classes; alignment-module labels "
                       f"{d['pseudo_label_counts']}; classifier: {d['classifier']}")
            return
        click.echo(f"{preset}: {d['steps']} steps, test accuracy {100 * d['test_accuracy']:.1f}% (description "
                   f"zero-shot {100 * d['description_zero_shot_accuracy']:.1f}%) on {d['classes']} classes; "
                   f"classifier: {d['classifier']}")

    def run(options):
        if data_path is not None:
            options = {**options, "data": data_path}
        try:
            return run_nola_preset(preset, resolve_model(init_from)[0], out, **options)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--data/--set") from None

    _method_preset(preset, steps, settings, show, as_json, unsupported,
                   "it tunes on the synthetic blurred-shape task or a --data folder; see docs/methods/nola.md",
                   {"model": init_from or "shapes-tiny", "out": out or f"runs/{preset}", "data": data_path}, run,
                   render)


def _train_runner(preset, out, steps, data_path, image_root, init_from, resume, settings, show, progress,
                  as_json) -> None:
    """A runner preset (``cliplab.train.runners``: llm2clip-*, proclip-*): the method's own training function with
    the preset's options; --set KEY=VALUE sets any of them, and the flags the preset honours set theirs (--steps,
    -o, --init-from, --data, --progress); the others are refused before anything trains."""
    from ..train.runners import get_runner

    runner = get_runner(preset)
    refused = [flag for flag, value in (("--resume", resume), ("--image-root", image_root)) if value]
    if refused:
        raise click.UsageError(f"{', '.join(refused)} do(es) not apply to preset {preset!r} (not a TrainConfig "
                               f"run; see {runner.doc or 'cliplab train --list-presets'})")
    try:
        options = runner.options(parse_settings(settings), out=out, steps=steps, init_from=init_from,
                                 data=data_path, progress=progress)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if show:
        emit({"preset": preset, "options": options}, True, None)
        return
    with warnings_to_stderr(), on_interrupt("the run stopped before saving anything; run the command again"):
        try:
            summary = runner.run(**options)
        except ValueError as e:
            fail(str(e))
    emit(summary, as_json, lambda d: click.echo(runner.line(d)))


def _preset_summary(cfg) -> str:
    """One line: the model, the data, the loss and the length of a preset's run."""
    model = cfg.model if isinstance(cfg.model, str) else cfg.model.get("name", "custom")
    return (f"{model} on {cfg.data.source} data ({cfg.data.caption} captions), loss {cfg.loss}, "
            f"{cfg.steps} steps x batch {cfg.batch_size}, {cfg.precision}")
