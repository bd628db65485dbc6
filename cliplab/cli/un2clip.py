"""``cliplab un2clip``: un²CLIP (:mod:`cliplab.objectives.un2clip`): fine-tune the image tower by inverting a frozen
unCLIP generator; the text tower is untouched. The result is a normal model (``-m DIR`` in every command)."""

from __future__ import annotations

import click

from .app import main
from .common import emit, json_option, progress_option, warnings_to_stderr


@main.group("un2clip")
def un2clip_group():
    """un²CLIP: an image encoder tuned to be a frozen generator's condition (docs/methods/un2clip.md)."""


@un2clip_group.command("train")
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Where to save the tuned model (a normal cliplab model: cliplab.load(DIR), -m DIR).")
@click.option("--generator", "-g", default="unclip-32", show_default=True,
              help="The frozen unCLIP generator: a shipped name or a directory saved by save_unclip.")
@click.option("--base", default="shapes-tiny", show_default=True, help="The CLIP model whose image tower is tuned.")
@click.option("--steps", type=click.IntRange(1), default=400, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True)
@click.option("--layers", type=click.IntRange(0), default=1, show_default=True,
              help="Last ViT blocks tuned (with ln_post and the projection).")
@click.option("--n-images", type=click.IntRange(1), default=4000, show_default=True, help="Training scenes.")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--drift", is_flag=True, help="The control: train the generator too (a drifting condition space).")
@click.option("--no-measure", is_flag=True, help="Skip the before/after fine-detail and zero-shot measures.")
@progress_option()
@json_option()
def train_cmd(out_dir, generator, base, steps, lr, layers, n_images, seed, drift, no_measure, progress, as_json):
    """Fine-tune BASE's image tower with the frozen GENERATOR's denoising loss (its condition is the image embedding)
    and print fine-detail separability and coarse zero-shot before and after.

    \b
    Example:
      cliplab un2clip train -o runs/un2clip
      cliplab un2clip train -o runs/drift --drift        # the control: the generator trains too
    """
    from ..objectives.un2clip import run_un2clip

    with warnings_to_stderr():
        result = run_un2clip(out_dir, generator=generator, base=base, progress=progress,
                             measure_pairs=0 if no_measure else 200, steps=steps, lr=lr, layers=layers,
                             n_images=n_images, seed=seed, train_generator=drift)

    def render(d):
        if "before" in d:
            b, a = d["before"], d["after"]
            click.echo("                          before   after")
            click.echo(f"  colour-swap pair cos    {b['binding']['pair_cos']:.4f}   {a['binding']['pair_cos']:.4f}")
            click.echo(f"  colour-swap caption     {b['binding']['text_acc']:.3f}    {a['binding']['text_acc']:.3f}")
            click.echo(f"  left/right pair cos     {b['position']['pair_cos']:.4f}   {a['position']['pair_cos']:.4f}")
            for kind in b["zero_shot"]:
                click.echo(f"  zero-shot {kind:<13} {b['zero_shot'][kind]:.3f}    {a['zero_shot'][kind]:.3f}")
        click.echo(f"saved {d['out']} (cliplab.load(DIR))")

    emit(result, as_json, render)
