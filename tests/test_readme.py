"""The README's Python example runs as written, and its commands are the ones CI uses."""

from __future__ import annotations

import re

from conftest import REPO


def test_readme_example_runs():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    exec(compile(blocks[0], "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", (REPO / "README.md").read_text(), flags=re.S)
    assert commands[0].strip().endswith("cliplab demo")
    assert commands[1].strip() in (REPO / ".ci" / "run").read_text()
