"""``cliplab generate``: the small text-to-image generator (:mod:`cliplab.generation`): draw prompts, judge the
generator, train one."""

from __future__ import annotations

import click

from .app import main
from .common import emit, json_option, model_option, progress_option, warnings_to_stderr


def _generator_option():
    return click.option("--generator", "-g", default="scenes-32", show_default=True,
                        help="A shipped generator name or a directory saved by `cliplab generate train`.")


def load_generator_and_conditioner(name):
    """A shipped or saved generator (frozen) and the conditioner it was trained with: shared by the t2i commands."""
    from ..generation import TextConditioner, load_generator

    gen = load_generator(name).frozen()
    return gen, TextConditioner.for_generator(gen)


@main.group("generate")
def generate_group():
    """A small token-conditioned diffusion model on the synthetic world (docs/generation.md)."""


@generate_group.command("sample")
@click.argument("prompts", nargs=-1, required=True)
@_generator_option()
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True, help="PNG grid to write.")
@click.option("--per-prompt", type=click.IntRange(1, 64), default=4, show_default=True, help="Samples per prompt.")
@click.option("--steps", type=click.IntRange(1, 1000), default=25, show_default=True, help="DDIM steps.")
@click.option("--guidance", type=click.FloatRange(min=0), default=None,
              help="Classifier-free guidance scale (default: the generator's; 1 = unguided).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--direction", default=None,
              help="An attribute direction (a shipped name such as red-blue, or a saved directory) added to the "
                   "--subject's tokens: a row per --alpha, the same noise in every row of a prompt.")
@click.option("--subject", default=None, help="The word whose tokens the direction moves (with --direction).")
@click.option("--alpha", "alphas", type=float, multiple=True,
              help="Direction strengths (repeat the option) [default with --direction: 0, 1, 2].")
@click.option("--judge/--no-judge", "use_judge", default=True, show_default=True,
              help="Score each prompt's samples with the generator's judge (prompts in its grammar only).")
@json_option()
def sample_cmd(prompts, generator, out, per_prompt, steps, guidance, seed, direction, subject, alphas, use_judge,
               as_json):
    """Draw PER_PROMPT samples of every prompt into one grid (a row per prompt, or per prompt and alpha).

    \b
    Example:
      cliplab generate sample "a red circle" "a red circle and a blue square" -o grid.png
      cliplab generate sample "a blue circle and a green square" --direction red-blue --subject circle \\
          --alpha 0 --alpha 1 --alpha 2 -o edit.png      # attribute control's learned direction
    """
    import torch

    from ..generation import load_judge, save_grid

    if (direction is None) != (subject is None):
        raise click.UsageError("--direction and --subject go together")
    if alphas and direction is None:
        raise click.UsageError("--alpha needs --direction and --subject")
    with warnings_to_stderr():
        gen, cond = load_generator_and_conditioner(generator)
        rows = [(p, None) for p in prompts]
        if direction is not None:
            from ..text_edit.attribute_control_learned import encode_with_direction, load_direction

            try:
                delta = load_direction(direction).delta
            except (FileNotFoundError, ValueError) as e:
                raise click.BadParameter(str(e), param_hint="--direction") from None
            rows = [(p, a) for p in prompts for a in (alphas or (0.0, 1.0, 2.0))]
        images = []
        for p, a in rows:
            c = cond([p] * per_prompt) if a is None else encode_with_direction(cond, [p] * per_prompt, subject,
                                                                                delta, a)
            images.append(gen.sample(c, steps=steps, seed=seed + prompts.index(p), guidance=guidance))
        images = torch.cat(images)
        path = save_grid(images, out, columns=per_prompt)
        scores = {}
        if use_judge:
            judge = load_judge(generator)
            for i, (p, a) in enumerate(rows):
                pairs = _pairs_of(p)
                if pairs is not None:
                    label = p if a is None else f"{p} @ alpha {a:g}"
                    scores[label] = judge.score(images[i * per_prompt:(i + 1) * per_prompt], [pairs] * per_prompt)
    data = {"grid": str(path), "prompts": list(prompts), "per_prompt": per_prompt, "judged": scores}
    if direction is not None:
        data.update(direction=direction, subject=subject, alphas=[a for _, a in rows[:len(rows) // len(prompts)]])
    emit(data, as_json, lambda d: click.echo(f"grid -> {d['grid']}" + "".join(
        f"\n  {p!r}: binding {s['binding']:.2f}, colours {s['colours']:.2f}, shapes {s['shapes']:.2f}"
        for p, s in d["judged"].items())))


def _pairs_of(prompt):
    """The (colour, shape) pairs of a generator-grammar prompt, or None when the judge cannot score it."""
    from ..generation import GEN_COLOURS, GEN_SHAPES

    pairs = []
    for part in prompt.split(" and "):
        words = part.split()
        if len(words) != 3 or words[1] not in GEN_COLOURS or words[2] not in GEN_SHAPES:
            return None
        pairs.append((words[1], words[2]))
    return pairs


@generate_group.command("judge")
@_generator_option()
@click.option("--per-count", type=click.IntRange(1), default=48, show_default=True,
              help="Held-out prompts of each object count (1, 2, 3).")
@click.option("--steps", type=click.IntRange(1, 1000), default=25, show_default=True)
@click.option("--guidance", type=click.FloatRange(min=0), default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@json_option()
def judge_cmd(generator, per_count, steps, guidance, seed, as_json):
    """Sample held-out prompts of 1, 2 and 3 objects and report the judge's binding, colour and shape accuracy
    (beside its accuracy on clean renders of the same prompts).

    \b
    Example:
      cliplab generate judge --per-count 16 --json
    """
    from ..generation import judge_generator, load_judge

    with warnings_to_stderr():
        gen, cond = load_generator_and_conditioner(generator)
        data = judge_generator(gen, cond, load_judge(generator), per_count=per_count, steps=steps, seed=seed,
                               guidance=guidance)
    emit(data, as_json, lambda d: click.echo("\n".join(
        f"{n} object(s): binding {s['binding']:.3f} (clean renders {s['clean_binding']:.3f}), "
        f"colours {s['colours']:.3f}, shapes {s['shapes']:.3f}" for n, s in d.items())))


@generate_group.command("train")
@click.option("--out", "-o", type=click.Path(file_okay=False), required=True)
@model_option(default="shapes-tiny", help="The frozen text tower whose per-token states condition the generator.")
@click.option("--space", type=click.Choice(["final", "penultimate", "joint"]), default="final", show_default=True,
              help="Where the generator reads the text tower (final: SD 1.x; penultimate: SDXL).")
@click.option("--steps", type=click.IntRange(1), default=1600, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--channels", default="16,32,64", show_default=True, help="U-Net channels per level.")
@click.option("--judge-steps", type=click.IntRange(0), default=600, show_default=True,
              help="Train a judge beside it (0: none).")
@click.option("--seed", type=int, default=0, show_default=True)
@progress_option()
@json_option()
def train_cmd(out, model, space, steps, batch_size, channels, judge_steps, seed, progress, as_json):
    """Train a generator on the synthetic world (32 px, 1-3 objects) conditioned on MODEL's per-token states, save it
    (and a judge) to OUT. The shipped scenes-32 is this with the defaults (experiments/train_generator.py).

    \b
    Example:
      cliplab generate train -o runs/gen --steps 1600
      cliplab generate train -o runs/gen-sdxl --space penultimate   # read SDXL's site instead
    """
    from ..generation import (DenoiserConfig, GenerationScenes, GeneratorTrainConfig, TextConditioner,
                              train_generator, train_judge)
    from ..pipeline.modelref import resolve_model

    try:
        chans = tuple(int(c) for c in channels.split(","))
        dcfg = DenoiserConfig(channels=chans, attn_levels=tuple(range(1, len(chans))))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--channels") from None
    with warnings_to_stderr():
        text_model, _ = resolve_model(model)
        cond = TextConditioner(text_model.float().eval(), space=space)
        cfg = GeneratorTrainConfig(steps=steps, batch_size=batch_size, seed=seed, denoiser=dcfg)
        gen = train_generator(cond, GenerationScenes(seed=seed), cfg, progress=progress,
                              info={"text_model": model if isinstance(model, str) else str(model), "space": space})
        gen.save(out)
        if judge_steps:
            train_judge(GenerationScenes(seed=1000 + seed), steps=judge_steps, seed=seed, progress=progress).save(out)
    data = {"generator": out, "final_loss": gen.info["final_loss"], "train_seconds": gen.info["train_seconds"]}
    emit(data, as_json, lambda d: click.echo(f"generator -> {d['generator']} (final loss {d['final_loss']:.4f}, "
                                             f"{d['train_seconds']:.0f} s)"))
