"""``cliplab curate``: training-data curation of image-text pair tables (MetaCLIP, LaCLIP, VeCLIP).

    cliplab curate metaclip pairs.csv --out curated.parquet --t 1000
    cliplab curate laclip pairs.csv --out rewritten.parquet --rewriter rule --rewrites 4
    cliplab curate veclip pairs.parquet --out vec.parquet --captioner scene-graph --fuser concept

IN and OUT are Parquet or CSV tables (a ``caption`` column, optionally ``image`` and anything else, which is kept).
Rows that cannot be processed (undecodable text, empty caption, no visual caption) go to ``OUT.rejects.jsonl`` with
the reason. Work is committed in chunks under ``OUT.parts/``: rerunning the same command after an interruption
resumes where it stopped, and every row ends up exactly once in OUT or in the rejects.
"""

from __future__ import annotations

import click

from .app import main
from .common import emit, fail, json_option, on_interrupt, progress_option, warnings_to_stderr


def _common(fn):
    fn = click.option("--out", "-o", "out", required=True, type=click.Path(dir_okay=False),
                      help="Output table (.parquet or .csv); OUT.rejects.jsonl and the work folder OUT.parts/ "
                           "are written beside it.")(fn)
    fn = click.option("--caption-column", default="caption", show_default=True, help="The caption column of IN.")(fn)
    fn = click.option("--encoding", default="utf-8", show_default=True, help="Text encoding of a CSV IN.")(fn)
    fn = click.option("--chunk-size", type=click.IntRange(1), default=None,
                      help="Rows per committed chunk (the unit of resumption) [default: the method's own].")(fn)
    fn = click.option("--overwrite", is_flag=True, help="Discard an earlier run's chunks in OUT.parts/.")(fn)
    fn = progress_option()(fn)
    fn = json_option(help="Print the summary as JSON.")(fn)
    return fn


def _summary(method: str, out, result, extra: dict | None = None) -> dict:
    from ..curation.pairs_io import rejects_path

    return {"method": method, "out": str(out), "rows": len(result.rows), "rejects": len(result.rejects),
            "rejects_file": str(rejects_path(out)), "chunks_done": result.chunks_done,
            "chunks_resumed": result.chunks_skipped, **(extra or {})}


def _render(data: dict) -> None:
    for k, v in data.items():
        click.echo(f"{k:<18} {v}")


def _run(method: str, out, fn):
    from ..curation.pairs_io import JobMismatchError
    from ..models.lm import MissingDependency

    try:
        with warnings_to_stderr(), on_interrupt(f"finished chunks are kept in {out}.parts/; run the same command "
                                                "again to resume"):
            return fn()
    except (JobMismatchError, MissingDependency, ValueError, FileNotFoundError) as e:
        fail(str(e), 2 if isinstance(e, (ValueError, FileNotFoundError)) and
             not isinstance(e, JobMismatchError) else 1)


@main.group("curate")
def curate_group():
    """Curate image-text pair tables for CLIP training: MetaCLIP balancing, LaCLIP rewrites, VeCLIP enriched
    captions. Train on the output with `cliplab train` (see docs/methods/metaclip.md, laclip.md, veclip.md)."""


@curate_group.command("metaclip")
@click.argument("src", metavar="IN", type=click.Path(exists=True, dir_okay=False))
@_common
@click.option("--metadata", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Metadata entries, one per line (or a JSON list) [default: built from IN's captions].")
@click.option("--min-count", type=click.IntRange(1), default=5, show_default=True,
              help="Without --metadata: a word (or high-PMI bigram) of IN becomes an entry from this count.")
@click.option("--t", "t", type=click.FloatRange(min=0, min_open=True), default=20000, show_default=True,
              help="Per-entry cap: a head entry keeps about t of its pairs (the paper: 20k for 400M pairs).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the balancing draws.")
@click.option("--lowercase/--case-sensitive", default=None,
              help="Lower-case texts and entries before matching [default: lower-case when the metadata is built "
                   "from IN, case-sensitive with --metadata, as the paper's code].")
def metaclip_cmd(src, out, caption_column, encoding, chunk_size, overwrite, progress, as_json, metadata, min_count,
                 t, seed, lowercase):
    """Keep a balanced subset of IN: match captions against metadata entries, cap each entry at about t pairs.

    \b
    Example:
      cliplab curate metaclip all_captions.csv --out curated.parquet --t 1000
    """
    from ..curation.metaclip import curate_table, read_metadata

    entries = read_metadata(metadata) if metadata else None
    cur, result = _run("metaclip", out, lambda: curate_table(
        src, out, entries=entries, t=t, seed=seed, lowercase=lowercase, min_count=min_count,
        caption_column=caption_column, encoding=encoding, chunk_size=chunk_size or 2048, progress=progress,
        overwrite=overwrite))
    info = {k: result.info[k] for k in ("pairs", "matched_pairs", "kept_pairs", "entries", "head_entries",
                                        "tail_entries", "entropy_before", "entropy_after")}
    data = _summary("metaclip", out, result, info)
    data["rows"] = info["kept_pairs"]
    emit(data, as_json, _render)


@curate_group.command("laclip")
@click.argument("src", metavar="IN", type=click.Path(exists=True, dir_okay=False))
@_common
@click.option("--rewriter", type=click.Choice(["rule", "llm", "identity"]), default="rule", show_default=True,
              help="rule: fast synonym/reorder/frame paraphrases; llm: LaCLIP's in-context prompt on --lm "
                   "(slow on a CPU: seconds per rewrite); identity: no change (a control).")
@click.option("--rewrites", "k", type=click.IntRange(1, 9), default=4, show_default=True, help="Rewrites per caption (k).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the rewrites (and example draws).")
@click.option("--lm", "lm_name", default="smollm2-135m", show_default=True, help="With --rewriter llm: the LM.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=40, show_default=True,
              help="With --rewriter llm: tokens generated per rewrite.")
def laclip_cmd(src, out, caption_column, encoding, chunk_size, overwrite, progress, as_json, rewriter, k, seed,
               lm_name, max_new_tokens):
    """Add k rewrites of every caption (column rewrites); train with `--preset laclip-tiny`.

    \b
    Example:
      cliplab curate laclip pairs.csv --out rewritten.parquet --rewrites 4
      cliplab train --preset laclip-tiny --set data.options.path=rewritten.parquet
    """
    from ..curation.laclip import IdentityRewriter, LLMRewriter, RuleRewriter, rewrite_table

    def run():
        if rewriter == "llm":
            rw = LLMRewriter(seed=seed, max_new_tokens=max_new_tokens, lm_name=lm_name)
        else:
            rw = RuleRewriter(seed=seed) if rewriter == "rule" else IdentityRewriter()
        return rewrite_table(src, out, rw, k=k, caption_column=caption_column, encoding=encoding,
                             chunk_size=chunk_size or 64, progress=progress, overwrite=overwrite)

    emit(_summary("laclip", out, _run("laclip", out, run), {"k": k, "rewriter": rewriter}), as_json, _render)


@curate_group.command("veclip")
@click.argument("src", metavar="IN", type=click.Path(exists=True, dir_okay=False))
@_common
@click.option("--captioner", type=click.Choice(["scene-graph", "column"]), default="scene-graph", show_default=True,
              help="scene-graph: describe the synthetic scene graph of column objects; column: visual captions "
                   "made elsewhere (--visual-column).")
@click.option("--visual-column", default="visual_caption", show_default=True,
              help="With --captioner column: the column holding the visual captions.")
@click.option("--drop-small", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="With --captioner scene-graph: chance of leaving out each small object.")
@click.option("--fuser", type=click.Choice(["concept", "llm", "identity"]), default="concept", show_default=True,
              help="concept: visual caption + the alt-text's non-boilerplate words; llm: fusion by --lm; "
                   "identity: the alt-text (a control).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the captioner's omissions.")
@click.option("--lm", "lm_name", default="smollm2-135m", show_default=True, help="With --fuser llm: the LM.")
def veclip_cmd(src, out, caption_column, encoding, chunk_size, overwrite, progress, as_json, captioner,
               visual_column, drop_small, fuser, seed, lm_name):
    """Add a visual caption and a fused VeC to every row (visual_caption, vec_caption); train with
    `--preset veclip-tiny` (VeC-mixing).

    \b
    Example:
      cliplab curate veclip pairs.csv --out vec.parquet
      cliplab train --preset veclip-tiny --set data.options.path=vec.parquet
    """
    from ..curation.veclip import (ColumnCaptioner, ConceptFuser, IdentityFuser, LLMFuser, SceneGraphCaptioner,
                                   enrich_table)

    def run():
        cap = (SceneGraphCaptioner(drop_small=drop_small, seed=seed) if captioner == "scene-graph"
               else ColumnCaptioner(visual_column))
        fu = {"concept": ConceptFuser, "identity": IdentityFuser}.get(fuser)
        fu = fu() if fu else LLMFuser(lm_name=lm_name)
        return enrich_table(src, out, cap, fu, caption_column=caption_column, encoding=encoding,
                            chunk_size=chunk_size or 64, progress=progress, overwrite=overwrite)

    emit(_summary("veclip", out, _run("veclip", out, run), {"captioner": captioner, "fuser": fuser}), as_json,
         _render)
