"""``cliplab caption``: train an unpaired captioner with CgT-GAN on the synthetic world, and caption images with it
(:mod:`cliplab.captioning`)."""

from __future__ import annotations

from pathlib import Path

import click

from .app import main
from .common import emit, fail, json_option, model_option, warnings_to_stderr


@main.group("caption")
def caption_group():
    """Image captioning from a frozen CLIP: CgT-GAN training and greedy captions (docs/methods/cgtgan.md)."""


@caption_group.command("train")
@model_option()
@click.option("--images", type=click.IntRange(1), default=256, show_default=True,
              help="Unpaired synthetic training images (their captions are never seen).")
@click.option("--corpus", type=click.IntRange(2), default=1000, show_default=True,
              help="Captions of other synthetic scenes: the unpaired text corpus.")
@click.option("--init-steps", type=click.IntRange(0), default=150, show_default=True,
              help="Stage 1: text-only maximum likelihood, each caption conditioned on its own CLIP text embedding.")
@click.option("--steps", type=click.IntRange(1), default=200, show_default=True,
              help="Stage 2: SCST with the CLIP-aggregation reward and the discriminator's.")
@click.option("--test", "n_test", type=click.IntRange(1), default=64, show_default=True,
              help="Held-out scenes to report caption-to-image R@1 and the grammar-parse rate on.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "-o", "out_file", type=click.Path(dir_okay=False), required=True,
              help="Where to save the generator (for `cliplab caption images --generator`).")
@json_option()
def train_cmd(model, images, corpus, init_steps, steps, n_test, seed, out_file, as_json):
    """Train a CgT-GAN captioner for MODEL's image embeddings on unpaired synthetic images and captions.

    \b
    Example:
      cliplab caption train -o captioner.pt --steps 300
    """
    from ..captioning import cgtgan as C
    from ..pipeline.modelref import resolve_model

    with warnings_to_stderr():
        net, _ = resolve_model(model)
        net.eval()
        size = net.config.vision.image_size
        train, texts, test, test_caps = C.synthetic_unpaired_data(images, corpus, n_test, seed=seed, image_size=size)
        corpus_emb = C.CachedTextEncoder(net)(texts)
        img, test_img = net.encode_images(train, normalize=True), net.encode_images(test, normalize=True)
        gen = C.new_generator(img.shape[1], seed=seed)
        C.text_only_init(gen, net, texts, steps=init_steps, corpus_emb=corpus_emb, seed=seed)
        C.train_cgtgan(gen, net, img, texts, corpus_emb=corpus_emb, steps=steps, seed=seed)
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    gen.save(out_file)
    captions = gen.caption(test_img)
    data = {"generator": str(out_file), "steps": steps, "init_steps": init_steps, "test_images": n_test,
            "r1": C.retrieval_r1(net, test_img, captions), "parse_rate": C.parse_rate(captions),
            "ground_truth_r1": C.retrieval_r1(net, test_img, test_caps), "examples": captions[:3]}
    emit(data, as_json, lambda d: click.echo(
        f"captioner -> {d['generator']}\n  held-out caption-to-image R@1 {d['r1']:.3f} (ground-truth captions "
        f"{d['ground_truth_r1']:.3f}), parse rate {d['parse_rate']:.2f}\n  e.g. " + "; ".join(d["examples"])))


@caption_group.command("images")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--generator", "generator_path", type=click.Path(exists=True, dir_okay=False), required=True,
              help="A captioner from `cliplab caption train`.")
@model_option(help="The CLIP model the captioner was trained with [default: the shipped model].")
@click.option("--max-len", type=click.IntRange(1), default=20, show_default=True, help="Longest caption, in words.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@json_option()
def images_cmd(images, generator_path, model, max_len, batch_size, as_json):
    """Caption IMAGES greedily: prints one `path<TAB>caption` line per image.

    \b
    Example:
      cliplab caption images photos/*.png --generator captioner.pt
    """
    from PIL import Image

    from ..captioning import CaptionGenerator
    from ..captioning.cgtgan import caption_images
    from ..pipeline.modelref import resolve_model

    try:
        pictures = [Image.open(p).convert("RGB") for p in images]
    except OSError as e:
        fail(f"cannot read an image: {e}", 1)
    with warnings_to_stderr():
        net, _ = resolve_model(model)
        try:
            captions = caption_images(net.eval(), CaptionGenerator.load(generator_path), pictures,
                                      batch_size=batch_size, max_len=max_len)
        except ValueError as e:  # a generator trained for another model's embedding size
            fail(str(e), 2)
    rows = [{"path": p, "caption": c} for p, c in zip(images, captions)]
    emit(rows, as_json, lambda d: [click.echo(f"{r['path']}\t{r['caption']}") for r in d])
