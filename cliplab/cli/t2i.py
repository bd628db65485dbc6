"""``cliplab t2i``: the text-to-image conditioning methods (:mod:`cliplab.t2i`) against the small generator of
:mod:`cliplab.generation` (``scenes-32`` by default)."""

from __future__ import annotations

import click

from .app import main
from .common import emit, json_option, progress_option, warnings_to_stderr
from .generate import load_generator_and_conditioner


def generator_option():
    return click.option("--generator", "-g", default="scenes-32", show_default=True,
                        help="A shipped generator name or a directory saved by `cliplab generate train`.")


@main.group("t2i")
def t2i_group():
    """Text-to-image conditioning methods: WiCLP, CoRe, ELLA (docs/generation.md, docs/methods)."""


# ------------------------------------------------------------------------------------------------------------- CoRe
@t2i_group.group("core")
def core_group():
    """CoRe: a new concept token S* learned from a few images, context-regularised (docs/methods/core.md)."""


@core_group.command("learn")
@click.option("--images", "-i", "images", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False),
              help="Concept images (repeat the option; any size).")
@click.option("--class-word", required=True, help="The concept's super-class word, e.g. triangle.")
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False), required=True)
@generator_option()
@click.option("--inversion-only", is_flag=True, help="Plain textual inversion (the control), no CoRe regularisers.")
@click.option("--stage1-steps", type=click.IntRange(0), default=150, show_default=True)
@click.option("--stage2-steps", type=click.IntRange(0), default=150, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.005, show_default=True)
@click.option("--stage2-lr", type=click.FloatRange(min=0, min_open=True), default=0.003, show_default=True)
@click.option("--lambda-emb", type=click.FloatRange(min=0), default=0.001, show_default=True,
              help="Context-embedding regulariser weight.")
@click.option("--lambda-attn", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="Context-attention regulariser weight.")
@click.option("--rescale", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Rescale |S*| to this multiple of the class word's norm after stage 1 (0: off).")
@click.option("--seed", type=int, default=0, show_default=True)
@progress_option()
@json_option()
def core_learn_cmd(images, class_word, out_dir, generator, inversion_only, stage1_steps, stage2_steps, lr, stage2_lr,
                   lambda_emb, lambda_attn, rescale, seed, progress, as_json):
    """Learn S* from the concept IMAGES against the frozen generator and save it to OUT (then sample prompts with
    "S*" in them: `cliplab t2i core sample OUT "a S* and a blue square" -o grid.png`).

    \b
    Example:
      cliplab t2i core learn -i c1.png -i c2.png -i c3.png --class-word triangle -o runs/core
      cliplab t2i core learn -i c1.png -i c2.png --class-word triangle -o runs/ti --inversion-only   # the control
    """
    from ..t2i import core

    opts = {"stage1_steps": stage1_steps, "stage2_steps": stage2_steps, "lr": lr, "stage2_lr": stage2_lr,
            "seed": seed, "progress": progress}
    if not inversion_only:
        opts.update(lambda_emb=lambda_emb, lambda_attn=lambda_attn, rescale=rescale or None)
    with warnings_to_stderr():
        result = core.learn_from_images(list(images), class_word, out_dir, generator=generator,
                                        core=not inversion_only, **opts)
    data = {"out": out_dir, "method": "inversion" if inversion_only else "core",
            "last": result.history[-1] if result.history else None}
    emit(data, as_json, lambda d: click.echo(f"S* ({d['method']}) -> {d['out']}" +
                                             (f"\n  last step: {d['last']}" if d["last"] else "")))


@core_group.command("sample")
@click.argument("token_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("prompts", nargs=-1, required=True)
@generator_option()
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True, help="PNG grid (a row per prompt).")
@click.option("--per-prompt", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--steps", type=click.IntRange(1, 1000), default=25, show_default=True)
@click.option("--guidance", type=click.FloatRange(min=0), default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@json_option()
def core_sample_cmd(token_dir, prompts, generator, out, per_prompt, steps, guidance, seed, as_json):
    """Draw PROMPTS that name the learned token (S*) with the generator; write one grid.

    \b
    Example:
      cliplab t2i core sample runs/core "a S*" "a S* and a blue square" -o core.png
    """
    from ..generation import save_grid
    from ..t2i import core

    with warnings_to_stderr():
        rows = [p for p in prompts for _ in range(per_prompt)]
        images = core.sample_concept(token_dir, rows, generator=generator, steps=steps, seed=seed, guidance=guidance)
    path = str(save_grid(images, out, columns=per_prompt))
    emit({"grid": path, "prompts": list(prompts)}, as_json, lambda d: click.echo(d["grid"]))


# ------------------------------------------------------------------------------------------------------------- ELLA
@t2i_group.group("ella")
def ella_group():
    """ELLA: a timestep-aware connector from a real language model's tokens to the frozen generator
    (docs/methods/ella.md)."""


@ella_group.command("train")
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False), required=True)
@click.option("--kind", type=click.Choice(["tsc", "pooled"]), default="tsc", show_default=True,
              help="tsc: ELLA's Timestep-aware Semantic Connector; pooled: the control (one pooled token).")
@generator_option()
@click.option("--embedder", default="all-MiniLM-L6-v2", show_default=True, help="The frozen language model.")
@click.option("--steps", type=click.IntRange(1), default=1600, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--n-images", type=click.IntRange(1), default=6000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", "resume_from", type=click.Path(exists=True, file_okay=False), default=None,
              help="Continue from a saved connector of the same kind.")
@progress_option()
@json_option()
def ella_train_cmd(out_dir, kind, generator, embedder, steps, batch_size, lr, n_images, seed, resume_from, progress,
                   as_json):
    """Train a connector between EMBEDDER's token states and the frozen generator with the denoising loss; save it to
    OUT and print how it was made.

    \b
    Example:
      cliplab t2i ella train -o runs/ella --steps 1600
      cliplab t2i ella train -o runs/pooled --kind pooled     # the control
    """
    from ..t2i import ella

    cfg = ella.ELLATrainConfig(steps=steps, batch_size=batch_size, lr=lr, n_images=n_images, seed=seed)
    with warnings_to_stderr():
        wrapped, _ = ella.train_ella(out_dir, kind=kind, generator=generator, embedder=embedder, config=cfg,
                                     progress=progress, init=resume_from)
    info = dict(wrapped.connector.info)
    emit(info, as_json, lambda d: click.echo(f"{kind} connector -> {out_dir} (final loss {d['final_loss']:.4f}, "
                                             f"{d['seconds']:.0f} s)"))


@ella_group.command("sample")
@click.argument("connector")
@click.argument("prompts", nargs=-1, required=True)
@generator_option()
@click.option("--embedder", default="all-MiniLM-L6-v2", show_default=True)
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True, help="PNG grid (a row per prompt).")
@click.option("--per-prompt", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--steps", type=click.IntRange(1, 1000), default=25, show_default=True)
@click.option("--guidance", type=click.FloatRange(min=0), default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@json_option()
def ella_sample_cmd(connector, prompts, generator, embedder, out, per_prompt, steps, guidance, seed, as_json):
    """Draw PROMPTS through CONNECTOR (a directory, or the shipped `tsc` / `pooled`); write one grid.

    \b
    Example:
      cliplab t2i ella sample tsc "a red circle and a blue square and a green cross" -o ella.png
    """
    from ..generation import save_grid
    from ..t2i import ella

    with warnings_to_stderr():
        wrapped = ella.load_ella(connector, generator=generator, embedder=embedder)
        rows = [p for p in prompts for _ in range(per_prompt)]
        images = wrapped.generate(rows, steps=steps, seed=seed, guidance=guidance)
    path = str(save_grid(images, out, columns=per_prompt))
    emit({"grid": path, "prompts": list(prompts)}, as_json, lambda d: click.echo(d["grid"]))


@ella_group.command("judge")
@click.argument("connector")
@generator_option()
@click.option("--embedder", default="all-MiniLM-L6-v2", show_default=True)
@click.option("--count", type=click.IntRange(1, 3), default=3, show_default=True, help="Objects per prompt.")
@click.option("--n", type=click.IntRange(1), default=48, show_default=True, help="Held-out prompts.")
@click.option("--steps", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@json_option()
def ella_judge_cmd(connector, generator, embedder, count, n, steps, seed, as_json):
    """Judge CONNECTOR's samples of held-out COUNT-object prompts: binding, colours, shapes and colour in the right
    object's slot (beside the judge's scores on clean renders).

    \b
    Example:
      cliplab t2i ella judge tsc --count 3 --json
      cliplab t2i ella judge pooled --count 3 --json          # the control
    """
    from ..generation import load_judge
    from ..t2i import ella

    with warnings_to_stderr():
        wrapped = ella.load_ella(connector, generator=generator, embedder=embedder)
        scores = ella.judge_binding(wrapped, wrapped.text, load_judge(generator), count=count, n=n, steps=steps,
                                    seed=seed)
    emit(scores, as_json, lambda d: click.echo("\n".join(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}"
                                                         for k, v in d.items())))


# ------------------------------------------------------------------------------------------------------------ WiCLP
@t2i_group.group("wiclp")
def wiclp_group():
    """WiCLP: a token-state projection trained with the frozen generator's loss, Switch-Off sampling
    (docs/methods/wiclp.md)."""


@wiclp_group.command("train")
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False), required=True)
@click.option("--kind", type=click.Choice(["clp", "wiclp"]), default="wiclp", show_default=True,
              help="clp: per-token linear (identity at start); wiclp: window convolution, zero-initialised residual.")
@generator_option()
@click.option("--steps", type=click.IntRange(1), default=400, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--n-images", type=click.IntRange(1), default=1024, show_default=True,
              help="Two-object training scenes (held-out judged prompts excluded).")
@click.option("--threshold", type=int, default=-1, show_default=True,
              help="Switch-Off: use the projection only for timesteps t > THRESHOLD (-1: always), saved with it.")
@click.option("--seed", type=int, default=0, show_default=True)
@progress_option()
@json_option()
def wiclp_train_cmd(out_dir, kind, generator, steps, lr, batch_size, n_images, threshold, seed, progress, as_json):
    """Train a CLP/WiCLP projection of the generator's per-token conditioning (everything else frozen) and save it.

    \b
    Example:
      cliplab t2i wiclp train -o runs/wiclp --kind wiclp --threshold 500
    """
    from ..t2i import wiclp

    with warnings_to_stderr():
        gen, cond = load_generator_and_conditioner(generator)
        trained = wiclp.train_projection(gen, cond, progress=progress, kind=kind, steps=steps, lr=lr,
                                         batch_size=batch_size, n_images=n_images, seed=seed)
        path = trained.save(out_dir, threshold=threshold)
    losses = trained.losses
    tenth = max(1, len(losses) // 10)
    data = {"out": str(path), "kind": kind, "first_loss": sum(losses[:tenth]) / tenth,
            "last_loss": sum(losses[-tenth:]) / tenth}
    emit(data, as_json, lambda d: click.echo(f"{d['kind']} -> {d['out']} (loss {d['first_loss']:.4f} -> "
                                             f"{d['last_loss']:.4f}, first and last tenth)"))


@wiclp_group.command("judge")
@click.argument("projection_dir", type=click.Path(exists=True, file_okay=False))
@generator_option()
@click.option("--threshold", type=int, default=None, help="Switch-Off threshold [default: the one saved].")
@click.option("--per-count", type=click.IntRange(1), default=48, show_default=True)
@click.option("--steps", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@json_option()
def wiclp_judge_cmd(projection_dir, generator, threshold, per_count, steps, seed, as_json):
    """Judge held-out 1- and 2-object prompts through the projection beside the plain generator (same prompts and
    seeds): binding, colours, shapes.

    \b
    Example:
      cliplab t2i wiclp judge runs/wiclp --json
    """
    from ..generation import load_judge
    from ..t2i import wiclp

    with warnings_to_stderr():
        gen, cond = load_generator_and_conditioner(generator)
        projection, meta = wiclp.load_projection(projection_dir)
        thr = meta.get("threshold", -1) if threshold is None else threshold
        judge = load_judge(generator)
        kw = {"per_count": per_count, "steps": steps, "seed": seed}
        data = {"plain": wiclp.judge_projection(gen, cond, judge, None, **kw),
                "projected": wiclp.judge_projection(gen, cond, judge, projection, threshold=thr, **kw),
                "threshold": thr}

    def render(d):
        for n in d["plain"]:
            p, q = d["plain"][n], d["projected"][n]
            click.echo(f"{n} object(s): binding {p['binding']:.3f} -> {q['binding']:.3f}, colours "
                       f"{p['colours']:.3f} -> {q['colours']:.3f}, shapes {p['shapes']:.3f} -> {q['shapes']:.3f}")

    emit(data, as_json, render)
