"""The docs' code snippets are true to the library, so the docs cannot drift from it.

- Pages in `EXECUTED` (the API guide, the quickstart, the LangChain guide, README.md): every fenced
  ```python block runs, in order, in one namespace per page, in an empty working directory, on the real
  model and store. A failing snippet's traceback points at its line in the Markdown file.
- Every other page (their snippets need vLLM, a GPU, object storage or a server): every ```python block
  must compile, and every name it imports from `d2l_memory` or `langchain_d2l` must exist.
- On every page, each `d2l-memory COMMAND` in a shell or text block uses only options that command has.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import shlex
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXECUTED = [DOCS / "api.md", DOCS / "quickstart.md", DOCS / "langchain.md", ROOT / "README.md"]
PAGES = sorted(DOCS.rglob("*.md"))
OURS = ("d2l_memory", "langchain_d2l")
# A fenced block, possibly indented (inside an admonition or a tab), closed by ``` at the same indent.
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
SHELL = {"bash", "sh", "shell", "console", "text"}


def blocks(path: Path, langs: set[str]) -> list[tuple[int, str]]:
    """`(first line number, code)` of each fenced block in one of `langs` in a Markdown file."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start("body")) + 1, textwrap.dedent(m.group("body")))
            for m in FENCE.finditer(text) if m.group("lang") in langs]


def python_blocks(path: Path) -> list[tuple[int, str]]:
    return blocks(path, {"python"})


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_fences_are_found():
    found = python_blocks(DOCS / "api.md")
    assert len(found) >= 15 and found[0][1].startswith('path = "./memories"')
    assert blocks(DOCS / "cli.md", SHELL)


def test_api_page_shows_every_public_method():
    from d2l_memory import D2LMemory

    code = "\n".join(code for _, code in python_blocks(DOCS / "api.md"))
    methods = [name for name, _ in inspect.getmembers(D2LMemory, inspect.isfunction) if not name.startswith("_")]
    missing = [name for name in methods if not re.search(rf"\bmem\.{name}\(", code)]
    assert not missing, f"docs/api.md has no example of D2LMemory.{', '.join(missing)}"


def test_api_page_config_table_gives_the_real_defaults():
    from d2l_memory import MemoryConfig

    rows = re.findall(r"^\| `(\w+)` \| `([^`]+)` \|", (DOCS / "api.md").read_text(), re.M)
    documented = {name: ast.literal_eval(default) for name, default in rows if name in MemoryConfig.model_fields}
    actual = {name: field.default for name, field in MemoryConfig.model_fields.items() if name in documented}
    assert len(documented) >= 8 and documented == actual


def test_cli_page_covers_every_command():
    from d2l_memory.cli import app

    text = (DOCS / "cli.md").read_text()
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    missing = [name for name in names if f"d2l-memory {name}" not in text]
    assert len(names) >= 9 and not missing, f"docs/cli.md has no example of: {', '.join(missing)}"


def cli_uses(code: str) -> list[tuple[str, str]]:
    """`(command, option)` for each option written after `d2l-memory COMMAND` in a shell or synopsis block.

    A command's words run to the end of its line (continuation lines joined), a `#` comment, or a pipe
    into another program; `a|b` and ` | --x` inside a synopsis are alternatives, not pipes.
    """
    uses = []
    for line in code.replace("\\\n", " ").splitlines():
        line = re.split(r"(?:^|\s)#", line)[0]
        for match in re.finditer(r"\bd2l-memory\s+([a-z][a-z-]*)(.*)", line):
            words = re.split(r"\s\|\s*(?=[A-Za-z$])|\)\s*$", match.group(2))[0]
            command, split = match.group(1), shlex.split(words.replace("'", " ").replace('"', " "))
            if command == "bench" and split and not split[0].startswith("-"):
                command = f"bench {split[0]}"  # options after a benchmark's name are that benchmark's too
            for word in split:
                word = word.strip("[]()")
                if word.startswith("-") and len(word) > 1:
                    uses.append((command, word.split("=", 1)[0]))
    return uses


def benchmark_options(name: str) -> set[str]:
    """The options of benchmark `name`'s own parser (from its `--help`, which exits before any work)."""
    import contextlib
    import io
    import sys

    from d2l_memory.cli import BENCHMARKS

    if name not in BENCHMARKS:
        return set()
    module = importlib.import_module(BENCHMARKS[name])
    text = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(text), pytest.raises(SystemExit):
        patch.setattr(sys, "argv", [name, "--help"])
        module.main()
    return set(re.findall(r"(?<![\w-])--?[a-z][a-z0-9-]*", text.getvalue()))


def test_cli_options_in_every_page_exist():
    import typer.main

    from d2l_memory.cli import app

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    options = {name: {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
               for name, cmd in commands.items()}
    pages = [*PAGES, ROOT / "README.md"]
    benchmarks = {c for page in pages for _, code in blocks(page, SHELL) for c, _ in cli_uses(code) if " " in c}
    options |= {c: options["bench"] | benchmark_options(c.split()[1]) for c in benchmarks}
    wrong = []
    for page in pages:
        for line, code in blocks(page, SHELL):
            wrong += [f"{rel(page)}:{line}: d2l-memory {command} {option}" for command, option in cli_uses(code)
                      if option not in options.get(command, ())]
            wrong += [f"{rel(page)}:{line}: no command d2l-memory {command}" for command, _ in cli_uses(code)
                      if command not in options]
    assert cli_uses("d2l-memory recall Q --user a -k 3 --json | jq '.[]'  # x --nope") == [
        ("recall", "--user"), ("recall", "-k"), ("recall", "--json")]
    assert cli_uses("d2l-memory bench store --quick --sizes 10") == [("bench store", "--quick"),
                                                                       ("bench store", "--sizes")]
    assert "--data" in options["bench train-throughput"] and "--data" not in options["bench"]
    assert not wrong, "unknown CLI options in the docs:\n" + "\n".join(sorted(set(wrong)))


@pytest.mark.parametrize("page", [p for p in PAGES if p not in EXECUTED and python_blocks(p)], ids=lambda p: rel(p))
def test_python_snippets_compile_and_import_real_names(page):
    for line, code in python_blocks(page):
        tree = ast.parse("\n" * (line - 1) + code, str(page))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in OURS:
                module = importlib.import_module(node.module)
                missing = [a.name for a in node.names if not hasattr(module, a.name)]
                assert not missing, f"{rel(page)}:{node.lineno}: {node.module} has no {', '.join(missing)}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in OURS:
                        importlib.import_module(alias.name)


@pytest.mark.slow
@pytest.mark.parametrize("path", EXECUTED, ids=lambda p: rel(p))
def test_python_snippets_run(path, tmp_path, monkeypatch):
    found = python_blocks(path)
    if not found:
        pytest.skip(f"{path.name} has no python blocks")
    if path.name == "langchain.md":
        pytest.importorskip("langchain_d2l", reason="langchain-d2l is not installed")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for line, code in found:
        # Padding puts each statement on its Markdown line, so tracebacks quote the doc itself.
        exec(compile("\n" * (line - 1) + code, str(path), "exec"), namespace)
