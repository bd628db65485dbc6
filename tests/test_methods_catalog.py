"""The seed-paper catalogue (cliplab/methods_catalog.py): every paper of the seed, its slug and kind as the method
notes give them, status from the registry, ``cliplab methods --all`` and docs/methods/README.md agree with it."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from cliplab import methods as registry
from cliplab.cli import main
from cliplab.methods_catalog import (BY_SLUG, IMPLEMENTED, NOT_YET, PAPERS, README, SURVEY, catalog, counts,
                                     render_readme)
from conftest import REPO

SHARED = REPO.parent / "shared"
REGISTERED = {m.slug: m for m in registry.list_methods()}


def _shared(*parts: str):
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs the project's seed notes at {path} (absent in a plain clone)")
    return path.read_text()


def _notes() -> tuple[dict[int, str], set[int]]:
    """(number -> slug, survey numbers) as the two method-notes files give them."""
    part1 = _shared("methods", "papers-01-26.md")
    part2 = _shared("methods", "papers-27-52.md")
    slugs = {int(n): s for n, s in re.findall(r"^## (\d+)\. (\w+):", part1, re.M)}
    slugs.update({int(n): s for n, s in re.findall(r"^### (\d+)\. `(\w+)`:", part2, re.M)})
    # part 1 says "Not a survey" in every entry that is not one; part 2's summary table marks surveys
    sections = re.split(r"^## (?=\d+\. )", part1, flags=re.M)[1:]
    surveys = {int(s.split(".")[0]) for s in sections if "Not a survey" not in s}
    surveys |= {int(n) for n in re.findall(r"^\| (\d+) \| \w+ \| survey \|", part2, re.M)}
    return slugs, surveys


@pytest.fixture
def scratch_registry():
    """The method registry, restored after the test (so fake registrations never leak)."""
    saved = dict(registry._METHODS)
    yield registry
    registry._METHODS.clear()
    registry._METHODS.update(saved)


def test_52_papers_in_seed_order_with_unique_slugs():
    assert [p.number for p in PAPERS] == list(range(1, 53))
    assert len(BY_SLUG) == len(PAPERS) == 52
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", p.slug) for p in PAPERS)


def test_49_methods_and_3_surveys():
    c = counts(catalog())
    assert (c["methods"], c["surveys"]) == (49, 3)
    assert c["summary"] == f"{len(REGISTERED)} of 49 methods implemented, 3 surveys"


def test_slugs_and_surveys_follow_the_method_notes():
    slugs, surveys = _notes()
    assert slugs == {p.number: p.slug for p in PAPERS}
    assert surveys == {p.number for p in PAPERS if p.kind == SURVEY}


def test_titles_follow_the_seed():
    lines = [ln.strip() for ln in _shared("seeds", "000_7f58357612a1733c.txt").splitlines() if ln.strip()]
    # the seed is a page of entries: a title line, then its abstract (the only long lines)
    titles = [lines[i - 1] for i, ln in enumerate(lines) if len(ln) > 300 and i and len(lines[i - 1]) <= 300]
    norm = lambda t: re.sub(r"\W+", "", t.lower())  # noqa: E731 (spacing/punctuation differ, e.g. "DECOR:Decomp")
    assert [norm(t) for t in titles] == [norm(p.title) for p in PAPERS]


def test_every_registered_method_is_in_the_catalogue():
    unknown = sorted(set(REGISTERED) - set(BY_SLUG))
    assert not unknown, f"registered under slugs the catalogue does not know: {unknown}"


def test_an_unknown_registered_slug_is_refused(scratch_registry):
    scratch_registry.register_method("not_a_seed_paper", "t", "s")("tests.fake_method")
    with pytest.raises(ValueError, match="not_a_seed_paper"):
        catalog()


def test_registered_methods_live_in_their_catalogue_package():
    assert {p.capability for p in PAPERS if p.kind != SURVEY} <= set(registry.CAPABILITIES)
    for slug, info in REGISTERED.items():
        paper = BY_SLUG[slug]
        assert paper.kind != SURVEY, slug
        assert info.module.startswith(f"cliplab.{paper.capability}."), (slug, info.module, paper.capability)


def test_status_comes_from_the_registry():
    rows = catalog()
    for r in rows:
        info = REGISTERED.get(r["slug"])
        if r["kind"] == SURVEY:
            assert r["status"] == SURVEY and not r["module"] and info is None
        elif info:
            assert (r["status"], r["module"], r["doc"]) == (IMPLEMENTED, info.module, info.doc)
            assert (REPO / r["doc"]).is_file(), r["doc"]
        else:
            assert r["status"] == NOT_YET and not r["module"]
            assert r["issue"], f"{r['slug']} is not implemented and no issue plans it"


def test_registering_a_slug_flips_its_status(scratch_registry):
    # every method is implemented now: take one out of the (restored) registry to have a "not yet" one
    slug = "wiclp"
    scratch_registry.list_methods()  # imports every capability, so nothing re-registers it later
    scratch_registry._METHODS.pop(slug)
    before = catalog()
    assert {r["slug"]: r for r in before}[slug]["status"] == NOT_YET
    scratch_registry.register_method(slug, "t", "s", doc="docs/methods/x.md")("cliplab.fake.module")
    after = {r["slug"]: r for r in catalog()}
    assert (after[slug]["status"], after[slug]["module"]) == (IMPLEMENTED, "cliplab.fake.module")
    assert counts(list(after.values()))["implemented"] == counts(before)["implemented"] + 1
    assert render_readme() != README.read_text()  # the README would now be stale


def test_readme_is_what_the_generator_writes():
    assert README.read_text() == render_readme(), \
        "docs/methods/README.md is stale: run python -m cliplab.methods_catalog --write-readme"


def test_readme_links_every_implemented_page():
    text = README.read_text()
    for slug, info in REGISTERED.items():
        page = info.doc.rsplit("/", 1)[-1]
        assert f"[implemented]({page})" in text and (README.parent / page).is_file(), slug
    assert text.count("| not yet |") == 49 - len(REGISTERED)


def test_cli_all_json_matches_the_registry():
    r = CliRunner().invoke(main, ["methods", "--all", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert [p["slug"] for p in data["papers"]] == [p.slug for p in PAPERS]
    assert {p["slug"] for p in data["papers"] if p["status"] == IMPLEMENTED} == set(REGISTERED)
    assert {p["slug"]: p["module"] for p in data["papers"] if p["module"]} == \
        {s: m.module for s, m in REGISTERED.items()}
    assert (data["implemented"], data["methods"], data["surveys"]) == (len(REGISTERED), 49, 3)


def test_cli_all_text_and_pattern():
    r = CliRunner().invoke(main, ["methods", "--all", "d*"])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    expected = [p for p in PAPERS if p.slug.startswith("d")]
    assert [ln.split()[1] for ln in lines[:-1]] == [p.slug for p in expected]
    done = sum(p.slug in REGISTERED for p in expected)
    assert lines[-1] == f"{done} of {len(expected)} methods implemented, 0 surveys"


def test_cli_without_all_lists_only_the_registry():
    r = CliRunner().invoke(main, ["methods", "--json"])
    assert r.exit_code == 0, r.output
    assert [m["slug"] for m in json.loads(r.output)] == sorted(REGISTERED)
