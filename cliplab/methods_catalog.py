"""The catalogue of every seed paper (49 methods, 3 surveys): slug, title, the capability package it belongs to and
the open issue that plans it.

Status is not stored: it comes from the method registry (:mod:`cliplab.methods`), so a paper is "implemented" exactly
when a module registers its slug. ``cliplab methods --all`` prints the catalogue; ``docs/methods/README.md`` is
written from it by ``python -m cliplab.methods_catalog --write-readme`` (a test keeps the committed file in sync).

Sources: the seed ``../shared/seeds/000_7f58357612a1733c.txt`` (titles, in order), the method notes in
``../shared/methods/`` (slugs, which papers are surveys, capability modules) and the issues that plan each method.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

METHOD, SURVEY = "method", "survey"
IMPLEMENTED, NOT_YET = "implemented", "not yet"

#: the three surveys have no method of their own; what they survey is covered here
SURVEY_NOTE = "no method of its own; its pooling baselines: cliplab.text.pooling (docs/text_models.md)"

README = Path(__file__).resolve().parent.parent / "docs" / "methods" / "README.md"


@dataclass(frozen=True)
class Paper:
    number: int        # position in the seed (1..52)
    slug: str          # the slug of the method notes and of register_method
    name: str          # short name, e.g. "CoOp"
    title: str         # the paper's title as the seed gives it
    kind: str          # METHOD or SURVEY
    capability: str    # the cliplab package it lives (or will live) in; "" for surveys
    issue: int | None = None   # the open issue that plans it (or audits it, when implemented)


def _m(number, slug, name, title, capability, issue=None):
    return Paper(number, slug, name, title, METHOD, capability, issue)


def _s(number, slug, name, title):
    return Paper(number, slug, name, title, SURVEY, "")


PAPERS: tuple[Paper, ...] = (
    _m(1, "rtd", "RTD", "Reducing Task Discrepancy of Text Encoders for Zero-Shot Composed Image Retrieval",
       "cir"),
    _m(2, "wiclp", "WiCLP", "Understanding and Mitigating Compositional Issues in Text-to-Image Generative Models",
       "t2i"),
    _m(3, "attribute_control", "Attribute control", "Continuous, Subject-Specific Attribute Control in T2I Models "
       "by Identifying Semantic Directions", "text_edit"),
    _m(4, "core", "CoRe", "CoRe: Context-Regularized Text Embedding Learning for Text-to-Image Personalization",
       "t2i"),
    _m(5, "lightclip", "LightCLIP", "LightCLIP: Learning Multi-Level Interaction for Lightweight Vision-Language "
       "Models", "objectives"),
    _m(6, "long_clip", "Long-CLIP", "Long-CLIP: Unlocking the Long-Text Capability of CLIP", "longtext"),
    _m(7, "mcip", "MCIP", "Optimizing CLIP Models for Image Retrieval with Maintained Joint-Embedding Alignment",
       "objectives"),
    _m(8, "aclip", "A-CLIP", "Attentive Mask CLIP", "objectives"),
    _m(9, "proclip", "ProCLIP", "ProCLIP: Progressive Vision-Language Alignment via LLM-based Embedder", "longtext"),
    _m(10, "text2token", "Text2Token", "Text2Token: Unsupervised Text Representation Learning with Token Target "
       "Prediction", "textrep"),
    _m(11, "sce", "Dissecting CLIP", "Dissecting CLIP: Decomposition with a Schur Complement-based Approach",
       "metrics"),
    _m(12, "dptr", "DPTR", "Decoder Pre-Training with only Text for Scene Text Recognition", "scenetext"),
    _m(13, "nola", "NoLA", "CLIP meets DINO for Tuning Zero-Shot Classifier using Unlabeled Image Collections",
       "zeroshot", 20),
    _m(14, "rave", "RAVE", "RAVE: Residual Vector Embedding for CLIP-Guided Backlit Image Enhancement", "enhance"),
    _m(15, "maft_plus", "MAFT+", "Collaborative Vision-Text Representation Optimizing for Open-Vocabulary "
       "Segmentation", "dense"),
    _m(16, "ga_dms", "GA-DMS", "Gradient-Attention Guided Dual-Masking Synergetic Framework for Robust Text-based "
       "Person Retrieval", "objectives"),
    _m(17, "denseclip", "DenseCLIP", "DenseCLIP: Language-Guided Dense Prediction with Context-Aware Prompting",
       "dense"),
    _m(18, "dupmae", "RetroMAE v2", "RetroMAE v2: Duplex Masked Auto-Encoder For Pre-Training "
       "Retrieval-Oriented Language Models", "textrep"),
    _m(19, "llm2clip", "LLM2CLIP", "LLM2CLIP: Powerful Language Model Unlock Richer Visual Representation",
       "longtext"),
    _m(20, "tcc_compress", "Token-correlation compression", "Token-level Correlation-guided Compression for "
       "Efficient Multimodal Document Understanding", "vision_tokens", 22),
    _m(21, "token_prepending", "Token Prepending", "Token Prepending: A Training-Free Approach for Eliciting Better "
       "Sentence Embeddings from LLMs", "text_edit"),
    _m(22, "cloc", "CLOC", "Contrastive Localized Language-Image Pre-Training", "dense"),
    _m(23, "comclip", "ComCLIP", "ComCLIP: Training-Free Compositional Image and Text Matching", "zeroshot", 20),
    _m(24, "read_sasp", "READ (similarity-as-points)", "Reasoning to Attend: Try to Understand How <SEG> Token "
       "Works", "dense"),
    _m(25, "excel", "ExCEL", "Exploring CLIP's Dense Knowledge for Weakly Supervised Semantic Segmentation",
       "dense"),
    _m(26, "ltok", "Learn Your Tokens", "Learn Your Tokens: Word-Pooled Tokenization for Language Modeling",
       "textrep"),
    _m(27, "mocoop", "MoCoOp", "Mixture of Prompt Learning for Vision Language Models", "zeroshot", 20),
    _m(28, "unime", "UniME", "Breaking the Modality Barrier: Universal Embedding Learning with Multimodal LLMs",
       "objectives"),
    _m(29, "un2clip", "un^2CLIP", "un^2CLIP: Improving CLIP's Visual Detail Capturing Ability via Inverting unCLIP",
       "objectives"),
    _m(30, "cgtgan", "CgT-GAN", "CgT-GAN: CLIP-guided Text GAN for Image Captioning", "captioning"),
    _m(31, "clippings", "CLIPPINGS", "Linking Representations with Multimodal Contrastive Learning", "apps"),
    _m(32, "follow_the_flow", "Follow the Flow", "Follow the Flow: On Information Flow Across Textual Tokens in "
       "Text-to-Image Models", "text_edit"),
    _m(33, "lexinvariant_lm", "Lexinvariant LM", "Lexinvariant Language Models", "textrep"),
    _s(34, "survey_llm_text_emb", "Survey: text embeddings and LLMs", "When Text Embedding Meets Large Language "
       "Model: A Comprehensive Survey"),
    _m(35, "centerclip", "CenterCLIP", "CenterCLIP: Token Clustering for Efficient Text-Video Retrieval",
       "vision_tokens", 22),
    _m(36, "dclip", "Distill CLIP (DCLIP)", "Distill CLIP (DCLIP): Enhancing Image-Text Retrieval via Cross-Modal "
       "Transformer Distillation", "objectives"),
    _m(37, "veclip", "VeCLIP", "From Scarcity to Efficiency: Improving CLIP Training via Visual-enriched Captions",
       "curation"),
    _m(38, "laclip", "LaCLIP", "Improving CLIP Training with Language Rewrites", "curation"),
    _m(39, "hqclip", "HQ-CLIP", "HQ-CLIP: Leveraging Large Vision-Language Models to Create High-Quality Image-Text "
       "Datasets and CLIP Models", "objectives"),
    _m(40, "binary_pv_dsg", "Binary PV / DSG", "Vector representations of text data in deep learning", "textrep"),
    _m(41, "grain", "GRAIN", "Grounding Descriptions in Images informs Zero-Shot Visual Recognition", "zeroshot",
       20),
    _m(42, "clip4dm", "CLIP4DM", "Extract Free Dense Misalignment from CLIP", "metrics"),
    _m(43, "coop", "CoOp", "Learning to Prompt for Vision-Language Models", "zeroshot", 20),
    _m(44, "fdp", "FDP", "Focus, Distinguish, and Prompt: Unleashing CLIP for Efficient and Flexible Scene Text "
       "Retrieval", "scenetext"),
    _m(45, "decor", "DECOR", "DECOR: Decomposition and Projection of Text Embeddings for Text-to-Image "
       "Customization", "text_edit"),
    _s(46, "survey_word_to_mm", "Survey: word vectors to multimodal embeddings", "From Word Vectors to Multimodal "
       "Embeddings: Techniques, Applications, and Future Directions For Large Language Models"),
    _m(47, "gem", "GEM", "GEM: Empowering LLM for both Embedding Generation and Language Understanding", "textrep"),
    _m(48, "ella", "ELLA", "ELLA: Equip Diffusion Models with LLM for Enhanced Semantic Alignment", "t2i"),
    _s(49, "survey_gpte", "Survey: pretrained LMs in text embeddings", "On The Role of Pretrained Language Models in "
       "General-Purpose Text Embeddings: A Survey"),
    _m(50, "zett", "ZeTT", "Zero-Shot Tokenizer Transfer", "textrep"),
    _m(51, "metaclip", "MetaCLIP", "Demystifying CLIP Data", "curation"),
    _m(52, "recoverable_compression", "Recoverable Compression", "Recoverable Compression: A Multimodal Vision Token "
       "Recovery Mechanism Guided by Text Information", "vision_tokens", 22),
)

BY_SLUG: dict[str, Paper] = {p.slug: p for p in PAPERS}


def _registered() -> dict:
    from .methods import list_methods

    registered = {m.slug: m for m in list_methods()}
    unknown = sorted(set(registered) - set(BY_SLUG))
    if unknown:  # every implemented method is one of the seed papers: anything else is a defect
        raise ValueError(f"methods registered under slugs the seed-paper catalogue does not know: {unknown}; "
                         f"use a paper's slug (cliplab/methods_catalog.py) or add the paper there")
    return registered


def catalog(pattern: str = "*") -> list[dict]:
    """Every seed paper whose slug matches ``pattern``, in seed order, with its status from the method registry:
    ``implemented`` (``module`` and ``doc`` set), ``not yet`` (``issue`` says which issue plans it) or ``survey``."""
    registered = _registered()
    rows = []
    for paper in PAPERS:
        if not fnmatch.fnmatch(paper.slug, pattern):
            continue
        row = asdict(paper)
        info = registered.get(paper.slug)
        row["status"] = SURVEY if paper.kind == SURVEY else IMPLEMENTED if info else NOT_YET
        row["module"] = info.module if info else ""
        row["doc"] = info.doc if info else ""
        row["note"] = SURVEY_NOTE if paper.kind == SURVEY else ""
        rows.append(row)
    return rows


def counts(rows: list[dict]) -> dict:
    """How many of ``rows`` are methods, implemented methods and surveys, with the one-line summary."""
    methods = sum(r["kind"] == METHOD for r in rows)
    implemented = sum(r["status"] == IMPLEMENTED for r in rows)
    surveys = sum(r["kind"] == SURVEY for r in rows)
    line = f"{implemented} of {methods} methods implemented, {surveys} survey{'s' * (surveys != 1)}"
    return {"implemented": implemented, "methods": methods, "surveys": surveys, "summary": line}


def where(row: dict) -> str:
    """Where a paper lives (module), is planned (issue and package) or what covers it (surveys), in one phrase."""
    if row["status"] == IMPLEMENTED:
        return f"{row['module']}, {row['doc']}" if row["doc"] else row["module"]
    if row["status"] == SURVEY:
        return row["note"]
    planned = f"issue {row['issue']}" if row["issue"] else "no issue yet"
    return f"{planned} (cliplab/{row['capability']})"


def render_text(rows: list[dict]) -> str:
    lines = [f"{r['number']:>2}  {r['slug']:<24} {r['status']:<12} {where(r)}" for r in rows]
    return "\n".join(lines + [counts(rows)["summary"]])


def render_readme(rows: list[dict] | None = None) -> str:
    """The text of docs/methods/README.md: every seed paper with its status, from the catalogue and the registry."""
    rows = catalog() if rows is None else rows
    out = [
        "# Seed papers and their methods",
        "",
        "<!-- Generated by `python -m cliplab.methods_catalog --write-readme` from cliplab/methods_catalog.py and the",
        "     method registry; do not edit by hand (tests/test_methods_catalog.py checks it is current). -->",
        "",
        f"Every paper of the seed, in its order: **{counts(rows)['summary']}**. An implemented method is a module",
        "that registers the paper's slug (`cliplab.methods.register_method`) and has a page here; a method not yet",
        "implemented names the issue that plans it and the package it will live in. `cliplab methods --all` prints",
        "the same list (`--json` for scripts).",
        "",
        "| # | slug | paper | kind | status | module / planned issue |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] == IMPLEMENTED and r["doc"]:
            status = f"[implemented]({Path(r['doc']).name})"
        else:
            status = r["status"]
        if r["status"] == IMPLEMENTED:
            place = f"`{r['module']}`" + (f" (open follow-up: issue {r['issue']})" if r["issue"] else "")
        elif r["status"] == SURVEY:
            place = "no method of its own; its pooling baselines: `cliplab.text.pooling` " \
                    "([text models](../text_models.md))"
        else:
            place = (f"issue {r['issue']}" if r["issue"] else "no issue yet") + f", `cliplab/{r['capability']}`"
        name, title = r["name"], r["title"]
        paper = f"**{name}**{title[len(name):]}" if title.startswith(name + ":") else f"**{name}**: {title}"
        paper = paper.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
        out.append(f"| {r['number']} | `{r['slug']}` | {paper} | {r['kind']} | {status} | {place} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cliplab.methods_catalog", description=__doc__.split("\n")[0])
    parser.add_argument("--write-readme", action="store_true", help=f"write {README}")
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed README is out of date")
    args = parser.parse_args(argv)
    text = render_readme()
    if args.write_readme:
        README.write_text(text)
        print(f"wrote {README}")
    elif args.check:
        current = README.read_text() if README.is_file() else ""
        if current != text:
            print(f"{README} is out of date: run python -m cliplab.methods_catalog --write-readme", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(render_text(catalog()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
