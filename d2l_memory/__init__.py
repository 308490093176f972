"""d2l-memory: long-term memory for LLM agents, stored in LoRA adapters by a Doc-to-LoRA hypernetwork.

    from d2l_memory import D2LMemory
    with D2LMemory("./memories") as mem:
        mem.absorb("Alice's favorite color is teal.", user_id="alice")
        mem.chat("What is my favorite color?", user_id="alice")
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public names -> defining module; imported on first use so `import d2l_memory` stays light.
_EXPORTS = {
    "D2LMemory": "d2l_memory.memory",
    "MemoryConfig": "d2l_memory.memory",
    "MemoryRecord": "d2l_memory.memory",
    "OptimizeReport": "d2l_memory.memory",
    "DocToLoRA": "d2l_memory.d2l",
    "HypernetConfig": "d2l_memory.hypernet",
    "LoRA": "d2l_memory.lora",
    "D2LMemoryError": "d2l_memory.errors",
    "AdapterError": "d2l_memory.errors",
    "ModelNotInstalledError": "d2l_memory.errors",
    "MemoryNotFoundError": "d2l_memory.errors",
    "validate_text": "d2l_memory.chunking",
    "render_tool_output": "d2l_memory.transcripts",
    "Kind": "d2l_memory.kinds",
    "KINDS": "d2l_memory.kinds",
    "Mode": "d2l_memory.kinds",
    "MODES": "d2l_memory.kinds",
    "Weighting": "d2l_memory.kinds",
    "WEIGHTINGS": "d2l_memory.kinds",
}
__all__ = [
    "KINDS",
    "MODES",
    "WEIGHTINGS",
    "AdapterError",
    "D2LMemory",
    "D2LMemoryError",
    "DocToLoRA",
    "HypernetConfig",
    "Kind",
    "LoRA",
    "MemoryConfig",
    "MemoryNotFoundError",
    "MemoryRecord",
    "Mode",
    "ModelNotInstalledError",
    "OptimizeReport",
    "Weighting",
    "render_tool_output",
    "validate_text",
]

if TYPE_CHECKING:
    from d2l_memory.chunking import validate_text
    from d2l_memory.d2l import DocToLoRA
    from d2l_memory.errors import AdapterError, D2LMemoryError, MemoryNotFoundError, ModelNotInstalledError
    from d2l_memory.hypernet import HypernetConfig
    from d2l_memory.kinds import KINDS, MODES, WEIGHTINGS, Kind, Mode, Weighting
    from d2l_memory.lora import LoRA
    from d2l_memory.memory import D2LMemory, MemoryConfig, MemoryRecord, OptimizeReport
    from d2l_memory.transcripts import render_tool_output


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'd2l_memory' has no attribute {name!r}")
