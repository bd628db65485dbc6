"""LaCLIP: language rewrites of the training captions, and training that draws one version per visit.

Paper: Fan et al., "Improving CLIP Training with Language Rewrites" (NeurIPS 2023); code ``LijieFan/LaCLIP``
(``rewrite/llama_rewrite.py``, ``data.py``), read to understand, not copied.

The method acts on the data: each caption gets ``k`` rewrites by an LLM prompted with three in-context
input => output pairs, and every time training sees an image it takes one of ``[original, r1, ..., rk]``
uniformly (``cliplab.curation.multicaption``: source and sampler ``caption-versions``). The model, its layers and
the loss are CLIP's, untouched.

* Prompt (:func:`build_prompt`)::

      write image captions differently,\\n\\n{s1} => {t1}\\n\\n{s2} => {t2}\\n\\n{s3} => {t3}\\n\\n{caption} =>

  The three pairs are drawn without replacement from the meta pairs (:func:`sample_examples`).
* Parser (:func:`parse_rewrite`): the official code splits prompt + generation into lines, takes line 8 (the
  caption's line) and the text after its ``=>``, stripped. Our LMs return only the new text, so the parser joins it
  back onto the prompt and does the same.

Differences from the paper, and why:

* **LLM.** LLaMA-7B is not available here; :class:`LLMRewriter` runs SmolLM2-135M-Instruct (the real text model
  shipped with cliplab), which rewrites worse. :class:`cliplab.curation.rewriters.RuleRewriter` is the fast default
  of ``cliplab curate laclip`` (synonyms, reordering, sentence frames; no model).
* **Decoding.** The paper samples (temperature 0.9, top-p 0.95, up to 77 tokens); ``CausalLM.generate`` is greedy,
  so the rewrites of one caption differ through their in-context examples (drawn per version), and generation stops
  after ``max_new_tokens`` (default 40: only the first line is used).
* **Meta pairs.** The paper's four sources (ChatGPT, Bard, COCO, human) are lists in its repository; we do not copy
  them. :data:`META_PAIRS` are pairs written for cliplab in the same spirit, and :func:`same_image_pairs` builds the
  paper's "COCO" kind of source from any dataset with several captions per image (Flickr8k here).
* **Prompt whitespace.** The official prompt string is an indented triple-quoted literal, so its example lines start
  with 12 spaces; the paper's figure and our prompt have none.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..methods import register_method
from .rewriters import (IdentityRewriter, Rewriter, RuleRewriter, complete, in_context_prompt, load_llm,
                        stable_hash)

__all__ = ["PROMPT_HEADER", "META_PAIRS", "build_prompt", "parse_rewrite", "sample_examples", "same_image_pairs",
           "LLMRewriter", "rewrite_captions", "rewrite_table", "Rewriter", "RuleRewriter", "IdentityRewriter", "DEFAULT_K"]

register_method("laclip", "Improving CLIP Training with Language Rewrites (LaCLIP)",
                "k LLM rewrites per caption from an in-context prompt; training draws one version uniformly per visit",
                doc="docs/methods/laclip.md")(__name__)

PROMPT_HEADER = "write image captions differently,"
#: rewrites per caption (the paper: one per meta-pair source, four)
DEFAULT_K = 4

#: input => output pairs written for cliplab (the paper's lists are not copied): short alt-text-like captions and
#: fluent rewrites that keep their content
META_PAIRS: tuple[tuple[str, str], ...] = (
    ("dog running on beach", "A dog sprints across the sandy beach."),
    ("red car parked street", "A red car is parked at the side of the street."),
    ("two kids playing soccer in park", "Two children kick a soccer ball around in a park."),
    ("a man rides his bike", "A cyclist pedals along on his bicycle."),
    ("woman with umbrella in the rain", "A woman holds an umbrella while walking through the rain."),
    ("cat sleeping on sofa", "A cat naps curled up on the couch."),
    ("sunset over the mountains", "The sun sets behind a range of mountains."),
    ("girl eating ice cream", "A young girl enjoys an ice cream cone."),
    ("boats in the harbor", "Several boats are docked in the harbour."),
    ("a child jumps into a pool", "A kid leaps into the swimming pool."),
    ("old man reading newspaper on bench", "An elderly man reads the paper while sitting on a bench."),
    ("people walking in city at night", "Pedestrians stroll through the city streets at night."),
)


def build_prompt(caption: str, examples: Sequence[tuple[str, str]]) -> str:
    """LaCLIP's prompt for ``caption`` with three in-context ``(input, output)`` pairs (module docstring). Line
    breaks inside the caption are removed, as in the official code."""
    if len(examples) != 3:
        raise ValueError(f"LaCLIP's prompt takes exactly 3 example pairs, got {len(examples)}")
    return in_context_prompt(PROMPT_HEADER, examples, caption)


def parse_rewrite(prompt: str, generated: str) -> str | None:
    """The rewrite in an LM's continuation of :func:`build_prompt`'s prompt: line 8 of prompt + continuation, after
    its ``=>``, stripped (the official parser). ``None`` when there is nothing there."""
    lines = (prompt + generated).split("\n")
    if len(lines) <= 8 or "=>" not in lines[8]:
        return None
    text = lines[8].strip().split("=>")[1].strip()
    return text or None


def sample_examples(pairs: Sequence[tuple[str, str]], rng: np.random.Generator, n: int = 3) -> list[tuple[str, str]]:
    """``n`` distinct pairs drawn uniformly without replacement (``random.sample`` in the official code)."""
    if len(pairs) < n:
        raise ValueError(f"need at least {n} meta pairs, got {len(pairs)}")
    return [tuple(pairs[int(i)]) for i in rng.choice(len(pairs), size=n, replace=False)]


def same_image_pairs(captions_by_image: dict[str, Sequence[str]], rng: np.random.Generator | int = 0,
                     limit: int | None = None) -> list[tuple[str, str]]:
    """The paper's "COCO" meta source: for each image with two or more captions, two different captions of it as an
    ``(input, output)`` pair (two people describing the same picture differently)."""
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    out = []
    for key in sorted(captions_by_image):
        caps = [c.strip() for c in captions_by_image[key] if c and c.strip()]
        if len(caps) >= 2:
            a, b = rng.choice(len(caps), size=2, replace=False)
            out.append((caps[int(a)], caps[int(b)]))
        if limit is not None and len(out) >= limit:
            break
    return out


class LLMRewriter:
    """LaCLIP's rewriter on a ``cliplab.text`` causal LM (default SmolLM2-135M-Instruct). For version ``v`` of a
    caption the in-context pairs are drawn from ``default_rng([seed, v, hash(caption)])``, so rewrites are
    reproducible and differ between versions. When the LM's answer does not parse, the caption itself is returned
    (and counted in ``failures``), so training still has a valid version."""

    def __init__(self, lm=None, meta_pairs: Sequence[tuple[str, str]] = META_PAIRS, seed: int = 0,
                 max_new_tokens: int = 40, lm_name: str = "smollm2-135m"):
        self.lm = lm if lm is not None else load_llm(lm_name)
        self.meta_pairs = [tuple(p) for p in meta_pairs]
        if len(self.meta_pairs) < 3:
            raise ValueError(f"need at least 3 meta pairs, got {len(self.meta_pairs)}")
        self.seed, self.max_new_tokens = int(seed), int(max_new_tokens)
        self.failures = 0

    def __repr__(self) -> str:
        return f"LLMRewriter(lm={getattr(self.lm, 'name', self.lm)!r}, seed={self.seed})"

    def prompt(self, caption: str, version: int = 0) -> str:
        rng = np.random.default_rng([self.seed, int(version), stable_hash(caption)])
        return build_prompt(caption, sample_examples(self.meta_pairs, rng))

    def rewrite_one(self, caption: str, version: int = 0) -> str:
        prompt = self.prompt(caption, version)
        text = parse_rewrite(prompt, complete(self.lm, prompt, self.max_new_tokens))
        if text is None:
            self.failures += 1
            return caption
        return text

    def __call__(self, captions: Sequence[str], version: int = 0) -> list[str]:
        return [self.rewrite_one(c, version) for c in captions]


def rewrite_captions(captions: Sequence[str], rewriter: Rewriter, k: int = DEFAULT_K) -> list[list[str]]:
    """``k`` rewrites of every caption (versions ``0..k-1`` of ``rewriter``): ``out[i]`` are caption ``i``'s."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    per_version = [rewriter(list(captions), version=v) for v in range(k)]
    return [[per_version[v][i] for v in range(k)] for i in range(len(captions))]


def rewrite_table(src, out, rewriter: Rewriter | None = None, k: int = DEFAULT_K, caption_column: str = "caption",
                  encoding: str = "utf-8", chunk_size: int = 64, progress: bool | None = None,
                  overwrite: bool = False):
    """LaCLIP's data step for a pairs table: every usable row of ``src`` with a ``rewrites`` list of ``k`` rewrites
    of its caption (``rewriter``, default :class:`RuleRewriter`), written to ``out``; resumable in chunks of
    ``chunk_size`` rows; rejects in ``OUT.rejects.jsonl``. Train on it with the ``laclip-tiny`` preset (or the
    ``caption-versions`` source over ``["caption", "rewrites"]``). Returns the ``RowJobResult``."""
    from .pairs_io import finish, read_pairs, run_rows

    rewriter = RuleRewriter() if rewriter is None else rewriter
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    pairs = read_pairs(src, caption_column, encoding)

    def process(rows):
        captions = [r[caption_column] for r in rows]
        return [({**r, "rewrites": versions}, None) for r, versions in zip(rows, rewrite_captions(captions, rewriter, k))]

    job = {"method": "laclip", "rewriter": repr(rewriter), "k": int(k)}
    result = run_rows(pairs, out, process, job, chunk_size=chunk_size, progress=progress, overwrite=overwrite,
                      desc="laclip rewrite")
    finish(out, result.rows, result.rejects, src=src)
    return result
