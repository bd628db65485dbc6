"""``cliplab cir``: train the two parts of zero-shot composed image retrieval (:mod:`cliplab.cir`): the pseudo-word
projection phi (LinCIR, text only) and RTD's tuned text tower. ``cliplab eval cir`` measures them."""

from __future__ import annotations

from pathlib import Path

import click

from .app import main
from .common import emit, json_option, model_option, warnings_to_stderr


@main.group("cir")
def cir_group():
    """Zero-shot composed image retrieval: train phi, then RTD (docs/methods/rtd.md)."""


@cir_group.command("phi")
@model_option()
@click.option("--triplets", type=click.IntRange(2), default=1000, show_default=True,
              help="Synthetic text triplets whose captions train phi (never rendered).")
@click.option("--steps", type=click.IntRange(1), default=300, show_default=True)
@click.option("--batch-size", type=click.IntRange(2), default=64, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "-o", "out_file", type=click.Path(dir_okay=False), required=True,
              help="Where to save phi (load it with cliplab.cir.Phi.load, or pass it to `cliplab eval cir --phi`).")
@json_option()
def phi_cmd(model, triplets, steps, batch_size, lr, seed, out_file, as_json):
    """Train the LinCIR-style projection phi (CLIP embedding -> pseudo-word) on captions alone, against the model's
    frozen text tower.

    \b
    Example:
      cliplab cir phi -o phi.pt --steps 300
    """
    from ..cir import cir_text_triplets
    from ..cir.phi import train_phi
    from ..pipeline.modelref import resolve_model

    with warnings_to_stderr():
        net, _ = resolve_model(model)
        captions = sorted({c for t in cir_text_triplets(triplets) for c in (t.reference, t.target)})
        phi = train_phi(net.eval(), captions, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    phi.save(out_file)
    emit({"phi": str(out_file), "captions": len(captions), "steps": steps}, as_json,
         lambda d: click.echo(f"trained phi on {d['captions']} captions for {d['steps']} steps -> {d['phi']}"))


@cir_group.command("rtd")
@model_option()
@click.option("--phi", "phi_path", type=click.Path(exists=True, dir_okay=False), required=True,
              help="The projection from `cliplab cir phi`.")
@click.option("--triplets", type=click.IntRange(2), default=1000, show_default=True,
              help="Synthetic text triplets (reference caption, modification, target caption).")
@click.option("--steps", type=click.IntRange(1), default=60, show_default=True)
@click.option("--batch-size", type=click.IntRange(2), default=16, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=3e-4, show_default=True)
@click.option("--no-anchor", is_flag=True, help="Ablation: drop the target anchor (the frozen copy's target text).")
@click.option("--no-hard-negatives", is_flag=True, help="Ablation: no reference-only hard-negative rows.")
@click.option("--concat", type=click.Choice(["pseudo", "text"]), default="pseudo", show_default=True,
              help="pseudo: RTD's refined concatenation; text: the naive one (an ablation).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Where to save the tuned model (pass it to `cliplab eval cir --text-model`).")
@json_option()
def rtd_cmd(model, phi_path, triplets, steps, batch_size, lr, no_anchor, no_hard_negatives, concat, seed, out_dir,
            as_json):
    """Tune a copy of the text tower with RTD (target-anchored text contrastive learning); the image tower and
    phi stay as they are.

    \b
    Example:
      cliplab cir rtd --phi phi.pt -o rtd-model/ && cliplab eval cir --phi phi.pt --text-model rtd-model/
    """
    from ..cir import cir_text_triplets
    from ..cir.phi import Phi
    from ..cir.rtd import train_rtd
    from ..pipeline.modelref import resolve_model

    with warnings_to_stderr():
        net, _ = resolve_model(model)
        result = train_rtd(net.eval(), Phi.load(phi_path), cir_text_triplets(triplets), steps=steps,
                           batch_size=batch_size, lr=lr, anchor=not no_anchor, hard_negatives=not no_hard_negatives,
                           concat=concat, seed=seed)
    path = result.model.save(out_dir)
    emit({"model": str(path), "steps": steps, "final_loss": float(result.losses[-1]), **result.settings}, as_json,
         lambda d: click.echo(f"RTD: {d['steps']} steps, final loss {d['final_loss']:.4f} -> {d['model']}"))
