"""`D2LStore`: LangGraph store operations over real memories, namespace isolation, use from an agent."""

import json
from dataclasses import dataclass

import pytest
from langchain.agents import create_agent
from langchain.tools import ToolRuntime, tool
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_d2l import D2LStore
from langgraph.store.base import InvalidNamespaceError

ALICE = ("memories", "store-alice")
BOB = ("memories", "store-bob")
PLANNER = (*ALICE, "planner")


@dataclass
class Context:
    user_id: str


@pytest.fixture(scope="module")
def store(memory):
    store = D2LStore(memory)
    store.put(ALICE, "color", {"text": "Alice's favorite color is teal.", "tag": "preference"})
    store.put(BOB, "color", {"text": "Bob's favorite color is orange.", "tag": "preference"})
    store.put(PLANNER, "trip", {"kind": "Memory", "content": {"city": "Lisbon", "month": "May"}})
    return store


def test_get_returns_the_value_as_put(store, memory):
    item = store.get(ALICE, "color")
    assert item.value == {"text": "Alice's favorite color is teal.", "tag": "preference"}
    assert (item.namespace, item.key) == (ALICE, "color") and item.created_at.tzinfo is not None
    (record,) = [r for r in memory.list("store-alice") if r.agent_id is None]
    assert record.text == "Alice's favorite color is teal." and record.metadata["langgraph"]["key"] == "color"
    (trip,) = memory.list("store-alice", agent_id="planner")
    assert trip.text == "kind: Memory\ncontent.city: Lisbon\ncontent.month: May"


def test_search_never_crosses_namespaces(store):
    for namespace, other in [(ALICE, "orange"), (BOB, "teal")]:
        hits = store.search(namespace, query="What is the favorite color?", limit=5)
        assert hits and all(h.namespace[:2] == namespace for h in hits)
        assert all(other not in str(h.value) for h in hits)
        assert all(-1.0 <= h.score <= 1.0 for h in hits)
    # a prefix covers its sub-namespaces; siblings and sub-namespaces do not see the parent's items
    assert {h.key for h in store.search(ALICE, query="trip to Lisbon")} == {"color", "trip"}
    assert [h.key for h in store.search(PLANNER, query="favorite color")] == ["trip"]
    assert store.search((*ALICE, "other-agent"), query="favorite color") == []
    assert [h.key for h in store.search(ALICE, filter={"tag": "preference"})] == ["color"]
    assert [h.key for h in store.search(ALICE, query="color", filter={"tag": {"$ne": "preference"}})] == ["trip"]


def test_list_namespaces_lists_one_user_and_never_every_user(store):
    assert set(store.list_namespaces(prefix=ALICE)) == {ALICE, PLANNER}
    assert store.list_namespaces(prefix=ALICE, max_depth=2) == [ALICE]
    assert store.list_namespaces(prefix=ALICE, suffix=("planner",)) == [PLANNER]
    assert store.list_namespaces(prefix=BOB) == [BOB]
    # which users the store holds is other users' data: a listing above one user is refused
    for crossing in ({}, {"prefix": ("memories",)}, {"prefix": ("memories", "*")}, {"suffix": ("planner",)}):
        with pytest.raises(InvalidNamespaceError, match="never crosses users"):
            store.list_namespaces(**crossing)


def test_keep_text_false_keeps_no_value_either(memory, monkeypatch):
    monkeypatch.setattr(memory.store, "keep_text", False)  # what D2LMemory(path, keep_text=False) opens
    store = D2LStore(memory)
    namespace = ("memories", "store-private")
    store.put(namespace, "plan", {"text": "The zqxmarker surprise party is on Friday.", "tag": "zqxtag"})
    (record,) = memory.list("store-private")
    assert record.text is None and "zqx" not in json.dumps(record.metadata)
    assert store.get(namespace, "plan").value == {}
    assert [h.key for h in store.search(namespace, query="When is the surprise party?")] == ["plan"]
    store.delete(namespace, "plan")
    assert memory.list("store-private") == []


async def test_put_replaces_and_delete_forgets_async(store, memory):
    await store.aput(BOB, "color", {"text": "Bob's favorite color is now green."})
    assert (await store.aget(BOB, "color")).value["text"].endswith("green.")
    assert [r.text for r in memory.list("store-bob")] == ["Bob's favorite color is now green."]
    await store.adelete(BOB, "color")
    assert await store.aget(BOB, "color") is None and memory.list("store-bob") == []


def test_create_agent_tools_read_and_write_the_store(store, memory):
    @tool
    def remember(fact: str, runtime: ToolRuntime[Context]) -> str:
        """Save a fact about the user to long-term memory."""
        runtime.store.put(("memories", runtime.context.user_id), "pet", {"text": fact})
        return "saved"

    class ToolCallingFake(GenericFakeChatModel):  # the tool-calling half only; memories are real
        def bind_tools(self, tools, **kwargs):
            return self

    model = ToolCallingFake(messages=iter([
        AIMessage("", tool_calls=[{"name": "remember", "args": {"fact": "Dana's cat is named Miso."}, "id": "c1"}]),
        AIMessage("Noted!")]))
    agent = create_agent(model, tools=[remember], store=store, context_schema=Context)
    agent.invoke({"messages": [HumanMessage("My cat is named Miso.")]}, context=Context("store-dana"))
    assert store.get(("memories", "store-dana"), "pet").value == {"text": "Dana's cat is named Miso."}
    assert [h.key for h in store.search(("memories", "store-dana"), query="What is my cat called?")] == ["pet"]
