"""``cliplab train``: run a training preset or a TrainConfig JSON file."""

from __future__ import annotations

import json

import click

from .app import main
from .common import emit, json_option, on_interrupt, progress_option, set_option, warnings_to_stderr


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
    """
    from ..train import Trainer, TrainConfig, get_preset, list_presets as _list_presets

    if list_presets:
        data = {name: _preset_summary(get_preset(name)) for name in _list_presets()}
        emit(data, as_json, lambda d: [click.echo(f"{n:<14} {s}") for n, s in d.items()])
        return
    if (preset is None) == (config_path is None):
        raise click.UsageError("give exactly one of --preset NAME or --config FILE")
    if image_root is not None and data_path is None:
        raise click.UsageError("--image-root goes with --data")
    cfg = get_preset(preset) if preset else TrainConfig.load(config_path)
    sets = list(settings)
    if out is not None:
        sets.append(f"out_dir={json.dumps(out)}")
    if steps is not None:
        sets.append(f"steps={int(steps)}")
    if data_path is not None:
        sets += ['data.source="folder"', f"data.options.path={json.dumps(data_path)}"]
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


def _preset_summary(cfg) -> str:
    """One line: the model, the data, the loss and the length of a preset's run."""
    model = cfg.model if isinstance(cfg.model, str) else cfg.model.get("name", "custom")
    return (f"{model} on {cfg.data.source} data ({cfg.data.caption} captions), loss {cfg.loss}, "
            f"{cfg.steps} steps x batch {cfg.batch_size}, {cfg.precision}")
