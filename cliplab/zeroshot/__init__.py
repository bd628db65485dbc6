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
    ZeroShotClassifier,
    class_prompt_groups,
    duplicate_classnames,
    encode_prompts,
)
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

__all__ = [
    "ZeroShotClassifier", "encode_prompts", "class_prompt_groups", "DEFAULT_DESCRIPTION_TEMPLATE",
    "duplicate_classnames", "DuplicateClassWarning",
    "PromptSet", "fill_template", "list_prompts_md_datasets", "list_template_sets", "load_descriptions",
    "load_prompt_set", "load_templates", "normalize_name", "read_prompt_json", "read_prompts_md",
]
