"""`D2LMemory` end to end on the real model, hypernetwork and LanceDB store."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from langchain_core.messages import AIMessage, HumanMessage

from d2l_memory import D2LMemory, D2LMemoryError, MemoryRecord
from d2l_memory.compose import member_weights
from d2l_memory.engines import GenerationParams
from d2l_memory.transcripts import render_tool_output

FACT = "Alice's favorite color is teal. Alice lives in Lisbon."


@pytest.fixture(scope="module")
def mem(tmp_path_factory):
    with D2LMemory(tmp_path_factory.mktemp("store")) as memory:
        yield memory


@pytest.fixture(scope="module")
def alice(mem):
    return mem.absorb(FACT, user_id="alice", kind="document", metadata={"source": "test"})


def test_absorb_returns_a_durable_record(mem, alice):
    assert isinstance(alice, MemoryRecord)
    assert alice.user_id == "alice" and alice.kind == "document" and alice.text == FACT
    assert alice.n_tokens > 5 and alice.n_chunks == 1 and alice.rank == mem.d2l.config.chunk_rank + mem.d2l.bias_rows
    assert alice.metadata == {"source": "test"} and alice.created_at.tzinfo is not None
    assert [r.id for r in mem.list("alice")] == [alice.id]


def test_recall_is_scoped_to_the_user(mem, alice):
    hits = mem.recall("What is Alice's favorite color?", user_id="alice", k=4)
    assert hits[0].id == alice.id and hits[0].score > mem.config.relevance_threshold
    assert mem.recall("What is Alice's favorite color?", user_id="bob") == []
    with pytest.raises(ValueError, match="not allowed"):
        mem.recall("color?", user_id="x' OR '1'='1")


def test_context_mode_answers_from_memory_and_never_across_users(mem, alice):
    answer = mem.chat("What is Alice's favorite color?", user_id="alice", mode="context", max_new_tokens=24)
    assert "teal" in answer.lower()
    for mode in ("adapter", "context", "hybrid", "none"):
        other = mem.chat("What is Alice's favorite color?", user_id="bob", mode=mode, max_new_tokens=24)
        assert "teal" not in other.lower()


def test_adapter_mode_composes_relevant_memories_only(mem, alice):
    messages, adapter = mem.prepare("What is Alice's favorite color?", "alice", mode="adapter")
    assert adapter is not None and messages[-1]["content"] == "What is Alice's favorite color?"
    assert alice.id in adapter.recipe.memory_ids
    # An unrelated question is gated: the untouched base model answers, identically to mode="none".
    _, gated = mem.prepare("How many legs does a spider have?", "alice", mode="adapter")
    assert gated is None
    assert mem.chat("How many legs does a spider have?", "alice", mode="adapter", max_new_tokens=16) == \
        mem.chat("How many legs does a spider have?", "alice", mode="none", max_new_tokens=16)


def test_a_question_about_the_user_passes_the_lower_personal_gate(mem, monkeypatch):
    mem.absorb_messages([("user", "These days I am all about woodworking."), ("assistant", "Sounds fun!")],
                        user_id="dora")
    question = "What do I do on Saturdays?"
    score = mem.recall(question, "dora")[0].score
    config = mem.config
    assert config.personal_relevance_threshold <= score < config.relevance_threshold
    assert [h.score for h in mem.relevant(question, "dora")] == [score]
    # The same similarity without first-person words is held to the general threshold.
    monkeypatch.setattr(config, "personal_relevance_threshold", config.relevance_threshold)
    assert mem.relevant(question, "dora") == []


def test_absorb_messages_segments_and_accepts_every_message_shape(mem):
    turns = [("user", "Hi, I'm Carol and I keep bees."), {"role": "assistant", "content": "Nice, Carol!"},
             HumanMessage("My dog is called Pixel."), AIMessage("Pixel is a great name.")] * 6
    records = mem.absorb_messages(turns, user_id="carol", session_id="s1", segment_tokens=40)
    assert len(records) > 1 and all(r.kind == "chat" and r.session_id == "s1" for r in records)
    assert all(r.n_tokens <= 60 for r in records)
    assert "User: Hi, I'm Carol" in records[0].text and "Assistant: Nice, Carol!" in records[0].text
    said = mem.absorb_messages(turns[:4], user_id="carol", roles=("user",))
    assert [r.text for r in said] == ["User: Hi, I'm Carol and I keep bees.\nUser: My dog is called Pixel."]
    before = mem.store.count()
    with pytest.raises(TypeError, match="not the string"):
        mem.absorb_messages(turns, user_id="carol", roles="user")
    with pytest.raises(ValueError, match="no text from the roles"):
        mem.absorb_messages(turns, user_id="carol", roles=("tool",))
    assert mem.store.count() == before


def test_tool_outputs_are_rendered_to_text(mem):
    assert render_tool_output({"city": "Oslo", "forecast": [{"day": "Mon", "temp": 3}]}) == \
        "city: Oslo\nforecast.1.day: Mon\nforecast.1.temp: 3"
    record = mem.absorb('{"order": 1234, "status": "shipped"}', user_id="dave", kind="tool")
    assert record.text == "order: 1234\nstatus: shipped"


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"text": ""}, ValueError, "empty"),
    ({"text": "  \n"}, ValueError, "whitespace"),
    ({"text": b"bytes"}, TypeError, "bytes"),
    ({"text": 3.14}, TypeError, "float"),
    ({"text": "bad \udc80"}, ValueError, "surrogate"),
    ({"text": "ok", "kind": "diary"}, ValueError, "kind"),
    ({"text": "ok", "user_id": ""}, ValueError, "user_id"),
    ({"text": "x" * 400_001}, ValueError, "max_document_chars"),
])
def test_bad_input_is_refused_and_nothing_changes(mem, alice, kwargs, error, match):
    before = mem.store.count()
    args = {"user_id": "alice", "kind": "document", **kwargs}
    with pytest.raises(error, match=match):
        mem.absorb(args.pop("text"), **args)
    assert mem.store.count() == before


def test_bad_chat_and_segment_arguments(mem):
    with pytest.raises(ValueError, match="mode"):
        mem.chat("hi", user_id="alice", mode="telepathy")
    with pytest.raises(ValueError, match="segment_tokens"):
        mem.absorb_messages([("user", "hi")], user_id="alice", segment_tokens=-5)
    with pytest.raises(ValueError, match="user_id"):
        mem.forget()


def test_async_twins(mem):
    async def run() -> tuple[MemoryRecord, str]:
        record = await mem.aabsorb("Erin's favorite food is ramen.", user_id="erin")
        return record, await mem.achat("What is Erin's favorite food?", user_id="erin", mode="context")

    record, answer = asyncio.run(run())
    assert record.user_id == "erin" and "ramen" in answer.lower()


def test_compositions_weight_memories_by_relevance_one_over_k_or_one(mem):
    for text in ("Gus plays the oboe.", "Gus plays the oboe every Sunday."):
        mem.absorb(text, user_id="gus")
    question = "Does Gus play the oboe?"
    default = mem.config
    assert default.composition == "relevance"
    composed = {}
    try:
        for composition in ("relevance", "mean", "sum"):
            mem.config = default.model_copy(update={"composition": composition})
            composed[composition] = mem.prepare(question, "gus", mode="adapter")[1]
        hits = mem.relevant(question, "gus")
    finally:
        mem.config = default
    mem.forget(user_id="gus")
    assert [w for _, w in composed["mean"].recipe.members] == [0.5, 0.5]
    assert [w for _, w in composed["sum"].recipe.members] == [1.0, 1.0]
    by_score = dict(zip([h.id for h in hits], member_weights("relevance", [h.score for h in hits], 0.1), strict=True))
    assert dict(composed["relevance"].recipe.members) == by_score and len(by_score) == 2
    assert max(by_score, key=by_score.get) == hits[0].id and abs(sum(by_score.values()) - 1) <= 0.01
    assert len({c.name for c in composed.values()}) == 3  # each weighting is its own cached adapter


def test_forget_is_exact(mem):
    record = mem.absorb("Frank's secret code is 77123.", user_id="frank")
    _, adapter = mem.prepare("What is Frank's secret code?", "frank", mode="adapter")
    assert adapter is not None and adapter.path.exists()
    assert mem.forget(record.id, user_id="frank") == 1
    assert not adapter.path.exists()  # the composed adapter containing it is erased
    assert mem.recall("What is Frank's secret code?", user_id="frank") == []
    _, after = mem.prepare("What is Frank's secret code?", "frank", mode="adapter")
    assert after is None
    mem.absorb("Frank likes jazz.", user_id="frank")
    mem.absorb("Frank owns a red bike.", user_id="frank")
    assert mem.forget(user_id="frank") == 2 and mem.list("frank") == []


def test_absorb_and_chat_from_two_threads(mem):
    with ThreadPoolExecutor(2) as pool:
        absorbs = [pool.submit(mem.absorb, f"Gina's locker number is {n}.", "gina") for n in (11, 12)]
        chats = [pool.submit(mem.chat, "What is Gina's locker number?", "gina", "adapter", 8) for _ in range(2)]
        assert all(f.result().user_id == "gina" for f in absorbs)
        assert all(isinstance(f.result(), str) for f in chats)


def test_a_prepared_request_is_generated_through_the_facade(mem, alice):
    question = "What is Alice's favorite color?"
    messages, adapter = mem.prepare(question, "alice", mode="adapter")
    params = GenerationParams(max_new_tokens=8)
    answer = mem.generate(messages, adapter, params)
    assert answer == mem.chat(question, "alice", mode="adapter", max_new_tokens=8)
    assert "".join(mem.generate_stream(messages, adapter, params)) == answer
    assert mem.count_prompt_tokens(messages) > mem.count_tokens(question)
    assert mem.adapter_name(adapter) == adapter.name and mem.adapter_name(None) == mem.model_name
    with pytest.raises(TypeError, match="bare LoRA"):
        mem.adapter_name(adapter.lora)
    too_long = GenerationParams(max_new_tokens=mem.config.max_answer_tokens + 1)
    for call in (mem.generate, mem.generate_stream):  # refused at the call, before any piece
        with pytest.raises(ValueError, match="max_answer_tokens"):
            call(messages, adapter, too_long)


def test_store_calls_load_no_model_and_forget_still_unloads_from_servers(mem, monkeypatch):
    record = mem.absorb("Hank's boat is called Marlin.", user_id="hank")
    _, adapter = mem.prepare("What is Hank's boat called?", "hank", mode="adapter")
    assert adapter is not None and adapter.path.exists()

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("d2l_memory.memory.load_model", no_model)
    unloaded: list[str] = []
    monkeypatch.setattr("d2l_memory.memory.evict_from_servers", lambda cache, names: unloaded.extend(names))
    with D2LMemory(mem.uri) as lazy:
        assert (lazy.uri, lazy.model_name, lazy.keep_text) == (mem.uri, mem.model_name, True)
        assert lazy.count("hank") == 1 and [r.id for r in lazy.list("hank")] == [record.id]
        assert lazy.get(record.id, user_id="hank").text == record.text
        assert lazy.get(record.id, user_id="bob") is None  # another user's id reads as no memory
        assert [h.id for h in lazy.recall("Hank's boat", "hank")] == [record.id]
        assert lazy.embed(["a boat", "a dog"]).shape == (2, 384)
        assert lazy.forget(record.id, user_id="hank") == 1
        assert lazy.optimize().memories == lazy.store.count()
        assert lazy._d2l is None and lazy._engine is None
    assert unloaded == [adapter.name] and not adapter.path.exists()


def test_the_model_loads_once_however_many_threads_ask_and_never_after_close(tmp_path, monkeypatch):
    loads: list[str] = []
    started = threading.Event()

    def slow_load(name: str) -> SimpleNamespace:
        loads.append(name)
        started.set()
        time.sleep(0.2)  # the other threads arrive while this one loads
        return SimpleNamespace(model_id=name)

    monkeypatch.setattr("d2l_memory.memory.load_model", slow_load)
    monkeypatch.setattr("d2l_memory.memory.DocToLoRA.from_pretrained",
                        lambda hypernet, base: SimpleNamespace(base=base))
    lazy = D2LMemory(tmp_path)
    with ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(lambda _: lazy.d2l, range(4)))
    assert started.is_set() and len(loads) == 1 and all(d is loaded[0] for d in loaded)
    lazy.close()
    with pytest.raises(D2LMemoryError, match="closed"):
        lazy.load()  # the engine is not built for a closed memory
