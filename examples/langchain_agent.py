"""A LangChain agent with d2l-memory: tool outputs from one conversation answer a later one.

    python -m examples.langchain_agent

Conversation 1: a `create_agent` loop calls a tool (`lookup_order`). `D2LMemoryMiddleware` absorbs the
turn and the tool's output into adapters when the agent finishes (the same thing `memory.absorb(output,
user_id, kind="tool")` does by hand). The 135M base model cannot call tools, so a scripted model
(langchain-core's `GenericFakeChatModel`) plays the tool-calling agent here; in real use pass any
tool-calling chat model, e.g. `ChatOpenAI(base_url=<vLLM server>, model=...)`.

Conversation 2, a new thread with a fresh prompt that holds only the question: the agent runs on
`ChatD2L` (the real SmolLM2-135M-Instruct), and the middleware routes each model call to the user's
memories. `context` and `hybrid` put the recalled tool output in the prompt and answer from it on this
small model; `adapter` is the D2L path (the memory reaches the model only as a composed LoRA; the shipped
hypernetwork is still being trained, so expect weak answers); `none` is the base model alone.
"""

from __future__ import annotations

import tempfile
import time

from langchain.agents import create_agent
from langchain.tools import tool
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_d2l import ChatD2L, D2LMemoryMiddleware
from rich.console import Console
from rich.table import Table

from d2l_memory import D2LMemory

USER = "erin"


@tool
def lookup_order(order_id: int) -> dict:
    """Look up an order's shipping status by its number."""
    return {"order": order_id, "status": "shipped", "carrier": "DHL", "delivery day": "Friday"}


class ScriptedToolCaller(GenericFakeChatModel):
    """Stands in for a tool-calling model: replays the messages it is given."""

    def bind_tools(self, tools, **kwargs):
        return self


def main() -> None:
    console = Console()
    with tempfile.TemporaryDirectory() as path:
        with console.status("Loading SmolLM2-135M-Instruct, the hypernetwork and the store..."):
            memory = D2LMemory(path)
        with memory:
            console.rule("Conversation 1: the agent calls a tool; the middleware absorbs what it returned")
            script = ScriptedToolCaller(messages=iter([
                AIMessage("", tool_calls=[{"name": "lookup_order", "args": {"order_id": 1234}, "id": "call-1"}]),
                AIMessage("Your order 1234 has shipped with DHL.")]))
            agent = create_agent(script, tools=[lookup_order], middleware=[D2LMemoryMiddleware(memory)])
            start = time.perf_counter()
            state = agent.invoke({"messages": [HumanMessage("Where is my order 1234?")]}, context={"user_id": USER})
            for message in state["messages"]:
                console.print(f"[bold]{message.type}[/]: {message.content or message.tool_calls}")
            console.print(f"absorbed in {time.perf_counter() - start:.1f} s:")
            for record in memory.list(USER):
                console.print(f"  {record.kind}: {record.text!r}")

            console.rule("Conversation 2: a new thread; the prompt holds only the question")
            question = "On which day will order 1234 be delivered?"
            table = Table("mode", "answer", "prompt tokens", "adapter", "seconds")
            for mode in ("context", "hybrid", "adapter", "none"):
                model = ChatD2L(memory=memory, user_id=USER, max_tokens=32)
                agent = create_agent(model, middleware=[D2LMemoryMiddleware(memory, mode=mode, absorb_turns=False)])
                start = time.perf_counter()
                state = agent.invoke({"messages": [HumanMessage(question)]}, context={"user_id": USER})
                answer = state["messages"][-1]
                table.add_row(mode, answer.content.strip(), str(answer.usage_metadata["input_tokens"]),
                              answer.response_metadata["adapter"] or "-", f"{time.perf_counter() - start:.1f}")
            console.print(f"question: {question!r}")
            console.print(table)


if __name__ == "__main__":
    main()
