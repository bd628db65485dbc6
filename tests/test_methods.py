"""Every registered paper method: its doc page exists, names the module and its ```python examples run; the CLI lists it.

One parametrised copy of the checks each method's test file used to repeat (``test_doc_example_runs`` /
``test_registered``). A method's own test file keeps only what is specific to the method.
"""

from __future__ import annotations

import json
import re
import warnings

import pytest
from click.testing import CliRunner

from cliplab.cli import main
from cliplab.methods import list_methods
from cliplab.models.tokenizer import TruncationWarning
from conftest import REPO

METHODS = {m.slug: m for m in list_methods()}

# Where a method's test used to pin more than the generic checks below:
# the implementing module (a move is a deliberate change, not an accident) ...
MODULES = {
    "aclip": "cliplab.objectives.aclip",
    "rave": "cliplab.enhance.rave",
    "core": "cliplab.t2i.core",
    "ella": "cliplab.t2i.ella",
    "wiclp": "cliplab.t2i.wiclp",
    "un2clip": "cliplab.objectives.un2clip",
    "attribute_control": "cliplab.text_edit.attribute_control",
    "binary_pv_dsg": "cliplab.textrep.binary_pv_dsg",
    "clip4dm": "cliplab.metrics.clip4dm",
    "cgtgan": "cliplab.captioning.cgtgan",
    "clippings": "cliplab.apps.clippings",
    "dclip": "cliplab.objectives.dclip",
    "decor": "cliplab.text_edit.decor",
    "dptr": "cliplab.scenetext.dptr",
    "fdp": "cliplab.scenetext.fdp",
    "follow_the_flow": "cliplab.text_edit.follow_the_flow",
    "ga_dms": "cliplab.objectives.ga_dms",
    "hqclip": "cliplab.objectives.hqclip",
    "laclip": "cliplab.curation.laclip",
    "lightclip": "cliplab.objectives.lightclip",
    "mcip": "cliplab.objectives.mcip",
    "proclip": "cliplab.longtext.proclip",
    "rtd": "cliplab.cir.rtd",
    "lexinvariant_lm": "cliplab.textrep.lexinvariant_lm",
    "llm2clip": "cliplab.longtext.llm2clip",
    "long_clip": "cliplab.longtext.long_clip",
    "ltok": "cliplab.textrep.ltok",
    "metaclip": "cliplab.curation.metaclip",
    "sce": "cliplab.metrics.sce",
    "token_prepending": "cliplab.text_edit.token_prepending",
    "unime": "cliplab.objectives.unime",
    "veclip": "cliplab.curation.veclip",
    "zett": "cliplab.textrep.zett",
}
# ... the names the page's example must define ...
EXAMPLE_DEFINES = {"attribute_control": ("out",), "follow_the_flow": ("fixed", "kept"), "hqclip": ("head",)}
# ... and examples that must not truncate any text.
NO_TRUNCATION = {"long_clip"}


def _page(slug: str) -> str:
    info = METHODS[slug]
    assert info.doc, f"method {slug!r} is registered without a doc page"
    path = REPO / info.doc
    assert path.is_file(), f"method {slug!r}: doc page {info.doc} does not exist"
    return path.read_text()


@pytest.mark.parametrize("slug", sorted(MODULES))
def test_known_methods_are_registered_where_expected(slug):
    assert slug in METHODS, f"{slug!r} is not registered; registered: {sorted(METHODS)}"
    info = METHODS[slug]
    assert info.module == MODULES[slug] and info.doc == f"docs/methods/{slug}.md"


@pytest.mark.parametrize("slug", sorted(METHODS))
def test_doc_page_names_the_module(slug):
    page, module = _page(slug), METHODS[slug].module
    names = (module, module.replace(".", "/") + ".py")  # as a dotted name or as its file
    assert any(n in page for n in names), f"{METHODS[slug].doc} names neither of {names}"


@pytest.mark.parametrize("slug", sorted(METHODS))
def test_doc_example_runs(slug):
    info = METHODS[slug]
    blocks = re.findall(r"```python\n(.*?)```", _page(slug), flags=re.S)
    assert blocks, f"{info.doc} needs a python example"
    namespace: dict = {}
    with warnings.catch_warnings():
        if slug in NO_TRUNCATION:
            warnings.simplefilter("error", TruncationWarning)
        for k, code in enumerate(blocks):  # the blocks of a page run in order, in one namespace
            exec(compile(code, f"{info.doc} (python block {k})", "exec"), namespace)
    missing = [name for name in EXAMPLE_DEFINES.get(slug, ()) if name not in namespace]
    assert not missing, f"{info.doc}: the example no longer defines {missing}"


def test_cli_lists_every_method():
    r = CliRunner().invoke(main, ["methods", "--json"])
    assert r.exit_code == 0, r.output
    listed = json.loads(r.output)
    assert [m["slug"] for m in listed] == sorted(METHODS)
    for m in listed:
        info = METHODS[m["slug"]]
        assert (m["module"], m["doc"], m["title"], m["summary"]) == (info.module, info.doc, info.title, info.summary)
