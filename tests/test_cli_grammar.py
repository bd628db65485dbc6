"""One CLI grammar (docs/cli.md), enforced by walking every command: the same name and short flag for the same
meaning, --json everywhere, an example in every help text, old spellings hidden but working."""

from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

from cliplab.cli import main
from cliplab.cli.common import AliasedOption

# meaning -> (the parameter names a command may use for it, the spellings it must have)
CANONICAL = {
    "model": ({"model"}, {"-m", "--model"}),
    "out": ({"out_dir", "out_file", "out"}, {"-o", "--out"}),
    "top_k": ({"top_k"}, {"-k", "--top-k"}),
    "json": ({"as_json"}, {"--json"}),
    "progress": ({"progress"}, {"--progress"}),
    "settings": ({"settings"}, {"--set"}),
    "precision": ({"precision"}, {"--precision"}),
}
#: spellings that must not show in any help text (they live on as hidden aliases)
RETIRED = ("--k", "--topk", "-O", "--option", "--quiet")


def leaf_commands(group: click.Group = main, prefix: tuple[str, ...] = ()):
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from leaf_commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,), cmd


COMMANDS = dict(leaf_commands())


def _help(path) -> str:
    r = CliRunner().invoke(main, [*path, "--help"], terminal_width=120)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_every_command_has_an_example_and_json(path):
    text = _help(path)
    assert re.search(r"^\s*Examples?:", text, re.M), f"cliplab {' '.join(path)} --help shows no example"
    assert "--json" in text, f"cliplab {' '.join(path)} has no --json"


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_same_meaning_same_spelling(path):
    cmd = COMMANDS[path]
    text = _help(path)
    by_name = {p.name: p for p in cmd.params if isinstance(p, click.Option)}
    for meaning, (names, spellings) in CANONICAL.items():
        for name in names:
            p = by_name.get(name)
            if p is not None:
                assert spellings <= set(p.opts) | set(p.secondary_opts), (path, meaning, p.opts)
    for p in cmd.params:  # a parameter spelled like a canonical option means that thing
        for meaning, (names, spellings) in CANONICAL.items():
            if spellings & set(p.opts) and p.name not in names:
                pytest.fail(f"cliplab {' '.join(path)}: {p.opts} should be stored as one of {sorted(names)}, "
                            f"not {p.name!r}")
    for old in RETIRED:
        assert not re.search(rf"(^|[\s,/]){re.escape(old)}([\s,=]|$)", text, re.M), \
            f"cliplab {' '.join(path)} --help still shows {old}"


def test_old_spellings_still_parse_as_hidden_aliases():
    hidden = {o for _, cmd in COMMANDS.items() for p in cmd.params if isinstance(p, AliasedOption)
              for o in p.hidden_aliases}
    assert {"--k", "--topk"} <= hidden
    r = CliRunner().invoke(main, ["search", "--help"])
    assert "--top-k" in r.output and "--k " not in r.output


def test_debug_flag_is_documented_on_the_root():
    r = CliRunner().invoke(main, ["--help"])
    assert "--debug" in r.output and "Examples:" in r.output
