"""The docs' Python snippets run, so the docs cannot drift from the library.

Every fenced ```python block of docs/api.md (and of README.md, when it has any) is executed in order in
one namespace, in an empty working directory, on the real model and store. A failing snippet's
traceback points at its line in the Markdown file.
"""

from __future__ import annotations

import inspect
import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTED = [ROOT / "docs" / "api.md", ROOT / "README.md"]
# A ```python fence, possibly indented (inside an admonition or a tab), closed by ``` at the same indent.
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """`(first line number, code)` of each ```python block in a Markdown file."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start("body")) + 1, textwrap.dedent(m.group("body")))
            for m in FENCE.finditer(text)]


def test_fences_are_found():
    blocks = python_blocks(ROOT / "docs" / "api.md")
    assert len(blocks) >= 15 and blocks[0][1].startswith('path = "./memories"')


def test_api_page_shows_every_public_method():
    from d2l_memory import D2LMemory

    code = "\n".join(code for _, code in python_blocks(ROOT / "docs" / "api.md"))
    methods = [name for name, _ in inspect.getmembers(D2LMemory, inspect.isfunction) if not name.startswith("_")]
    missing = [name for name in methods if not re.search(rf"\bmem\.{name}\(", code)]
    assert not missing, f"docs/api.md has no example of D2LMemory.{', '.join(missing)}"


def test_cli_page_covers_every_command():
    from d2l_memory.cli import app

    text = (ROOT / "docs" / "cli.md").read_text()
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    missing = [name for name in names if f"d2l-memory {name}" not in text]
    assert len(names) >= 9 and not missing, f"docs/cli.md has no example of: {', '.join(missing)}"


@pytest.mark.parametrize("path", DOCUMENTED, ids=[p.name for p in DOCUMENTED])
def test_python_snippets_run(path, tmp_path, monkeypatch):
    blocks = python_blocks(path)
    if not blocks:
        pytest.skip(f"{path.name} has no python blocks")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for line, code in blocks:
        # Padding puts each statement on its Markdown line, so tracebacks quote the doc itself.
        exec(compile("\n" * (line - 1) + code, str(path), "exec"), namespace)
