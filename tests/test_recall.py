"""Retrieval: best-part scoring, full-text fusion, the recency tie-break, the v1 -> v2 migration and the
write protocol across the two tables (real LanceDB, real MiniLM)."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from test_store import disk_bytes, make_lora

from d2l_memory.embedder import Embedder
from d2l_memory.errors import SchemaVersionError
from d2l_memory.store import MemoryStore
from d2l_memory.store import migrations as store_migrations
from d2l_memory.transcripts import refers_to_user, retrieval_parts

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


def test_parts_are_sentences_and_joined_statements_without_roles():
    text = "User: Hi!\nAssistant: Hello.\nUser: My favorite color is teal and I live in Lisbon. How are you?"
    assert retrieval_parts(text) == ["My favorite color is teal and I live in Lisbon.", "How are you?",
                                     "My favorite color is teal", "I live in Lisbon."]
    assert retrieval_parts("I live in Lisbon.") == []  # the whole text is the one part
    many = retrieval_parts(" ".join(f"Sentence number {i}." for i in range(100)), max_parts=8)
    assert len(many) == 8 and many[0].startswith("Sentence number 0.") and many[-1].endswith("number 99.")


def test_messages_about_the_user_are_told_by_first_person_words():
    for text in ("Where do I live?", "what's my code", "What did we decide about the trip?", "I'm bored.",
                 "Remind me of MY number", "Which one is mine?"):
        assert refers_to_user(text), text
    for text in ("What is the capital of France?", "Tell me about Paris.", "Is it icy in Iceland?",
                 "Give us a summary of the news."):
        assert not refers_to_user(text), text


def test_a_memory_scores_by_its_best_part(tmp_path: Path, embedder: Embedder) -> None:
    chat = ("User: I just got back from the gym, it was packed today.\nAssistant: Sounds busy!\n"
            "User: Yeah. By the way my favorite color is teal and I live in Lisbon.\nAssistant: Noted!\n"
            "User: Anyway, did you watch the match last night? It went to penalties.")
    with MemoryStore(tmp_path / "s", embedder=embedder) as store:
        m = store.add("alice", make_lora(0), text=chat, kind="chat")
        whole = store.search("Where do I live?", "alice", k=1, parts=False)[0].score
        best = store.search("Where do I live?", "alice", k=1)[0]
        sentence = float(embedder.embed(["I live in Lisbon."])[0] @ embedder.embed(["Where do I live?"])[0])
        assert best.id == m.id and best.score == pytest.approx(sentence, abs=1e-3)
        assert best.score > whole + 0.15
        assert store.search("Where do I live?", "alice", k=1, hybrid=True)[0].score == pytest.approx(best.score)


def test_fusion_finds_exact_terms_and_keeps_the_cosine_as_score(tmp_path: Path, embedder: Embedder) -> None:
    with MemoryStore(tmp_path / "s", embedder=embedder) as store:
        texts = ["My flight confirmation is ZK4471 for Tuesday.", "I booked a flight to Oslo for the summit.",
                 "My gym locker is number 12.", "The dentist moved my appointment to Friday."]
        ids = [store.add("alice", make_lora(i), text=t).id for i, t in enumerate(texts)]
        dense = store.search("ZK4471", "alice", k=4)
        fused = store.search("ZK4471", "alice", k=4, hybrid=True)
        assert fused[0].id == ids[0]
        cosine = {h.id: h.score for h in dense}
        assert all(h.score == pytest.approx(cosine[h.id], abs=1e-4) for h in fused)  # the gate's score


def test_a_question_about_the_present_prefers_the_update(tmp_path: Path, embedder: Embedder) -> None:
    with MemoryStore(tmp_path / "s", embedder=embedder) as store:
        old = store.add("alice", make_lora(0), text="User: I live in Lisbon.", kind="chat")
        new = store.add("alice", make_lora(1), text="User: I moved, I live in Porto.", kind="chat")
        hits = store.search("Where do I live now?", "alice", k=2, hybrid=True)
        assert [h.id for h in hits] == [new.id, old.id]


def test_an_adapter_without_its_row_is_invisible_and_swept(tmp_path: Path, embedder: Embedder) -> None:
    with MemoryStore(tmp_path / "s", embedder=embedder) as store:
        kept = store.add("alice", make_lora(0), text="I keep bees.")
        # what an add killed between its two commits leaves: the adapter, no row
        orphan = {"id": "f" * 32, "adapter": make_lora(1).to_bytes(), "created_at": datetime.now(UTC)}
        store._adapter_table.add([orphan])
        assert store.count() == 1 and store.get("f" * 32) is None
        assert [h.id for h in store.search("bees", "alice", k=5)] == [kept.id]
        assert store.sweep_orphans() == 0  # younger than the grace period: maybe an add in flight
        store.optimize(older_than=timedelta(0))
        assert store._adapter_table.count_rows() == 1
        assert store.get_adapter(kept.id, base_model="tiny", hypernet="h1").rank == 2


def test_a_failed_row_commit_leaves_no_adapter(tmp_path: Path, embedder: Embedder,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    with MemoryStore(tmp_path / "s", embedder=embedder) as store:
        real = MemoryStore._commit

        def fail_rows(table, rows):  # the adapters commit lands, the rows commit fails
            if table is store._table:
                raise OSError("disk full")
            real(table, rows)

        monkeypatch.setattr(MemoryStore, "_commit", staticmethod(fail_rows))
        with pytest.raises(OSError, match="disk full"):
            store.add("alice", make_lora(0), text="I keep bees.")
        assert store.count() == 0 and store._adapter_table.count_rows() == 0


def _v1_copy(tmp_path: Path) -> Path:
    uri = tmp_path / "v1"
    shutil.copytree(DATA / "store-v1", uri)
    return uri


def test_a_v1_store_migrates_with_nothing_lost(tmp_path: Path, embedder: Embedder) -> None:
    uri = _v1_copy(tmp_path)
    expected = json.loads((DATA / "store-v1.json").read_text())
    with pytest.raises(SchemaVersionError, match="migrate=True"):
        MemoryStore(uri, embedder=embedder)
    with MemoryStore(uri, embedder=embedder, migrate=True) as store:
        assert "adapter" not in store._table.schema.names
        assert store.count() == len(expected)
        for memory_id, e in expected.items():
            m = store.get(memory_id)
            assert m is not None and m.text == e["text"] and m.metadata == e["metadata"]
            assert (m.user_id, m.kind, m.agent_id, m.session_id) == (e["user_id"], e["kind"], e["agent_id"],
                                                                      e["session_id"])
            assert m.adapter_sha256 == e["adapter_sha256"]
        assert len(store.get_adapters(list(expected), base_model="tiny", hypernet="abc123")) == len(expected)
        lisbon = next(i for i, e in expected.items() if "Lisbon" in (e["text"] or ""))
        hit = store.search("Where do I live?", "alice", k=1)[0]
        assert hit.id == lisbon and hit.score > 0.4  # the migrated memory is scored by its parts
        new = store.add("alice", make_lora(5), text="I collect stamps.")
        assert store.search("stamps", "alice", k=1)[0].id == new.id
    with MemoryStore(uri, embedder=embedder) as store:  # v2 now: opens without migrating
        assert store.count() == len(expected) + 1
        assert store.delete_user("bob") == 1
        assert store.count() == len(expected)
    # forgetting reaches the copy the v1 layout wrote too
    on_disk = disk_bytes(uri)
    assert b"I keep bees" not in on_disk and b"I collect stamps" in on_disk


def test_an_interrupted_migration_finishes_on_the_next_open(tmp_path: Path, embedder: Embedder,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    uri = _v1_copy(tmp_path)
    expected = json.loads((DATA / "store-v1.json").read_text())
    real = MemoryStore.parts_vectors

    def killed(self, texts, vectors):  # the adapters are copied, then the run dies filling `parts`
        raise KeyboardInterrupt

    monkeypatch.setattr(MemoryStore, "parts_vectors", killed)
    with pytest.raises(KeyboardInterrupt):
        MemoryStore(uri, embedder=embedder, migrate=True)
    monkeypatch.setattr(MemoryStore, "parts_vectors", real)
    with pytest.raises(SchemaVersionError):  # still version 1
        MemoryStore(uri, embedder=embedder)
    with MemoryStore(uri, embedder=embedder, migrate=True) as store:
        assert store.count() == len(expected) and store._adapter_table.count_rows() == len(expected)
        assert len(store.get_adapters(list(expected), base_model="tiny", hypernet="abc123")) == len(expected)
        assert store_migrations.MIGRATIONS[1] and "adapter" not in store._table.schema.names
