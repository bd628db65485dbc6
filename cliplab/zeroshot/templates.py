"""Prompt templates and class-name lists are data: shipped sets, plain files, and CLIP's official prompt files.

A template is a string with one class-name placeholder, ``{}`` (CLIP's convention) or ``{c}``. Sources understood by
:func:`load_templates`:

* a shipped set by name (``list_template_sets()``): ``generic``, ``single``, ``synthetic``;
* a ``.txt`` file: one template per line, blank lines and ``#`` comments ignored;
* a ``.json`` file: a list of templates, or an object with ``"templates"`` (and optionally ``"classes"``), like the
  ImageNet file ``imagenet_classes_templates.json``;
* CLIP's ``prompts.md`` with a dataset section: ``path/to/prompts.md#CIFAR10`` (see :func:`read_prompts_md`).

:func:`load_prompt_set` returns both lists (``classes`` may be ``None``) so a dataset can take CLIP's class names too.

``prompts.md`` is markdown with one ``## Dataset`` heading per dataset, each followed by a code block holding two
Python list literals, ``classes = [...]`` and ``templates = [...]``. The block is *parsed*, never executed: the
assignments are found with :func:`ast.parse` and their values read with :func:`ast.literal_eval`, so only literals
(strings, lists) are accepted.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

__all__ = [
    "PromptSet", "TEMPLATE_DIR", "list_template_sets", "load_templates", "load_prompt_set", "read_prompts_md",
    "list_prompts_md_datasets", "read_prompt_json", "fill_template", "validate_template", "normalize_name",
    "load_descriptions",
]

TEMPLATE_DIR = Path(__file__).parent / "templates"

# A class is one name or a list of synonyms (CLIP's FER2013 entry: ['happy', 'smiling']); synonyms are pooled.
ClassName = Union[str, Sequence[str]]

_PLACEHOLDERS = ("{}", "{c}")


@dataclass
class PromptSet:
    """Templates plus, when the source has them, the class names that go with them."""

    templates: list[str]
    classes: list[ClassName] | None = None
    source: str = ""
    dataset: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def classnames(self) -> list[str] | None:
        """One display name per class (the first synonym)."""
        if self.classes is None:
            return None
        return [c if isinstance(c, str) else c[0] for c in self.classes]


# --- template strings ------------------------------------------------------------------------------------------------
def validate_template(template: str) -> str:
    if not isinstance(template, str):
        raise ValueError(f"a template must be a string, got {type(template).__name__}: {template!r}")
    if not any(p in template for p in _PLACEHOLDERS):
        raise ValueError(f"template {template!r} has no class placeholder ('{{}}' or '{{c}}')")
    return template


def fill_template(template: str, classname: str, description: str | None = None) -> str:
    """Put ``classname`` into ``template`` (``{}`` or ``{c}``) and ``description`` into ``{d}``.

    Plain substitution, not ``str.format``: other braces in a template are left alone."""
    out = template.replace("{}", classname).replace("{c}", classname)
    if description is not None:
        out = out.replace("{d}", description)
    return out


def normalize_name(name: str) -> str:
    """Key for matching class names across sources: lower case, letters and digits only (``"CIFAR-10"`` ->
    ``"cifar10"``, ``"maple_tree"`` -> ``"mapletree"``)."""
    return re.sub(r"[^0-9a-z]+", "", name.lower())


# --- shipped sets and plain files ------------------------------------------------------------------------------------
def list_template_sets() -> list[str]:
    """Names of the template sets shipped with cliplab."""
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.txt"))


def _read_txt(path: Path) -> list[str]:
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    return [validate_template(ln) for ln in lines if ln and not ln.startswith("#")]


def read_prompt_json(path: str | Path) -> PromptSet:
    """A JSON template file: a list of templates, or ``{"templates": [...], "classes": [...]}`` (the ImageNet file)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if isinstance(data, list):
        templates, classes = data, None
    elif isinstance(data, dict) and isinstance(data.get("templates"), list):
        templates, classes = data["templates"], data.get("classes")
    else:
        raise ValueError(f"{path}: expected a list of templates or an object with a 'templates' list")
    return PromptSet([validate_template(t) for t in templates], _check_classes(classes, str(path)), str(path))


def _check_classes(classes, where: str) -> list[ClassName] | None:
    if classes is None:
        return None
    if not isinstance(classes, list) or not classes:
        raise ValueError(f"{where}: 'classes' must be a non-empty list")
    for c in classes:
        ok = isinstance(c, str) or (isinstance(c, list) and c and all(isinstance(s, str) for s in c))
        if not ok:
            raise ValueError(f"{where}: a class must be a name or a non-empty list of synonyms, got {c!r}")
    return classes


# --- CLIP's prompts.md -----------------------------------------------------------------------------------------------
_HEADING = re.compile(r"^##\s+(.+?)\s*$", re.MULTILINE)
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _md_sections(text: str) -> dict[str, str]:
    heads = list(_HEADING.finditer(text))
    return {m.group(1): text[m.end(): heads[i + 1].start() if i + 1 < len(heads) else len(text)]
            for i, m in enumerate(heads)}


def list_prompts_md_datasets(path: str | Path) -> list[str]:
    """Dataset sections of a ``prompts.md`` file that hold a code block."""
    return [name for name, body in _md_sections(Path(path).read_text(encoding="utf-8")).items() if _FENCE.search(body)]


def _literal_assignments(code: str, where: str) -> dict[str, object]:
    try:
        tree = ast.parse(code, mode="exec")
    except SyntaxError as e:
        raise ValueError(f"{where}: code block is not parseable ({e.msg}, line {e.lineno})") from e
    out: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError as e:
                raise ValueError(f"{where}: {node.targets[0].id} is not a literal ({e})") from e
    return out


def read_prompts_md(path: str | Path, dataset: str) -> PromptSet:
    """Class names and templates of ``dataset`` (matched ignoring case and punctuation: ``cifar-10`` finds
    ``CIFAR10``) from CLIP's ``prompts.md``. Never executes the file's code."""
    path = Path(path)
    sections = _md_sections(path.read_text(encoding="utf-8"))
    key = normalize_name(dataset)
    matches = [name for name in sections if normalize_name(name) == key]
    if not matches:
        raise KeyError(f"{path}: no dataset section {dataset!r}; known: {list_prompts_md_datasets(path)}")
    name = matches[0]
    where = f"{path}#{name}"
    values: dict[str, object] = {}
    for block in _FENCE.finditer(sections[name]):
        values.update(_literal_assignments(block.group(1), where))
    if "templates" not in values:
        raise ValueError(f"{where}: no 'templates = [...]' list")
    templates = values["templates"]
    if not isinstance(templates, list) or not templates:
        raise ValueError(f"{where}: 'templates' must be a non-empty list")
    return PromptSet([validate_template(t) for t in templates], _check_classes(values.get("classes"), where),
                     str(path), dataset=name)


# --- one entry point -------------------------------------------------------------------------------------------------
def load_prompt_set(source: str | Path | Sequence[str]) -> PromptSet:
    """Templates (and class names where the source has them) from any supported source (module docstring).

    ``source`` may also be a list of template strings."""
    if not isinstance(source, (str, Path)):
        templates = [validate_template(t) for t in source]
        if not templates:
            raise ValueError("empty template list")
        return PromptSet(templates, None, "<list>")
    text = str(source)
    if isinstance(source, str) and source in list_template_sets():
        return PromptSet(_read_txt(TEMPLATE_DIR / f"{source}.txt"), None, f"cliplab:{source}")
    path_part, _, section = text.partition("#")
    path = Path(path_part)
    if section or path.suffix.lower() == ".md":
        if not section:
            raise ValueError(f"{source}: say which dataset section to read, e.g. '{path}#CIFAR10' "
                             f"(known: {list_prompts_md_datasets(path) if path.exists() else '?'})")
        if not path.is_file():
            raise FileNotFoundError(f"no prompts file at {path}")
        return read_prompts_md(path, section)
    if not path.is_file():
        raise FileNotFoundError(
            f"{source!r} is neither a shipped template set ({list_template_sets()}) nor a template file")
    if path.suffix.lower() == ".json":
        return read_prompt_json(path)
    templates = _read_txt(path)
    if not templates:
        raise ValueError(f"{path}: no templates in file")
    return PromptSet(templates, None, str(path))


def load_templates(source: str | Path | Sequence[str]) -> list[str]:
    """Just the templates of :func:`load_prompt_set`."""
    return load_prompt_set(source).templates


def load_descriptions(source: str | Path | dict) -> dict[str, list[str]]:
    """Per-class descriptions: a JSON object ``{classname: [description, ...]}`` (a shipped file name such as
    ``synthetic-descriptions``, a path, or a dict). Keys starting with ``_`` are comments."""
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        if not path.is_file() and (TEMPLATE_DIR / f"{source}.json").is_file():
            path = TEMPLATE_DIR / f"{source}.json"
        if not path.is_file():
            raise FileNotFoundError(f"no descriptions file at {source}")
        data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError("descriptions must be a JSON object {classname: [description, ...]}")
    out: dict[str, list[str]] = {}
    for k, v in data.items():
        if k.startswith("_"):
            continue
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ValueError(f"descriptions for {k!r} must be a string or a list of strings")
        out[k] = list(v)
    return out
