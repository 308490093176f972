"""`D2LStore` against LangGraph's store contract (as `BaseStore`'s docs and `InMemoryStore` define it):
one item per (namespace, key) under concurrent writers, any valid label, unindexed values, best-field
scores, and the smaller rules (empty keys, list namespaces, sessions without agents, created_at)."""

from __future__ import annotations

import asyncio
import operator
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, TypedDict

import pytest
from langchain_d2l import D2LStore
from langgraph.config import get_store
from langgraph.graph import START, StateGraph
from langgraph.store.base import GetOp, InvalidNamespaceError, PutOp, SearchOp


@pytest.fixture(scope="module")
def store(memory):
    return D2LStore(memory)


def copies(memory, user_id: str, key: str) -> list:
    """The memories that hold one item: exactly one is the contract."""
    return [r for r in memory.list(user_id) if r.metadata.get("langgraph", {}).get("key") == key]


def test_concurrent_puts_of_one_key_leave_one_item(store, memory):
    ns = ("memories", "contract-threads")
    values = [{"text": f"The locker code is {1000 + i}."} for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda v: store.put(ns, "code", v), values))
    (record,) = copies(memory, "contract-threads", "code")
    assert store.get(ns, "code").value == record.metadata["langgraph"]["value"] and record.text in {
        v["text"] for v in values}
    assert [h.key for h in store.search(ns, query="What is the locker code?")] == ["code"]
    store.delete(ns, "code")
    assert store.get(ns, "code") is None and memory.list("contract-threads") == []


def test_parallel_graph_nodes_writing_one_key_leave_one_item(store, memory):
    ns = ("memories", "contract-graph")

    class State(TypedDict):
        done: Annotated[list[str], operator.add]

    def writer(name: str):
        def node(state: State) -> dict:
            get_store().put(ns, "plan", {"text": f"The plan was last written by {name}."})
            get_store().put(ns, name, {"text": f"{name} ran."})
            return {"done": [name]}
        return node

    builder = StateGraph(State)
    names = [f"node{i}" for i in range(4)]
    for name in names:  # all four start at once: one superstep, run in parallel threads
        builder.add_node(name, writer(name))
        builder.add_edge(START, name)
    assert sorted(builder.compile(store=store).invoke({"done": []})["done"]) == names
    assert len(copies(memory, "contract-graph", "plan")) == 1
    assert sorted(h.key for h in store.search(ns, limit=20)) == sorted([*names, "plan"])


async def test_async_writers_of_one_key_leave_one_item(store, memory):
    ns = ("memories", "contract-async")
    await asyncio.gather(*(store.aput(ns, "city", {"text": f"Ines moved to city number {i}."}) for i in range(3)),
                         store.abatch([PutOp(ns, "city", {"text": "Ines moved to Porto."}),
                                       PutOp(ns, "pet", {"text": "Ines has a parrot."})]))
    assert len(copies(memory, "contract-async", "city")) == 1
    assert (await store.aget(ns, "pet")).value == {"text": "Ines has a parrot."}
    await asyncio.gather(store.adelete(ns, "city"), store.adelete(ns, "city"), store.adelete(ns, "pet"))
    assert await store.abatch([GetOp(ns, "city"), GetOp(ns, "pet"), SearchOp(ns, None, 10, 0, None)]) == [
        None, None, []]


def test_copies_another_process_left_are_reconciled(store, memory):
    # Two processes can each commit a copy of a key (the lock is per process): reads take the newest,
    # the next put keeps only its own, and a delete removes every copy.
    ns = ("memories", "contract-copies")
    for text in ["Old: Kai's team is red.", "New: Kai's team is blue."]:
        memory.absorb(text, "contract-copies", metadata={"langgraph": {"key": "team", "value": {"text": text}}})
    assert store.get(ns, "team").value == {"text": "New: Kai's team is blue."}
    assert [h.value["text"] for h in store.search(ns, query="Which team is Kai on?")] == ["New: Kai's team is blue."]
    store.put(ns, "team", {"text": "Kai's team is green."})
    assert [r.text for r in copies(memory, "contract-copies", "team")] == ["Kai's team is green."]
    memory.absorb("Stale copy.", "contract-copies", metadata={"langgraph": {"key": "team", "value": {"text": "x"}}})
    store.delete(ns, "team")
    assert store.get(ns, "team") is None and memory.list("contract-copies") == []


def test_any_valid_label_round_trips(store, memory):
    namespaces = [("memories", "auth0|abc123"), ("memories", "José", "mon agent"),
                  ("memories", "user 7", "bot", "séance 1")]
    for i, ns in enumerate(namespaces):
        store.put(ns, "fact", {"text": f"Fact number {i} about the weather in Oslo."})
    for i, ns in enumerate(namespaces):
        assert store.get(ns, "fact").value["text"].startswith(f"Fact number {i}")
        assert store.get(ns, "fact").namespace == ns
        assert [h.namespace for h in store.search(ns, query="weather in Oslo")] == [ns]
        assert store.list_namespaces(prefix=ns) == [ns]
    assert store.list_namespaces(prefix=namespaces[1][:2], suffix=("mon agent",)) == [namespaces[1]]
    # labels d2l allows stay the ids they are; others are stored reversibly encoded
    assert store._scope(("memories", "a@b:c/d=e+f-g_h")) == {"user_id": "a@b:c/d=e+f-g_h"}
    encoded = store._scope(namespaces[0])["user_id"]
    assert encoded != "auth0|abc123" and [r.user_id for r in memory.list(encoded)] == [encoded]
    for ns in namespaces:
        store.delete(ns, "fact")
        assert store.get(ns, "fact") is None and store.search(ns) == []
    # reads of namespaces that hold nothing are empty, whatever their labels
    assert store.get(("memories", "nobody ü"), "k") is None and store.search(("memories", "x" * 300)) == []
    with pytest.raises(InvalidNamespaceError):
        store.put(("memories", "x" * 300), "k", {"text": "too long for a d2l id"})


@pytest.mark.parametrize("namespace", [(), ("memories", "a.b"), ("memories", ""), ("memories", 7),
                                       ("memories", ["alice"]), "memories", ("memories", "nul\x00")])
def test_invalid_namespaces_raise_langgraphs_error(store, namespace):
    with pytest.raises(InvalidNamespaceError):
        store.put(namespace, "k", {"text": "never stored"})
    if namespace:
        with pytest.raises(InvalidNamespaceError):
            store.batch([GetOp(namespace, "k")])


def test_values_without_text_are_stored_unindexed(store):
    ns = ("memories", "contract-unindexed")
    values = {"hidden": ({"text": "Mara climbs in the Dolomites."}, False), "empty": ({}, None),
              "blank": ({"text": ""}, None), "numbers": ({"n": 3}, ["title"]),
              "shown": ({"text": "Mara climbs every weekend."}, None)}
    for key, (value, index) in values.items():
        store.put(ns, key, value, index=index)
    for key, (value, _) in values.items():
        assert store.get(ns, key).value == value
    assert {h.key for h in store.search(ns)} == set(values)
    assert {h.key for h in store.search(ns, filter={"n": 3})} == {"numbers"}
    assert [h.key for h in store.search(ns, query="Where does Mara climb?")] == ["shown"]
    for key in values:
        store.delete(ns, key)
    assert store.search(ns) == []


def test_an_item_scores_its_best_indexed_text(store):
    ns = ("memories", "contract-fields")
    store.put(ns, "report", {"title": "Quarterly tax report", "body": "The garden needs watering every Tuesday."},
              index=["title", "body"])
    store.put(ns, "bread", {"title": "Recipe", "body": "Bake the bread at 220 degrees."}, index=["title", "body"])
    store.put(ns, "notes", {"notes": ["Buy oat milk.", "Call the dentist on Friday."]}, index=["notes[*]"])
    for query, key in [("Quarterly tax report", "report"), ("The garden needs watering every Tuesday.", "report"),
                       ("Call the dentist on Friday.", "notes")]:
        best = store.search(ns, query=query, limit=2)[0]
        assert best.key == key and best.score == pytest.approx(1.0, abs=0.01)
    assert [h.key for h in store.search(ns, query="Bake the bread at 220 degrees.", limit=1)] == ["bread"]


def test_smaller_rules(store, memory):
    # a memory with a session but no agent lives in the user's namespace, with no empty label
    record = memory.absorb("Lee prefers window seats.", "contract-small", session_id="s1")
    assert store.list_namespaces(prefix=("memories", "contract-small")) == [("memories", "contract-small")]
    assert store.get(("memories", "contract-small"), record.id).value["text"] == "Lee prefers window seats."
    # the empty key is a key
    store.put(("memories", "contract-small"), "", {"text": "Lee's empty-key note."})
    assert store.get(("memories", "contract-small"), "").value == {"text": "Lee's empty-key note."}
    # a list namespace is the same path as the tuple (LangGraph's SQL stores take lists too)
    first = store.get(["memories", "contract-small"], "")
    assert first.namespace == ("memories", "contract-small")
    # an update keeps the item's created_at and moves its updated_at
    store.put(["memories", "contract-small"], "", {"text": "Lee's empty-key note, updated."})
    updated = store.get(("memories", "contract-small"), "")
    assert updated.created_at == first.created_at and updated.updated_at > first.updated_at
    store.delete(("memories", "contract-small"), "")
    store.delete(("memories", "contract-small"), record.id)
    assert memory.list("contract-small") == []
