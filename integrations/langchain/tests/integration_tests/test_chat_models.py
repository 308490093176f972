"""`ChatD2L` answering from memories on the real model (context mode answers; adapter mode is routed), and
structured output through its guided tool calls."""

import pytest
from langchain_d2l import ChatD2L
from pydantic import BaseModel

FACT = "Alice's favorite color is teal. Alice lives in Lisbon."
QUESTION = "What is Alice's favorite color?"


@pytest.fixture(scope="module")
def alice(memory):
    return memory.absorb(FACT, user_id="chat-alice")


def test_context_mode_answers_from_the_users_memories_only(memory, alice):
    llm = ChatD2L(memory=memory, user_id="chat-alice", mode="context", max_tokens=16)
    answer = llm.invoke(QUESTION)
    assert "teal" in answer.content.lower()
    assert answer.usage_metadata["input_tokens"] > 20 and answer.response_metadata["mode"] == "context"
    assert "teal" not in llm.invoke(QUESTION, user_id="chat-bob").content.lower()  # per-call user


def test_adapter_mode_uses_the_composed_adapter_only_when_relevant(memory, alice):
    # The shipped hypernetwork is barely trained: this checks the routing, not the answer's content.
    llm = ChatD2L(memory=memory, user_id="chat-alice", mode="adapter", max_tokens=6)
    answer = llm.invoke(QUESTION)
    assert answer.response_metadata["adapter"].startswith("d2l-")
    chunks = list(llm.stream(QUESTION))
    assert "".join(c.content for c in chunks) == answer.content  # streaming gives the same greedy tokens
    assert chunks[-1].chunk_position == "last" and chunks[-1].usage_metadata["output_tokens"] > 0
    assert llm.invoke("How many legs does a spider have?").response_metadata["adapter"] is None


class Order(BaseModel):
    """The order a customer asks about."""

    order_id: int


def test_structured_output_fills_a_schema_from_the_question(memory):
    llm = ChatD2L(memory=memory, user_id="chat-nobody", mode="none", max_tokens=40)
    assert llm.with_structured_output(Order).invoke("Where is my order 1234?") == Order(order_id=1234)
    raw = llm.with_structured_output(Order, include_raw=True).invoke("Where is my order 1234?")["raw"]
    assert raw.tool_calls[0]["name"] == "Order" and raw.usage_metadata["output_tokens"] < 40


def test_json_schema_structured_output_is_one_constrained_json_answer(memory):
    llm = ChatD2L(memory=memory, user_id="chat-nobody", mode="none", max_tokens=40)
    structured = llm.with_structured_output(Order, method="json_schema", include_raw=True)
    out = structured.invoke("Where is my order 1234?")
    assert out["parsing_error"] is None and isinstance(out["parsed"], Order)
    assert out["raw"].tool_calls == [] and Order.model_validate_json(out["raw"].content) == out["parsed"]
    schema = {"title": "Weather", "type": "object", "properties": {"city": {"type": "string"},
              "celsius": {"type": "integer"}}, "required": ["city", "celsius"]}
    answer = llm.with_structured_output(schema, method="json_schema").invoke("It is 21 degrees in Lisbon.")
    assert set(answer) == {"city", "celsius"} and isinstance(answer["celsius"], int)
    # Cut short by the budget: include_raw shows the answer instead of raising.
    short = ChatD2L(memory=memory, user_id="chat-nobody", mode="none", max_tokens=3)
    cut = short.with_structured_output(Order, method="json_schema", include_raw=True).invoke("Order 1234?")
    assert cut["parsed"] is None and cut["parsing_error"] is not None
    with pytest.raises(TypeError, match="unexpected arguments"):
        llm.with_structured_output(Order, method="json_schema", tools=[])
