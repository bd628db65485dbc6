"""Runs every ```python block of docs/tokens.md ("Working with tokens"), in order, in one namespace.

The page uses ``shapes-tiny`` when it is shipped and ``test-tiny`` otherwise; its blocks assert what they claim
(bit-exact no-ops, shapes, gradients), so a drifting API or a broken guarantee fails here. Also checks that the
figures the page shows exist and are PNGs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "tokens.md"


def test_tokens_page_runs(tmp_path, monkeypatch, one_thread):
    pytest.importorskip("matplotlib")
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 9
    monkeypatch.chdir(tmp_path)  # the plot block writes its PNGs into the working directory
    ns: dict = {"__name__": "docs_tokens"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{DOC.name}[block {i}]", "exec"), ns)
    for png in ("clip4dm_words.png", "patch_similarity.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tokens_page_figures_exist():
    from PIL import Image

    for ref in re.findall(r"\]\((img/[^)]+\.png)\)", DOC.read_text(encoding="utf-8")):
        path = DOC.parent / ref
        assert path.exists(), f"{ref} is missing: run examples/token_plots.py"
        assert Image.open(path).size[0] >= 300
