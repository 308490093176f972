"""A support agent that remembers its customers, on the embedded default (SmolLM2-135M on this CPU).

    python -m examples.agent [--store DIR] [--mode context|hybrid|adapter|none]

1. The agent is given the shop's returns policy for Erin: `memory.absorb(POLICY, user_id="erin")`.
2. Thread 1: Erin says how she wants to be contacted and asks where her order is. The agent (a
   `create_agent` loop on `ChatD2L`) calls `lookup_order`; `ToolFirstMiddleware` makes the model's first
   step a call, which guided decoding keeps to the tool's schema. When the agent finishes,
   `D2LMemoryMiddleware` absorbs the turn and the tool's output.
3. Thread 2, a new conversation whose prompt holds only the new question, on the agent without its tool, so
   that whatever its answers know comes from memory: the middleware recalls Erin's memories (the tool
   output, her preference, the policy) for each model call, the way `--mode` says.
4. Another customer asks the same question and gets nothing of Erin's.

`context` (the default) puts the recalled text in the prompt, which this small model answers from;
`adapter` is the D2L path, the memories reaching the model only as a composed LoRA (the shipped hypernetwork
recalls some facts that way, not reliably yet); `none` is the model without memory.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from langchain.agents import create_agent
from langchain.tools import tool
from langchain_core.messages import AIMessage, ToolMessage
from langchain_d2l import ChatD2L, D2LMemoryMiddleware, ToolFirstMiddleware
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph.state import CompiledStateGraph
from rich.console import Console

from d2l_memory import MODES, D2LMemory

POLICY = ("Northwind Outfitters returns policy. Items can be returned within 30 days of delivery. Refunds go "
          "back to the original payment method within 5 business days. Shoes must be unworn.")
ORDERS = {1234: {"order": 1234, "item": "hiking boots", "status": "shipped", "carrier": "DHL",
                 "delivery day": "Friday"}}
SYSTEM = "You are the support assistant of Northwind Outfitters. Answer in one short sentence."
FIRST = "Hi, I'm Erin. Please contact me by email, never by phone. Where is my order 1234?"
LATER = ["Which carrier is delivering my order 1234?", "How many days do I have to return an item?",
         "How do I want to be contacted?"]


@tool
def lookup_order(order_id: int) -> dict:
    """Look up an order's item, status, carrier and delivery day by its number."""
    return ORDERS.get(order_id, {"order": order_id, "status": "not found"})


def support_agent(memory: D2LMemory, mode: str, tools: bool) -> CompiledStateGraph:
    """The support agent: `ChatD2L`, the system prompt and the memory middleware, with the tool (and a call of
    it as each turn's first step: the 135M model does not decide to call one by itself) or without."""
    policy = [ToolFirstMiddleware()] if tools else []
    return create_agent(ChatD2L(memory=memory, user_id="erin", max_tokens=48), tools=[lookup_order] if tools else [],
                        system_prompt=SYSTEM, checkpointer=InMemorySaver(),
                        middleware=[*policy, D2LMemoryMiddleware(memory, mode=mode)])


def ask(console: Console, agent: CompiledStateGraph, thread: str, user: str, question: str) -> None:
    """One turn on `thread` for `user`, printed step by step."""
    console.print(f"[bold]{user}[/]: {question}")
    start = time.perf_counter()
    messages = agent.invoke({"messages": [("user", question)]}, {"configurable": {"thread_id": thread}},
                            context={"user_id": user})["messages"]
    asked = max(i for i, m in enumerate(messages) if m.type == "human")
    for message in messages[asked + 1:]:
        if isinstance(message, AIMessage) and message.tool_calls:
            for call in message.tool_calls:
                console.print(f"  [cyan]calls[/] {call['name']}({call['args']})")
        elif isinstance(message, ToolMessage):
            console.print(f"  [cyan]tool[/] {message.text}")
        else:
            adapter = message.response_metadata.get("adapter")
            console.print(f"  [green]agent[/]: {message.text.strip()}  [dim]({time.perf_counter() - start:.1f} s, "
                          f"{message.usage_metadata['input_tokens']} prompt tokens"
                          f"{', adapter ' + adapter if adapter else ''})[/]")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="memory store (default: a temporary directory)")
    parser.add_argument("--mode", choices=MODES, default="context", help="how recalled memories reach the model")
    args = parser.parse_args(argv)
    console = Console(highlight=False)
    with tempfile.TemporaryDirectory() as scratch:
        with console.status("Loading SmolLM2-135M-Instruct, the hypernetwork and the store..."):
            memory = D2LMemory(args.store or scratch)
        with memory:
            console.rule("The agent is given a document")
            record = memory.absorb(POLICY, user_id="erin", metadata={"source": "returns policy"})
            console.print(f"absorbed {record.kind} {record.id} ({record.n_tokens} tokens, rank {record.rank})")

            console.rule("Thread 1: the agent looks the order up")
            ask(console, support_agent(memory, args.mode, tools=True), "t1", "erin", FIRST)
            console.print("memories now:")
            for r in memory.list("erin"):
                console.print(f"  {r.kind:8} {' '.join((r.text or '').split())[:90]}")

            console.rule(f"Thread 2, days later: a new conversation ({args.mode} mode)")
            later = support_agent(memory, args.mode, tools=False)
            for question in LATER:
                ask(console, later, "t2", "erin", question)

            console.rule("Another customer, the same question")
            console.print(f"memories recalled for frank: {len(memory.relevant(LATER[0], 'frank'))}")
            ask(console, later, "t3", "frank", LATER[0])


if __name__ == "__main__":
    main()
