"""VeCLIP: visual-enriched captions (VeC) fused from the noisy alt-text and an image-only caption, and VeC-mixing.

Paper: Lai et al., "VeCLIP: Improving CLIP Training via Visual-enriched Captions" (ECCV 2024; arXiv title "From
Scarcity to Efficiency: Improving CLIP Training via Visual-enriched Captions"); ``apple/ml-veclip`` has only a README,
so this follows the paper.

The method acts on the data; CLIP's model and loss are untouched.

1. A **captioner** describes each image without seeing its alt-text (LLaVA with a short-description prompt in the
   paper; :mod:`cliplab.curation.captioners` here).
2. A **fuser** (an LLM in the paper) merges the alt-text and the visual caption into one VeC that keeps the
   alt-text's knowledge (names, brands) and adds what the image shows.
3. **VeC-mixing**: training draws the alt-text or the VeC for each example, each with probability 1/2
   (``cliplab.curation.multicaption``, versions ``["caption", "vec_caption"]``).

Differences from the paper, and why:

* **Captioner.** No VLM runs here. On the synthetic world :class:`SceneGraphCaptioner` reads the scene graph with
  realistic omissions; any image-to-text model plugs into the ``Captioner`` protocol; ``ColumnCaptioner`` takes
  captions made elsewhere.
* **Fuser.** :class:`LLMFuser` prompts SmolLM2-135M-Instruct (not Vicuna) with our own in-context wording of the
  task (the paper's exact prompt is not released as code; a chat instruction made the 135M model echo it); :class:`ConceptFuser`, the fast default, is a rule: the visual
  caption plus the alt-text words that it does not already say, boilerplate words (:data:`WEB_BOILERPLATE`)
  left out. That keeps every name, so unlike an LLM it never drops alt-text knowledge.
* **Mixing ratio.** 1/2, as the paper's main setting.
"""

from __future__ import annotations

import re
from typing import Any, Protocol, Sequence, runtime_checkable

from ..methods import register_method
from .captioners import Captioner, ColumnCaptioner, SceneGraphCaptioner
from .rewriters import complete, in_context_prompt, load_llm, parse_in_context

__all__ = ["Fuser", "IdentityFuser", "ConceptFuser", "LLMFuser", "fusion_prompt", "parse_fusion", "enrich",
           "FUSION_HEADER", "FUSION_EXAMPLES",
           "WEB_BOILERPLATE", "Captioner", "SceneGraphCaptioner", "ColumnCaptioner", "VEC_COLUMNS", "ALT_COLUMNS",
           "FUSED_COLUMNS", "enrich_table"]

register_method("veclip", "Improving CLIP Training via Visual-enriched Captions (VeCLIP)",
                "visual captions fused with alt-text by a fuser into VeCs, and VeC-mixing of alt-text and VeC in training",
                doc="docs/methods/veclip.md")(__name__)

#: caption columns of the three training arms (for the ``caption-versions`` source)
VEC_COLUMNS = ("caption", "vec_caption")     # VeC-mixing
ALT_COLUMNS = ("caption",)                    # alt-text only
FUSED_COLUMNS = ("vec_caption",)              # VeC only

#: words of web alt-text that carry no knowledge of the image (shop boilerplate, file words, years)
WEB_BOILERPLATE = frozenset("""sale free shipping buy online new best price prices stock jpg jpeg png image photo
photos 2020 2021 2022 2023 2024 2025 shop store official deal deals cheap discount order now click here download hd
wallpaper""".split())


@runtime_checkable
class Fuser(Protocol):
    def __call__(self, alt_texts: Sequence[str], visual_captions: Sequence[str]) -> list[str | None]: ...


class IdentityFuser:
    """Returns the alt-text (the control: its VeC adds nothing)."""

    def __call__(self, alt_texts: Sequence[str], visual_captions: Sequence[str]) -> list[str | None]:
        return list(alt_texts)

    def __repr__(self) -> str:
        return "IdentityFuser()"


_TOKEN = re.compile(r"[\w'-]+")


class ConceptFuser:
    """The rule fuser (module docstring): ``"{visual caption}, {kept alt-text words}"``, or the visual caption alone
    when the alt-text has nothing left. ``boilerplate``: words never kept."""

    def __init__(self, boilerplate: Sequence[str] | frozenset = WEB_BOILERPLATE):
        self.boilerplate = frozenset(w.lower() for w in boilerplate)

    def __repr__(self) -> str:
        return f"ConceptFuser({len(self.boilerplate)} boilerplate words)"

    def fuse_one(self, alt_text: str, visual: str) -> str:
        said = {w.lower() for w in _TOKEN.findall(visual)}
        kept = [w for w in _TOKEN.findall(alt_text) if w.lower() not in self.boilerplate and w.lower() not in said
                and not w.isdigit()]
        kept = list(dict.fromkeys(kept))
        return f"{visual}, {' '.join(kept)}" if kept else visual

    def __call__(self, alt_texts: Sequence[str], visual_captions: Sequence[str]) -> list[str | None]:
        return [self.fuse_one(a, v) for a, v in zip(alt_texts, visual_captions)]


FUSION_HEADER = "merge the web text and the image description into one caption,"
#: ``("web text ; image description", fused caption)`` examples written for cliplab (the paper's are not released)
FUSION_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("nike air max sale free shipping ; a red shoe on a white floor", "A red Nike Air Max shoe on a white floor."),
    ("eiffel tower paris trip 2019 ; a tall metal tower under a blue sky", "The Eiffel Tower in Paris under a blue sky."),
    ("golden retriever puppy for sale ; a small yellow dog on green grass", "A golden retriever puppy on green grass."),
)


def fusion_prompt(alt_text: str, visual: str, examples: Sequence[tuple[str, str]] = FUSION_EXAMPLES) -> str:
    """The prompt of :class:`LLMFuser`: LaCLIP's in-context completion format (``cliplab.curation.rewriters.
    in_context_prompt``) with ``"web text ; image description"`` inputs; our wording of the paper's concept-fusion
    task (a chat instruction made SmolLM2-135M repeat the instruction instead of answering)."""
    return in_context_prompt(FUSION_HEADER, examples, f"{alt_text} ; {visual}")


def parse_fusion(prompt: str, generated: str) -> str | None:
    """The fused caption in the LM's continuation of :func:`fusion_prompt` (``None`` when empty)."""
    return parse_in_context(prompt, generated)


class LLMFuser:
    """Concept fusion by a causal LM (default SmolLM2-135M-Instruct): :func:`fusion_prompt`, greedy decoding,
    :func:`parse_fusion`. ``None`` (a reject) when the answer is empty."""

    def __init__(self, lm=None, max_new_tokens: int = 40, lm_name: str = "smollm2-135m",
                 examples: Sequence[tuple[str, str]] = FUSION_EXAMPLES):
        self.lm = lm if lm is not None else load_llm(lm_name)
        self.max_new_tokens = int(max_new_tokens)
        self.examples = [tuple(e) for e in examples]

    def __repr__(self) -> str:
        return f"LLMFuser(lm={getattr(self.lm, 'name', self.lm)!r}, max_new_tokens={self.max_new_tokens})"

    def fuse_one(self, alt_text: str, visual: str) -> str | None:
        prompt = fusion_prompt(alt_text, visual, self.examples)
        return parse_fusion(prompt, complete(self.lm, prompt, self.max_new_tokens))

    def __call__(self, alt_texts: Sequence[str], visual_captions: Sequence[str]) -> list[str | None]:
        return [self.fuse_one(a, v) for a, v in zip(alt_texts, visual_captions)]


def enrich(rows: Sequence[dict[str, Any]], captioner: Captioner, fuser: Fuser, caption_column: str = "caption"
           ) -> list[tuple[dict[str, Any] | None, str | None]]:
    """VeCLIP's data step for pair rows: ``(row + visual_caption + vec_caption, None)`` per row, or ``(None,
    reason)`` when the captioner or the fuser gives nothing."""
    visual = captioner(list(rows))
    if len(visual) != len(rows):
        raise RuntimeError(f"the captioner returned {len(visual)} captions for {len(rows)} rows")
    todo = [i for i, v in enumerate(visual) if v]
    fused = fuser([rows[i][caption_column] for i in todo], [visual[i] for i in todo]) if todo else []
    vec: dict[int, str | None] = dict(zip(todo, fused))
    out: list[tuple[dict[str, Any] | None, str | None]] = []
    for i, row in enumerate(rows):
        if not visual[i]:
            out.append((None, f"the captioner could not describe the image ({captioner!r})"))
        elif not vec.get(i):
            out.append((None, f"the fuser gave no caption ({fuser!r})"))
        else:
            out.append(({**row, "visual_caption": visual[i], "vec_caption": vec[i]}, None))
    return out


def enrich_table(src, out, captioner: Captioner | None = None, fuser: Fuser | None = None,
                 caption_column: str = "caption", encoding: str = "utf-8", chunk_size: int = 64,
                 progress: bool | None = None, overwrite: bool = False):
    """VeCLIP's data step for a pairs table: every row of ``src`` that the ``captioner`` (default
    :class:`SceneGraphCaptioner`) and the ``fuser`` (default :class:`ConceptFuser`) can handle, with
    ``visual_caption`` and ``vec_caption``, written to ``out``; resumable; rejects in ``OUT.rejects.jsonl``. Train
    with VeC-mixing through the ``veclip-tiny`` preset. Returns the ``RowJobResult``."""
    from .pairs_io import finish, read_pairs, run_rows

    captioner = SceneGraphCaptioner() if captioner is None else captioner
    fuser = ConceptFuser() if fuser is None else fuser
    pairs = read_pairs(src, caption_column, encoding)
    job = {"method": "veclip", "captioner": repr(captioner), "fuser": repr(fuser)}
    result = run_rows(pairs, out, lambda rows: enrich(rows, captioner, fuser, caption_column), job,
                      chunk_size=chunk_size, progress=progress, overwrite=overwrite, desc="veclip enrich")
    finish(out, result.rows, result.rejects, src=src)
    return result
