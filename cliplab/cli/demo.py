"""``cliplab demo``: generate, embed, index, search, classify, and write an HTML report, offline."""

from __future__ import annotations

import click

from .app import emit, main
from .common import json_option, model_option, out_option, progress_option, top_k_option, warnings_to_stderr


@main.command("demo")
@model_option()
@out_option("Where the report, embeddings and index go.", default="cliplab-demo")
@click.option("--n", "n", type=click.IntRange(10), default=500, show_default=True, help="Gallery size (scenes).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the synthetic world.")
@top_k_option(default=5, help="Results per query.", max_k=50)
@progress_option()
@json_option(help="Print the summary as JSON.")
def demo_cmd(model, out_dir, n, seed, top_k, progress, as_json):
    """Run the main job end to end on the shipped model, offline, in about a minute.

    Generates a gallery of synthetic scenes, embeds it (sharded Parquet), builds a vector index, runs example
    text and image queries, classifies colours and shapes zero-shot, and writes OUT/report.html (thumbnails and
    plots inline) plus OUT/summary.json.

    \b
    Examples:
      cliplab demo
      cliplab demo -o my-demo --n 200 --json
    """
    from ..apps.demo import run_demo

    with warnings_to_stderr():
        result = run_demo(model, out_dir, n=n, seed=seed, k=top_k, progress=progress)
    s = result.summary

    def render(d):
        click.echo(f"cliplab demo: {d['model']} on {d['gallery']} synthetic scenes "
                   f"({d['timings_s']['total']} s, embedding at {d['embed_items_per_s']} scenes/s)")
        if d["random_weights"]:
            click.echo("  note: random weights, so the quality numbers are chance level")
        r = d["retrieval"]
        click.echo(f"  index: {d['index']['kind']} over {d['index']['n']} vectors (dim {d['index']['dim']})")
        click.echo(f"  text->image recall@1/5/10: {r['text_to_image_r@1']:.1%} / {r['text_to_image_r@5']:.1%} / "
                   f"{r['text_to_image_r@10']:.1%}   image->text recall@5: {r['image_to_text_r@5']:.1%}")
        for kind, z in d["zero_shot"].items():
            click.echo(f"  zero-shot {kind}: {z['accuracy']:.1%} (chance {z['chance']:.1%}, {z['n']} images)")
        for q in d["text_queries"][:3]:
            click.echo(f"  \"{q['query']}\" -> {q['top'][0]}")
        click.echo(f"  report: {d['report']}")

    emit(s, as_json, render)
