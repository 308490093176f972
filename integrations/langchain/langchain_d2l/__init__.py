"""LangChain / LangGraph integration for d2l-memory: a thin layer over `d2l_memory`, no memory logic.

- `ChatD2L`: a chat model answering from one user's memories (adapter, context, hybrid or no memory).
- `D2LStore`: a LangGraph `BaseStore`; namespaces `("memories", user_id[, agent_id[, session_id]])`.
- `D2LMemoryMiddleware`: `create_agent` middleware; routes model calls to the user's memories and
  absorbs each turn and its tool outputs.
- `ToolFirstMiddleware`: `create_agent` middleware for small models; a tool call first, then an answer.
- `D2LClassicMemory` (legacy, extra `classic`): a `langchain_classic` `BaseMemory` for old chains.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Imported on first use: `langchain_d2l.legacy` needs the optional `classic` extra.
_EXPORTS = {
    "ChatD2L": "langchain_d2l.chat_models",
    "D2LStore": "langchain_d2l.store",
    "D2LMemoryMiddleware": "langchain_d2l.middleware",
    "D2LClassicMemory": "langchain_d2l.legacy",
    "ToolFirstMiddleware": "langchain_d2l.middleware",
}
__all__ = ["ChatD2L", "D2LClassicMemory", "D2LMemoryMiddleware", "D2LStore", "ToolFirstMiddleware"]

if TYPE_CHECKING:
    from langchain_d2l.chat_models import ChatD2L
    from langchain_d2l.legacy import D2LClassicMemory
    from langchain_d2l.middleware import D2LMemoryMiddleware, ToolFirstMiddleware
    from langchain_d2l.store import D2LStore


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'langchain_d2l' has no attribute {name!r}")
