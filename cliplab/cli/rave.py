"""``cliplab rave``: RAVE (:mod:`cliplab.enhance.rave`): train a CLIP-guided enhancer for backlit synthetic scenes,
then enhance images with it."""

from __future__ import annotations

import click

from .app import main
from .common import emit, json_option, model_option, warnings_to_stderr


@main.group("rave")
def rave_group():
    """RAVE: a residual CLIP image direction guides an image enhancer (docs/methods/rave.md)."""


@rave_group.command("train")
@model_option()
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Writes enhancer.safetensors and rave.json (settings, r, removed tokens, held-out scores).")
@click.option("--n-train", type=click.IntRange(2), default=128, show_default=True,
              help="Synthetic scenes: r from the clean first half and the degraded second half (unpaired).")
@click.option("--n-eval", type=click.IntRange(0), default=48, show_default=True, help="Held-out scenes scored.")
@click.option("--kind", type=click.Choice(["backlit", "underexposed"]), default="backlit", show_default=True)
@click.option("--steps", type=click.IntRange(1), default=40, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=5e-3, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--guidance-weight", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="0: the unguided control.")
@click.option("--target", default="clean", show_default=True,
              help="Guidance target for cos(E_I(out), r): 'clean' (the clean images' mean), 'threshold' (the "
                   "official code's rule) or a number.")
@click.option("--remove-tokens", type=click.IntRange(0), default=0, show_default=True,
              help="Shift r by removing its N nearest vocabulary token directions.")
@click.option("--removal-mode", type=click.Choice(["gram_schmidt", "official"]), default="gram_schmidt",
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@json_option()
def train_cmd(model, out_dir, n_train, n_eval, kind, steps, lr, batch_size, guidance_weight, target, remove_tokens,
              removal_mode, seed, as_json):
    """Compute r on synthetic scenes, train the enhancer with RAVE guidance, report held-out PSNR and cos(., r).

    \b
    Example:
      cliplab rave train -o runs/rave
      cliplab rave train -o runs/unguided --guidance-weight 0     # the control
    """
    from ..enhance import rave
    from ..pipeline.modelref import resolve_model

    if target not in ("clean", "threshold"):
        try:
            target = float(target)
        except ValueError:
            raise click.BadParameter("use 'clean', 'threshold' or a number", param_hint="--target") from None
    with warnings_to_stderr():
        net, _ = resolve_model(model)
        _, report = rave.train_rave(net.float().eval(), n_train=n_train, n_eval=n_eval, seed=seed, kind=kind,
                                    remove_tokens=remove_tokens, removal_mode=removal_mode, steps=steps, lr=lr,
                                    batch_size=batch_size, guidance_weight=guidance_weight, target=target,
                                    out_dir=out_dir)
    data = {"enhancer": f"{out_dir}/enhancer.safetensors", "eval": report.get("eval"),
            "removed_tokens": report["removed_tokens"]}
    emit(data, as_json, lambda d: click.echo(f"enhancer -> {d['enhancer']}" + (
        "".join(f"\n  {k}: {v}" for k, v in (d["eval"] or {}).items()) +
        (f"\n  removed tokens: {', '.join(d['removed_tokens'])}" if d["removed_tokens"] else ""))))


@rave_group.command("enhance")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--enhancer", "-e", type=click.Path(exists=True, dir_okay=False), required=True,
              help="enhancer.safetensors written by `cliplab rave train`.")
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False), required=True)
@json_option()
def enhance_cmd(images, enhancer, out_dir, as_json):
    """Enhance IMAGES (any size) and write them to OUT under their file names; prints one output path per image.

    \b
    Example:
      cliplab rave enhance dark/*.png -e runs/rave/enhancer.safetensors -o bright/
    """
    from pathlib import Path

    from ..enhance import rave

    with warnings_to_stderr():
        net = rave.load_enhancer(enhancer)
        rave.enhance_images(net, list(images), out_dir=out_dir)
    outputs = [str(Path(out_dir) / Path(p).name) for p in images]
    emit({"outputs": outputs}, as_json, lambda d: click.echo("\n".join(d["outputs"])))
