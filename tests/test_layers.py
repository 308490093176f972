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


# -- the public API (docs/architecture.md, "The public API") --------------------------------------------
REPO = ROOT.parent
# What the CLI's memory commands, the integrations and the examples may import from d2l_memory: the
# package's own names, the engine interface that `D2LMemory(engine=...)` takes, the tool-call text format
# that a chat model translates, answer scoring, and the CLI's terminal pieces that the chatbot reuses.
PUBLIC: dict[str, set[str]] = {
    "d2l_memory": {"__version__"},  # and the package's `__all__`, added in `public_api`
    "d2l_memory.engines": set(),  # its `__all__`
    "d2l_memory.tool_calls": {"check_tool_choice", "parse_tool_calls", "settled_content", "with_calls"},
    "d2l_memory.scoring": {"contains", "normalize", "token_f1"},
    "d2l_memory.engines.vllm_server": {"is_loopback"},  # the chatbot's web face binds by the server's rule
    "d2l_memory.cli": {"HISTORY_MESSAGES", "err", "input_lines", "open_memory", "out", "print_error",
                       "print_records", "stream_answer"},
}
# What a caller reaches through a memory only by going behind the facade.
BEHIND = {"store", "engine", "d2l", "cache"}
# CLI commands that run what sits beside the facade, not behind it: the vLLM server, evaluation, training
# and the benchmarks import those modules.
CLI_TOOLS = {"serve", "eval_", "train", "bench"}


def public_api() -> dict[str, set[str]]:
    import d2l_memory
    import d2l_memory.engines

    return {**PUBLIC, "d2l_memory": PUBLIC["d2l_memory"] | set(d2l_memory.__all__),
            "d2l_memory.engines": set(d2l_memory.engines.__all__)}


def behind_the_facade(source: str, skip: set[str] = frozenset()) -> list[str]:
    """What `source` imports from d2l_memory beyond the public API, and what it reaches through a memory
    (`memory.store`, `mem._d2l`, ...); the top-level functions named in `skip` are not read."""
    public = public_api()
    tree = ast.parse(source)
    tree.body = [n for n in tree.body if not (isinstance(n, ast.FunctionDef) and n.name in skip)]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "d2l_memory":
            found += [f"{node.module}.{a.name}" for a in node.names if a.name not in public.get(node.module, ())]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("d2l_memory.")]
        elif isinstance(node, ast.Attribute) and (node.attr in BEHIND or node.attr.startswith("_")) \
                and not node.attr.startswith("__"):
            owner = node.value.id if isinstance(node.value, ast.Name) else \
                node.value.attr if isinstance(node.value, ast.Attribute) else None
            if owner in ("memory", "mem"):
                found.append(f"{owner}.{node.attr}")
    return found


def test_the_cli_integrations_and_examples_use_only_the_public_api():
    paths = [ROOT / "cli.py", *sorted((REPO / "examples").rglob("*.py")),
             *sorted((REPO / "integrations").glob("*/*/*.py"))]  # each integration's package, not its tests
    assert any("langchain_d2l" in str(p) for p in paths)
    reached = {str(p.relative_to(REPO)): behind_the_facade(p.read_text(), CLI_TOOLS if p.name == "cli.py" else set())
               for p in paths}
    assert {path: found for path, found in reached.items() if found} == {}


def test_the_public_api_check_sees_a_reach_behind_the_facade():
    source = ("from d2l_memory import D2LMemory, validate_text\nfrom d2l_memory.store import MemoryStore\n"
              "import d2l_memory.compose\nn = self.memory.store.count('a')\nmem._d2l\nmemory.count('a')\n"
              "def serve():\n    from d2l_memory.models import DEFAULT_MODEL\n")
    assert sorted(behind_the_facade(source, {"serve"})) == \
        ["d2l_memory.compose", "d2l_memory.store.MemoryStore", "mem._d2l", "memory.store"]
