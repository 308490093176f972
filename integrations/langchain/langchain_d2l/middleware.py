"""`D2LMemoryMiddleware`: d2l-memory for `langchain.agents.create_agent`.

Two hooks, no memory logic of their own:

- `wrap_model_call` (before each model call) routes the request to the user's memories. A `ChatD2L`
  model gets the user, mode and k for that call, and recalls and composes itself. Any other chat model
  gets `D2LMemory.prepare` on the last human message: the composed adapter's name as its model name
  (`adapter`/`hybrid` modes: an OpenAI-compatible vLLM server that serves d2l adapters by name, e.g.
  `ChatOpenAI(base_url=..., model=...)`), and the recalled text in that message (`context`/`hybrid`).
  When nothing is relevant the request goes out unchanged.
- `after_agent` absorbs the finished turn (human and AI text, as `chat` memories) and each successful tool
  output (`kind="tool"`, with the tool's name, call id and arguments in the metadata).

`ToolFirstMiddleware` is the tool policy a small model needs in an agent: it does not decide to call a tool
by itself, so the first model call of a turn requires one, and the calls after the tools' results answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any, NotRequired

from langchain.agents.middleware import AgentMiddleware, AgentState, ModelRequest, ModelResponse
from langchain.agents.middleware.types import PrivateStateAttr
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, ToolMessage
from langgraph.config import get_config
from langgraph.runtime import Runtime

from d2l_memory import MODES, D2LMemory, Mode
from langchain_d2l._utils import last_human, message_text, user_from_runtime
from langchain_d2l.chat_models import ChatD2L


class D2LMemoryState(AgentState):
    """The agent state plus the id of the last message this middleware absorbed (private)."""

    d2l_absorbed: NotRequired[Annotated[str | None, PrivateStateAttr]]


class D2LMemoryMiddleware(AgentMiddleware[D2LMemoryState, Any, Any]):
    """Give a `create_agent` agent long-term memory in LoRA adapters.

    Args:
        memory: the user's memories.
        user_id: a fixed user; None reads `user_key` from the runtime context
            (`agent.invoke(..., context={"user_id": ...})`) or from `config["configurable"]`.
        mode: how memories reach the model: `adapter` (the D2L path), `context`, `hybrid` or `none`.
        k: memories recalled per model call (None: the memory's `config.k`).
        agent_id: tag absorbed memories with this agent id (recall stays user-wide).
        absorb_turns: absorb each finished turn's human and AI text as `chat` memories.
        absorb_tools: absorb each successful tool output as a `tool` memory.
        user_key: the context / configurable key that holds the user id.

    A turn is what follows the last message absorbed in this thread, or, on a thread's first run, the
    messages from the last human message on (so history resent by a stateless client is not absorbed
    twice). Absorbing runs the hypernetwork: it adds seconds per memory after the agent's answer.

    Example:
        ```python
        agent = create_agent(model, tools=[lookup_order],
                             middleware=[D2LMemoryMiddleware(memory, mode="context")])
        agent.invoke({"messages": [("user", "Where is order 1234?")]}, context={"user_id": "erin"})
        ```
    """

    state_schema = D2LMemoryState

    def __init__(self, memory: D2LMemory, *, user_id: str | None = None, mode: Mode = "adapter",
                 k: int | None = None, agent_id: str | None = None, absorb_turns: bool = True,
                 absorb_tools: bool = True, user_key: str = "user_id") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        self.memory = memory
        self.user_id = user_id
        self.mode = mode
        self.k = k
        self.agent_id = agent_id
        self.absorb_turns = absorb_turns
        self.absorb_tools = absorb_tools
        self.user_key = user_key

    def _user(self, runtime: Runtime[Any] | None) -> str:
        user_id = self.user_id or user_from_runtime(runtime, self.user_key)
        if not user_id:
            key = self.user_key
            raise ValueError(f"D2LMemoryMiddleware needs a user id: pass user_id=..., or invoke the agent with "
                             f"context={{'{key}': ...}} or config={{'configurable': {{'{key}': ...}}}}")
        return str(user_id)

    # -- before the model call -----------------------------------------------------------------------
    def route(self, request: ModelRequest) -> ModelRequest:
        """The request with the user's memories applied (unchanged when nothing is relevant)."""
        i = last_human(request.messages)
        model = request.model
        if isinstance(model, ChatD2L):
            update = {"memory": self.memory, "user_id": self._user(request.runtime), "mode": self.mode, "k": self.k}
            return request.override(model=model.model_copy(update=update))
        if i is None or self.mode == "none":
            return request
        query = message_text(request.messages[i])
        chat, adapter = self.memory.prepare(query, self._user(request.runtime), self.mode, self.k)
        overrides: dict[str, Any] = {}
        if adapter is not None:
            overrides["model"] = _with_model_name(model, self.memory.adapter_name(adapter))
        if chat[-1]["content"] != query:
            messages = list(request.messages)
            messages[i] = HumanMessage(chat[-1]["content"], id=messages[i].id, name=messages[i].name)
            overrides["messages"] = messages
        return request.override(**overrides) if overrides else request

    def wrap_model_call(self, request: ModelRequest,
                        handler: Callable[[ModelRequest], ModelResponse]) -> ModelResponse:
        return handler(self.route(request))

    async def awrap_model_call(self, request: ModelRequest,
                               handler: Callable[[ModelRequest], Awaitable[ModelResponse]]) -> ModelResponse:
        return await handler(await asyncio.to_thread(self.route, request))

    # -- after the agent -----------------------------------------------------------------------------
    def after_agent(self, state: D2LMemoryState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        messages = state["messages"]
        done = state.get("d2l_absorbed")
        ids = [m.id for m in messages]
        start = ids.index(done) + 1 if done in ids else last_human(messages)
        turn = messages[start:] if start is not None else []
        if not turn:
            return None
        self.absorb(turn, self._user(runtime))
        return {"d2l_absorbed": messages[-1].id}

    async def aafter_agent(self, state: D2LMemoryState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.after_agent, state, runtime)

    def absorb(self, turn: Sequence[AnyMessage], user_id: str) -> None:
        """Absorb one turn's conversation text and tool outputs for `user_id`."""
        try:
            thread_id = get_config().get("configurable", {}).get("thread_id")
        except RuntimeError:
            thread_id = None
        meta: dict[str, Any] = {"source": "langchain"} | ({"thread_id": str(thread_id)} if thread_id else {})
        conversation = [("user" if isinstance(m, HumanMessage) else "assistant", message_text(m))
                        for m in turn if isinstance(m, HumanMessage | AIMessage) and message_text(m).strip()]
        if self.absorb_turns and conversation:
            self.memory.absorb_messages(conversation, user_id, agent_id=self.agent_id, metadata=meta)
        if not self.absorb_tools:
            return
        calls = {c["id"]: c for m in turn if isinstance(m, AIMessage) for c in m.tool_calls}
        for m in turn:
            if isinstance(m, ToolMessage) and m.status != "error" and message_text(m).strip():
                output = m.content if isinstance(m.content, str) else message_text(m)
                call = calls.get(m.tool_call_id, {})
                self.memory.absorb(output, user_id, "tool", agent_id=self.agent_id,
                                   metadata=meta | {"tool": m.name or call.get("name"), "tool_call_id": m.tool_call_id,
                                                    "args": call.get("args", {})})


class ToolFirstMiddleware(AgentMiddleware):
    """Require a tool call on a turn's first model call, and an answer in text once tools have answered.

    A 135M model left to `tool_choice="auto"` answers in text and never calls a tool; constrained to a call
    (`ChatD2L`'s guided decoding, or vLLM's tool calling behind `d2l-memory serve`), it writes a well-formed
    one. So: while the last message is the user's, `tool_choice` is `"any"`; after a tool result it is
    `"none"`, so the model answers from what the tools returned instead of calling again.

    Example:
        ```python
        agent = create_agent(ChatD2L(memory=memory, user_id="erin"), tools=[lookup_order],
                             middleware=[ToolFirstMiddleware(), D2LMemoryMiddleware(memory)])
        ```
    """

    @staticmethod
    def choose(request: ModelRequest) -> ModelRequest:
        """The request with its tool choice set (unchanged when the agent has no tools)."""
        if not request.tools:
            return request
        return request.override(tool_choice="any" if isinstance(request.messages[-1], HumanMessage) else "none")

    def wrap_model_call(self, request: ModelRequest,
                        handler: Callable[[ModelRequest], ModelResponse]) -> ModelResponse:
        return handler(self.choose(request))

    async def awrap_model_call(self, request: ModelRequest,
                               handler: Callable[[ModelRequest], Awaitable[ModelResponse]]) -> ModelResponse:
        return await handler(self.choose(request))


def _with_model_name(model: BaseChatModel, name: str) -> BaseChatModel:
    """A copy of `model` that asks its server for `name` (ChatOpenAI: `model_name`, others: `model`)."""
    for field in ("model_name", "model"):
        if field in type(model).model_fields:
            return model.model_copy(update={field: name})
    raise TypeError(f"{type(model).__name__} has no model name to route to adapter {name!r}: use ChatD2L, an "
                    f"OpenAI-compatible client of a vLLM server that serves d2l adapters, or mode='context'")
