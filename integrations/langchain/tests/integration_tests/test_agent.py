"""`D2LMemoryMiddleware` in real `create_agent` runs.

Most tests script the tool-calling half with langchain-core's fake model, so they check the middleware's
routing and absorbing exactly; every memory effect runs on the real model, hypernetwork and store. The last
runs the whole loop on `ChatD2L` itself, asynchronously and streaming: the real 135M model calls the tool
(a call forced by `ToolFirstMiddleware`, written under the tool's schema).
"""

from dataclasses import dataclass

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware
from langchain.tools import tool
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_d2l import ChatD2L, D2LMemoryMiddleware, ToolFirstMiddleware
from langgraph.checkpoint.memory import InMemorySaver


@dataclass
class Context:
    user_id: str


class ToolCallingFake(GenericFakeChatModel):
    model_name: str = "smollm2-135m-instruct"  # a model name to route, as ChatOpenAI(model=...) has

    def bind_tools(self, tools, **kwargs):
        return self


class Recorder(AgentMiddleware):
    """Inner middleware: sees each model request after D2LMemoryMiddleware routed it."""

    def __init__(self):
        super().__init__()
        self.requests = []

    def wrap_model_call(self, request, handler):
        self.requests.append(request)
        return handler(request)


@tool
def lookup_order(order_id: int) -> dict:
    """Look up an order's shipping status by its number."""
    return {"order": order_id, "status": "shipped", "carrier": "DHL", "delivery day": "Friday"}


def calls(*messages):
    return ToolCallingFake(messages=iter(messages))


ORDER_CALL = AIMessage("", tool_calls=[{"name": "lookup_order", "args": {"order_id": 1234}, "id": "call-1"}])


@pytest.fixture(scope="module")
def erin(memory):
    """One agent run with a tool call; the middleware absorbs the turn and the tool output."""
    agent = create_agent(calls(ORDER_CALL, AIMessage("Your order 1234 has shipped.")), tools=[lookup_order],
                         middleware=[D2LMemoryMiddleware(memory, mode="context")], context_schema=Context)
    agent.invoke({"messages": [HumanMessage("Where is my order 1234?")]}, context=Context("agent-erin"))
    return "agent-erin"


def test_after_agent_absorbs_the_turn_and_the_tool_output(memory, erin):
    (tool_memory,) = memory.list(erin, kind="tool")
    assert tool_memory.text == "order: 1234\nstatus: shipped\ncarrier: DHL\ndelivery day: Friday"
    assert tool_memory.metadata["tool"] == "lookup_order" and tool_memory.metadata["args"] == {"order_id": 1234}
    (turn,) = memory.list(erin, kind="chat")
    assert turn.text == "User: Where is my order 1234?\nAssistant: Your order 1234 has shipped."


def test_a_later_conversation_recalls_the_tool_output_without_it_in_the_prompt(memory, erin):
    recorder = Recorder()
    llm = ChatD2L(memory=memory, user_id="placeholder", max_tokens=16)
    agent = create_agent(llm, middleware=[D2LMemoryMiddleware(memory, mode="context", absorb_turns=False), recorder],
                         context_schema=Context)
    question = "On which day will order 1234 be delivered?"
    state = agent.invoke({"messages": [HumanMessage(question)]}, context=Context(erin))
    (request,) = recorder.requests
    assert [m.content for m in request.messages] == [question]  # the prompt holds only the question
    assert request.model.user_id == erin and request.model.mode == "context"
    assert "friday" in state["messages"][-1].content.lower()


def test_other_models_are_routed_by_adapter_name_or_given_the_context(memory, erin):
    # For an OpenAI-compatible vLLM endpoint the model name becomes the composed adapter's name.
    question = "When will order 1234 be delivered?"
    for mode in ("adapter", "context"):
        recorder = Recorder()
        agent = create_agent(calls(AIMessage("ok")), middleware=[
            D2LMemoryMiddleware(memory, mode=mode, absorb_turns=False), recorder], context_schema=Context)
        state = agent.invoke({"messages": [HumanMessage(question)]}, context=Context(erin))
        (request,) = recorder.requests
        if mode == "adapter":
            assert request.model.model_name.startswith("d2l-") and request.messages[-1].content == question
        else:
            assert request.model.model_name == "smollm2-135m-instruct"
            assert "delivery day: Friday" in request.messages[-1].content
        assert state["messages"][0].content == question  # the state keeps the user's own message
    recorder = Recorder()
    agent = create_agent(calls(AIMessage("ok")), middleware=[D2LMemoryMiddleware(memory, absorb_turns=False), recorder],
                         context_schema=Context)
    agent.invoke({"messages": [HumanMessage("How many legs does a spider have?")]}, context=Context(erin))
    assert recorder.requests[0].model.model_name == "smollm2-135m-instruct"  # nothing relevant: unchanged


async def test_each_turn_of_a_thread_is_absorbed_once(memory):
    agent = create_agent(calls(AIMessage("Hi Finn!"), AIMessage("Pixel is a lovely name.")),
                         middleware=[D2LMemoryMiddleware(memory, user_id="agent-finn", mode="none")],
                         checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "t1"}}
    await agent.ainvoke({"messages": [HumanMessage("Hello, I'm Finn.")]}, config)
    state = await agent.ainvoke({"messages": [HumanMessage("My dog is called Pixel.")]}, config)
    assert (await agent.aget_state(config)).values["d2l_absorbed"] == state["messages"][-1].id
    texts = sorted(r.text for r in memory.list("agent-finn", kind="chat"))
    assert texts == ["User: Hello, I'm Finn.\nAssistant: Hi Finn!",
                     "User: My dog is called Pixel.\nAssistant: Pixel is a lovely name."]
    assert all(r.metadata["thread_id"] == "t1" for r in memory.list("agent-finn"))


async def test_chatd2l_calls_the_tool_in_an_async_streamed_loop_and_the_middleware_absorbs_it(memory):
    llm = ChatD2L(memory=memory, user_id="placeholder", max_tokens=32)
    agent = create_agent(llm, tools=[lookup_order], context_schema=Context,
                         middleware=[ToolFirstMiddleware(), D2LMemoryMiddleware(memory, mode="context")])
    chunks, updates = [], []
    async for mode, data in agent.astream({"messages": [HumanMessage("Where is my order 1234?")]},
                                          context=Context("agent-gail"), stream_mode=["messages", "updates"]):
        (chunks if mode == "messages" else updates).append(data)
    streamed = [message for message, _ in chunks if isinstance(message, AIMessageChunk)]
    assert any(c.tool_call_chunks for c in streamed)  # the call arrives in the stream
    messages = [m for update in updates for node in update.values() if node for m in node.get("messages", [])]
    call = next(m for m in messages if isinstance(m, AIMessage) and m.tool_calls)
    assert call.tool_calls[0]["name"] == "lookup_order" and call.tool_calls[0]["args"] == {"order_id": 1234}
    assert any(isinstance(m, ToolMessage) and "DHL" in m.text for m in messages)
    assert isinstance(messages[-1], AIMessage) and messages[-1].text and not messages[-1].tool_calls
    (tool_memory,) = memory.list("agent-gail", kind="tool")  # absorbed by aafter_agent
    assert tool_memory.metadata["args"] == {"order_id": 1234}
