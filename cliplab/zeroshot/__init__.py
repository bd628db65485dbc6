"""Zero-shot classification: class names x prompt templates -> text-embedding classifiers.

    from cliplab.zeroshot import ZeroShotClassifier
    clf = ZeroShotClassifier.from_classnames(model, ["cat", "dog"], templates="generic")
    clf.classify(["cat.jpg"], topk=2)      # [[("cat", 0.71), ("dog", 0.29)]]

Templates are data (``load_templates``): shipped sets, ``.txt``/``.json`` files, CLIP's ``prompts.md#Dataset``.
See docs/zeroshot.md.
"""

from .classifier import (
    DEFAULT_DESCRIPTION_TEMPLATE,
    DuplicateClassWarning,
    RoutedPromptClassifier,
    ZeroShotClassifier,
    class_prompt_groups,
    duplicate_classnames,
    encode_prompts,
)
from .prompt_learning import LearnedPrompts, PromptLearner, PromptMixture, load_prompts
from .templates import (
    PromptSet,
    fill_template,
    list_prompts_md_datasets,
    list_template_sets,
    load_descriptions,
    load_prompt_set,
    load_templates,
    normalize_name,
    read_prompt_json,
    read_prompts_md,
)
from .caption_parse import CaptionParts, Entity, Relation, parse_caption, parse_caption_rules, parse_synthetic_caption
from .regions import GridRegionProposer, Region, RegionProposer, SceneRegionProposer, propose_regions
from .comclip import ComCLIP, comclip_scores, winoground_comclip_scores

__all__ = [
    "ZeroShotClassifier", "encode_prompts", "class_prompt_groups", "DEFAULT_DESCRIPTION_TEMPLATE",
    "duplicate_classnames", "DuplicateClassWarning",
    "LearnedPrompts", "PromptLearner", "PromptMixture", "load_prompts", "RoutedPromptClassifier",
    "PromptSet", "fill_template", "list_prompts_md_datasets", "list_template_sets", "load_descriptions",
    "load_prompt_set", "load_templates", "normalize_name", "read_prompt_json", "read_prompts_md",
    "CaptionParts", "Entity", "Relation", "parse_caption", "parse_caption_rules", "parse_synthetic_caption",
    "Region", "RegionProposer", "SceneRegionProposer", "GridRegionProposer", "propose_regions",
    "ComCLIP", "comclip_scores", "winoground_comclip_scores",
]
