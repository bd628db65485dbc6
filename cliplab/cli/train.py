"""``cliplab train``: run a training preset or a TrainConfig JSON file."""

from __future__ import annotations

import click

from .app import main


@main.command("train")
@click.option("--preset", default=None, help="A named recipe (see --list-presets), e.g. tiny-smoke, shapes-tiny.")
@click.option("--config", "config_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="A TrainConfig JSON file (e.g. the config.json of an earlier run).")
@click.option("--out", default=None, help="Output directory (default: the config's out_dir).")
@click.option("--steps", type=int, default=None, help="Total number of steps (overrides the config).")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in the output directory.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config field; dotted keys reach nested ones (data.caption=mix, "
                   "loss_kwargs.label_smoothing=0.1). Values are JSON when they parse (1e-3, true, [\"text.*\"]).")
@click.option("--show", is_flag=True, help="Print the resolved config as JSON and exit.")
@click.option("--list-presets", is_flag=True, help="List the presets and exit.")
def train_cmd(preset, config_path, out, steps, resume, overrides, show, list_presets):
    """Train a CLIP model contrastively (see docs/training.md)."""
    from ..train import Trainer, TrainConfig, get_preset, list_presets as _list_presets

    if list_presets:
        for name in _list_presets():
            click.echo(name)
        return
    if (preset is None) == (config_path is None):
        raise click.UsageError("give exactly one of --preset NAME or --config FILE")
    cfg = get_preset(preset) if preset else TrainConfig.load(config_path)
    sets = list(overrides)
    if out is not None:
        sets.append(f"out_dir={_json_str(out)}")
    if steps is not None:
        sets.append(f"steps={int(steps)}")
    cfg = cfg.with_overrides(sets).validate()
    if show:
        click.echo(cfg.to_json(), nl=False)
        return
    result = Trainer(cfg).fit(resume=resume)
    last = result.records[-1] if result.records else None
    summary = f"step {cfg.steps if result.final_dir else result.start_step}"
    if last:
        summary += f", loss {last['loss']:.4f}, {last['samples_per_s']:.0f} samples/s"
    click.echo(f"{summary}; final model: {result.final_dir or '(not reached)'}")


def _json_str(s: str) -> str:
    import json

    return json.dumps(s)
