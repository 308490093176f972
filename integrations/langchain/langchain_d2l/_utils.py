"""Message conversion between LangChain and `d2l_memory` (no memory logic here)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langgraph.config import get_config

from d2l_memory.tool_calls import with_calls

ROLES = {"human": "user", "ai": "assistant", "system": "system", "developer": "system", "tool": "tool"}


def message_text(message: BaseMessage) -> str:
    """The text of a message; raises on content the base model cannot read (images, audio, files).

    Raises:
        ValueError: a content block other than text or reasoning.
    """
    if isinstance(message.content, list):
        for block in message.content:
            kind = block.get("type") if isinstance(block, Mapping) else "text"
            if kind not in ("text", "reasoning", "tool_use", "tool_call", "tool_call_chunk"):
                raise ValueError(f"ChatD2L reads text only; got a {kind!r} content block")
    return message.text


def to_chat(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as the core's `{"role", "content"}` dicts. An AI message's tool calls follow its
    text as the `<tool_call>` blocks the model writes (`tool_calls.with_calls`); other empty non-human turns
    are dropped.

    Raises:
        ValueError: a message type without a chat role, or non-text content.
    """
    out = []
    for m in messages:
        role = ROLES.get(m.type)
        if role is None:
            raise ValueError(f"ChatD2L cannot send a {m.type!r} message to the model")
        text = message_text(m)
        if isinstance(m, AIMessage) and m.tool_calls:
            text = with_calls(text.strip(), [(call["name"], call["args"]) for call in m.tool_calls])
        if text.strip() or role == "user":
            out.append({"role": role, "content": text})
    return out


def last_human(messages: Sequence[BaseMessage]) -> int | None:
    """Index of the last human message (the query memories are recalled for), or None."""
    return next((i for i in range(len(messages) - 1, -1, -1) if isinstance(messages[i], HumanMessage)), None)


def user_from_runtime(runtime: Any, key: str = "user_id") -> str | None:
    """`key` from a LangGraph runtime's context (a mapping or an object), else from the run's
    `config["configurable"]`; None when neither has it."""
    context = getattr(runtime, "context", None)
    value = context.get(key) if isinstance(context, Mapping) else getattr(context, key, None)
    if value is None:
        try:
            value = get_config().get("configurable", {}).get(key)
        except RuntimeError:  # called outside a runnable context
            value = None
    return value
