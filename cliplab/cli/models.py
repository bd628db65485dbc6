"""``cliplab models``, ``cliplab info``, ``cliplab convert``."""

from __future__ import annotations

import click

from .app import emit, main


@main.command("models")
@click.argument("pattern", default="*")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_models_cmd(pattern: str, as_json: bool):
    """List registered architectures (and shipped pretrained models) matching PATTERN, e.g. '*B-32*'."""
    import cliplab

    data = {"architectures": cliplab.list_models(pattern), "pretrained": cliplab.list_pretrained()}
    emit(data, as_json, lambda d: [click.echo(n) for n in d["architectures"]]
         + [click.echo(f"{n} (pretrained)") for n in d["pretrained"]])


@main.command("info")
@click.argument("source")
@click.option("--arch", default=None, help="Architecture name or config JSON (when it cannot be inferred).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info_cmd(source: str, arch: str | None, as_json: bool):
    """Load SOURCE (pretrained name, directory or weights file) and describe it."""
    import cliplab

    model = cliplab.load(source, arch=arch)
    cfg = model.config
    data = {"name": cfg.name, "parameters": sum(p.numel() for p in model.parameters()),
            "embed_dim": cfg.embed_dim, "logit_scale": model.logit_scale.item(), "config": cfg.to_dict()}
    skip = " + max-skip" if cfg.vision.stem_max_skip else ""
    stem = f" (conv stem {'-'.join(map(str, cfg.vision.stem_channels))}{skip})" if cfg.vision.stem_channels else ""
    emit(data, as_json, lambda d: click.echo(
        f"{d['name']}: {d['parameters'] / 1e6:.1f}M parameters, embed_dim {d['embed_dim']}, "
        f"image {cfg.vision.image_size}px/{cfg.vision.patch_size}{stem}, context {cfg.text.context_length}, "
        f"act {cfg.vision.act}, crop {cfg.preprocess.crop_rounding}"))


@main.command("convert")
@click.argument("source")
@click.argument("out")
@click.option("--to", "layout", type=click.Choice(["cliplab", "hf", "openai"]), required=True,
              help="Target layout: cliplab/hf write a directory, openai a .safetensors file.")
@click.option("--arch", default=None, help="Architecture of SOURCE when it cannot be inferred.")
def convert_cmd(source: str, out: str, layout: str, arch: str | None):
    """Convert a checkpoint between layouts, exactly (renames, transposes and splits only)."""
    import cliplab

    path = cliplab.convert(cliplab.load(source, arch=arch), layout, out)
    click.echo(f"wrote {layout} layout to {path}")


@main.command("methods")
@click.argument("pattern", default="*")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def methods_cmd(pattern: str, as_json: bool):
    """List the seed papers' methods implemented in cliplab (slug, module, what it does)."""
    from dataclasses import asdict

    from ..methods import list_methods

    data = [asdict(m) for m in list_methods(pattern)]
    emit(data, as_json, lambda d: [click.echo(f"{m['slug']:<20} {m['module']:<40} {m['summary']}") for m in d])
