"""The package's layers (docs/architecture.md): a module imports only from its own layer or those below."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "d2l_memory"
# Lowest first. A module not listed inherits its package's layer.
LAYERS: list[set[str]] = [
    {"errors", "home", "kinds", "prompts", "scoring", "transcripts", "tool_calls"},
    {"models", "embedder", "lora", "chunking", "functional", "encoder", "hypernet"},
    {"d2l"},
    {"store", "compose", "engines"},
    {"memory"},
    {"cli", "training", "benchmarks"},
]


def layer_of(module: str) -> int:
    parts = module.split(".")[1:]  # without "d2l_memory"
    if not parts or parts == ["__init__"]:
        return len(LAYERS)  # the package's lazy re-exports sit above everything
    for depth, names in enumerate(LAYERS):
        if parts[0] in names:
            return depth
    raise AssertionError(f"module d2l_memory.{'.'.join(parts)} is in no layer: add it to LAYERS and the docs")


def imports(path: Path) -> set[str]:
    """The d2l_memory modules `path` imports; a name taken from the package itself counts as its home."""
    from d2l_memory import _EXPORTS

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "d2l_memory":
            found |= {_EXPORTS.get(a.name, "d2l_memory") for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("d2l_memory"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("d2l_memory")}
    return found


def test_no_module_imports_from_a_higher_layer():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        module = ".".join(("d2l_memory", *path.relative_to(ROOT).with_suffix("").parts))
        if module.endswith(".__init__"):
            module = module.removesuffix(".__init__")
            if module == "d2l_memory":
                continue
        for target in imports(path):
            if target != "d2l_memory" and layer_of(target) > layer_of(module):
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_the_layer_check_sees_an_upward_import():
    assert layer_of("d2l_memory.store.store") > layer_of("d2l_memory.lora")
    assert layer_of("d2l_memory.memory") > layer_of("d2l_memory.store.schema")
