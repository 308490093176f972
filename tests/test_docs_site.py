"""The documentation site builds with no warnings: `mkdocs build --strict`, as `make docs` runs it.

A broken link or anchor, a page left out of the nav, a nav entry without its page, or a docstring that
mkdocstrings cannot render fails the build, and so `make test`. The build goes to a temporary directory
(a few seconds; nothing is fetched from the network).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_site_builds_strict_without_warnings(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason="the docs extra is not installed: pip install -e '.[docs]'")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner about MkDocs 2.0
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = (build.stdout + build.stderr).splitlines()
    problems = [line for line in log if line.startswith(("WARNING", "ERROR"))]
    assert build.returncode == 0 and not problems, "mkdocs build --strict:\n" + "\n".join(problems or log[-30:])

    # Not an empty shell: the reference is generated from the docstrings, the diagrams are there.
    reference = (site / "api" / "memory" / "index.html").read_text()
    for anchor in ("d2l_memory.memory.D2LMemory.absorb", "d2l_memory.memory.MemoryConfig.rank_budget"):
        assert f'id="{anchor}"' in reference, anchor
    assert 'class="mermaid"' in (site / "concepts" / "index.html").read_text()
    pages = {p.parent.name for p in site.glob("*/index.html")}
    assert {"quickstart", "concepts", "cli", "langchain", "serving", "scaling", "training", "benchmarks",
            "chatbot"} <= pages
