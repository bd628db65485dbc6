"""``cliplab dclip``: DCLIP on the synthetic world (:mod:`cliplab.objectives.dclip`): train the region-aware teacher on
ground-truth object boxes, distil it into the model, save the student. Its teacher needs each scene's boxes, which the
trainer's batches do not carry, hence a command of its own rather than a ``cliplab train`` preset."""

from __future__ import annotations

import copy

import click

from .app import main
from .common import emit, json_option, model_option, warnings_to_stderr


@main.group("dclip")
def dclip_group():
    """DCLIP: distillation from a region-aware teacher (docs/methods/dclip.md)."""


@dclip_group.command("distill")
@model_option()
@click.option("--train-groups", type=click.IntRange(1), default=80, show_default=True,
              help="Training groups of 4 synthetic scenes differing in one attribute (world seed 0).")
@click.option("--test-groups", type=click.IntRange(1), default=40, show_default=True,
              help="Held-out groups (world seed 1) for the report.")
@click.option("--teacher-steps", type=click.IntRange(1), default=120, show_default=True)
@click.option("--steps", type=click.IntRange(1), default=40, show_default=True, help="Student steps.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-5, show_default=True,
              help="Student learning rate.")
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="InfoNCE share of the hybrid loss (1: no distillation, the control).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Where to save the student (a normal model: -m DIR in every command).")
@json_option()
def distill_cmd(model, train_groups, test_groups, teacher_steps, steps, lr, alpha, seed, out_dir, as_json):
    """Train DCLIP's region-aware teacher, distil it into MODEL, save the student, and report held-out within-group
    R@1 (fine-grained retrieval) and zero-shot accuracy for the model before and after.

    \b
    Example:
      cliplab dclip distill -o runs/dclip --steps 40
      cliplab dclip distill -o runs/control --alpha 1     # the same fine-tuning without distillation
    """
    import torch

    from ..data.synthetic import SceneWorld, zero_shot_task
    from ..objectives import dclip as D
    from ..pipeline.modelref import resolve_model

    size = 4  # members per group

    @torch.no_grad()
    def report(net, test, task):
        net.eval()
        img = net.encode_images([s.render() for s in test], normalize=True)
        txt = net.encode_texts([s.short_caption for s in test], normalize=True)
        return {"group_r1": round(D.group_retrieval_r1(img @ txt.t(), size), 4),
                "zeroshot": round(D.zero_shot_top1(net, task), 4)}

    with warnings_to_stderr():
        base, _ = resolve_model(model)
        base = base.float().eval()
        torch.manual_seed(seed)
        image_size = base.config.vision.image_size
        train = D.minimal_groups(SceneWorld(image_size, seed=0), train_groups, offset=500_000, size=size)
        test = D.minimal_groups(SceneWorld(image_size, seed=1), test_groups, size=size)
        task = zero_shot_task("colour_shape", 2, seed=1)
        before = report(base, test, task)
        captions = [s.short_caption for s in train]
        targets = None
        if alpha < 1:  # the teacher is only needed when there is something to distil
            teacher = D.RegionTeacher(base)
            features = teacher.features(train, captions)
            D.train_teacher(teacher, features, steps=teacher_steps, batch_size=32, lr=1e-3, group_size=size,
                            seed=seed)
            targets = teacher.targets(features)
        student = copy.deepcopy(base)
        losses = D.distill(student, train, captions, targets, steps=steps, batch_size=32, lr=lr, alpha=alpha,
                           group_size=size, seed=seed)
        after = report(student, test, task)
    path = student.save(out_dir)
    data = {"model": str(path), "alpha": alpha, "steps": steps, "teacher_steps": teacher_steps if alpha < 1 else 0,
            "before": before, "after": after, "final_loss": losses[-1]}
    emit(data, as_json, lambda d: click.echo(
        f"student -> {d['model']}\n  within-group R@1 {d['before']['group_r1']:.3f} -> {d['after']['group_r1']:.3f}; "
        f"zero-shot {d['before']['zeroshot']:.3f} -> {d['after']['zeroshot']:.3f}"))
