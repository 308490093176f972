"""The memory store against a real LanceDB in a temp dir, with the real MiniLM embedder."""

from __future__ import annotations

import hashlib
import math
import os
import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import lancedb
import numpy as np
import pytest
import torch

from d2l_memory.embedder import Embedder
from d2l_memory.errors import AdapterError, D2LMemoryError, MemoryNotFoundError, SchemaVersionError
from d2l_memory.lora import LoRA
from d2l_memory.store import SCHEMA_VERSION, MemoryInput, MemoryStore
from d2l_memory.store import migrations as store_migrations
from d2l_memory.store import store as store_module
from d2l_memory.store.filters import sql as _sql

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"model.layers.0.mlp.down_proj": (6, 8), "model.layers.1.mlp.down_proj": (6, 8)}
HOSTILE = ["x' OR '1'='1", "alice' --", "alice' OR user_id != '", "a b", "", "al\\ice", "x" * 300,
           "ali\x00ce"]


def make_lora(seed: int, *, rank: int = 2, base_model: str = "tiny", hypernet: str = "h1",
              shapes: dict[str, tuple[int, int]] = SHAPES) -> LoRA:
    gen = torch.Generator().manual_seed(seed)
    return LoRA({name: (torch.randn(rank, d_in, generator=gen), torch.randn(d_out, rank, generator=gen))
                 for name, (d_out, d_in) in shapes.items()}, base_model=base_model, hypernet=hypernet)


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(384).astype(np.float32)
    return v / np.linalg.norm(v)


def fingerprint(lora: LoRA) -> bytes:
    """32 bytes of the adapter's raw tensor data, as they sit inside its safetensors file."""
    a, _ = next(iter(lora.weights.values()))
    return a.contiguous().numpy().tobytes()[:32]


def disk_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture
def store(tmp_path: Path, embedder: Embedder) -> MemoryStore:
    with MemoryStore(tmp_path / "store", embedder=embedder) as s:
        yield s


def test_add_get_roundtrip(store: MemoryStore) -> None:
    lora = make_lora(0)
    before = datetime.now(UTC)
    m = store.add("alice", lora, text="Alice's cat is called Miso.", kind="chat", agent_id="agent-1",
                  session_id="s1", n_tokens=9, metadata={"source": "chat", "turn": 3})
    got = store.get(m.id)
    assert got == m
    assert got.text == "Alice's cat is called Miso." and got.kind == "chat" and got.n_tokens == 9
    assert got.metadata == {"source": "chat", "turn": 3}
    assert got.created_at.tzinfo == UTC
    assert before - timedelta(seconds=1) <= got.created_at <= datetime.now(UTC)
    assert (got.rank, got.n_chunks, got.base_model, got.hypernet) == (2, 1, "tiny", "h1")
    adapters = store._adapter_table
    stored = adapters.search().where(f"id = '{m.id}'").with_row_id(True).select(["_rowid"]).to_arrow()
    blob = adapters.fetch_blobs("adapter", stored.column("_rowid").to_pylist())[0].as_py()
    assert got.adapter_sha256 == hashlib.sha256(blob).hexdigest()  # the bytes as stored
    back = store.get_adapter(m.id, base_model="tiny", hypernet="h1", shapes=SHAPES)
    for name, (a, b) in lora.weights.items():
        assert torch.equal(back.weights[name][0], a) and torch.equal(back.weights[name][1], b)
    assert store.get("0" * 32) is None
    with pytest.raises(MemoryNotFoundError):
        store.get_adapter("0" * 32, base_model="tiny", hypernet="h1")
    assert store.count() == 1 and store.count("alice") == 1 and store.count("bob") == 0


def test_add_many_is_one_commit_and_validates_first(store: MemoryStore) -> None:
    version = store._table.version
    out = store.add_many([MemoryInput(user_id="u1", adapter=make_lora(i), vector=unit(i)) for i in range(3)])
    assert len({m.id for m in out}) == 3 and store.count("u1") == 3
    assert store._table.version == version + 1
    bad = make_lora(9)
    next(iter(bad.weights.values()))[0][0, 0] = math.nan
    with pytest.raises(AdapterError, match="NaN"):  # one bad memory: none of the batch is written
        store.add_many([MemoryInput(user_id="u1", adapter=make_lora(5), vector=unit(5)),
                        MemoryInput(user_id="u1", adapter=bad, vector=unit(6))])
    assert store.count() == 3
    with pytest.raises(ValueError, match="text or a vector"):
        store.add("u1", make_lora(1))
    with pytest.raises(ValueError, match="384"):
        store.add("u1", make_lora(1), vector=[1.0, 2.0])
    with pytest.raises(ValueError, match="JSON"):
        store.add("u1", make_lora(1), vector=unit(1), metadata={"x": {1, 2}})
    with pytest.raises(ValueError, match="kind"):
        store.add("u1", make_lora(1), vector=unit(1), kind="secret")  # type: ignore[arg-type]
    assert store.count() == 3


def test_scope_isolation_and_hostile_ids(store: MemoryStore) -> None:
    v = unit(0)
    store.add("alice", make_lora(0), vector=v, agent_id="a1", session_id="s1")
    store.add("alice", make_lora(1), vector=unit(1), agent_id="a2", session_id="s2", kind="tool")
    store.add("bob", make_lora(2), vector=v)  # the same vector: only the filter keeps it out
    store.add("alice-2", make_lora(3), vector=v)

    hits = store.search(v, "alice", k=10)
    assert {h.user_id for h in hits} == {"alice"} and len(hits) == 2
    assert hits[0].score == pytest.approx(1.0, abs=1e-4) and hits[0].score >= hits[1].score
    assert [h.agent_id for h in store.search(v, "alice", k=10, agent_id="a2")] == ["a2"]
    assert [h.session_id for h in store.search(v, "alice", k=10, session_id="s1")] == ["s1"]
    assert [h.kind for h in store.list("alice", kind="tool")] == ["tool"]
    assert len(store.list("alice")) == 2 and len(store.list("alice", limit=1)) == 1
    assert [h.user_id for h in store.search(v, "bob", k=10)] == ["bob"]

    for bad in HOSTILE:
        with pytest.raises(ValueError, match="user_id"):
            store.search(v, bad, k=10)
        with pytest.raises(ValueError, match="user_id"):
            store.list(bad)
        with pytest.raises(ValueError, match="user_id"):
            store.count(bad)
        with pytest.raises(ValueError, match="user_id"):
            store.delete_user(bad)
        with pytest.raises(ValueError, match="user_id"):
            store.add(bad, make_lora(4), vector=v)
        with pytest.raises(ValueError, match="agent_id"):
            store.search(v, "alice", k=10, agent_id=bad)
        with pytest.raises(ValueError, match="session_id"):
            store.list("alice", session_id=bad)
        with pytest.raises(ValueError, match="memory id"):
            store.get(bad)
        with pytest.raises(ValueError, match="memory id"):
            store.delete(bad)
        with pytest.raises(ValueError, match="user_id"):
            store.validate_scope(user_id=bad)
        with pytest.raises(ValueError, match="session_id"):
            store.validate_scope(user_id="alice", session_id=bad)
    store.validate_scope(user_id="alice", agent_id="a1", session_id="s1", kind="chat")
    with pytest.raises(ValueError, match="kind"):
        store.list("alice", kind="tool' OR '1'='1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="memory id"):
        store.get_adapter("0" * 31 + "' OR '1'='1", base_model="tiny", hypernet="h1")
    assert store.count() == 4  # nothing was deleted or added by any of that

    # The second guard: a quoted value is matched literally, never parsed as SQL.
    assert store._table.count_rows(f"user_id = {_sql(HOSTILE[0])}") == 0
    assert store._table.count_rows(f"user_id = {_sql('alice')}") == 2


def test_text_search_and_hybrid(store: MemoryStore) -> None:
    texts = ["Alice's cat is called Miso and loves tuna.", "The quarterly report is due on Friday.",
             "Invoice XQ7734 was paid by wire transfer.", "We hiked up Mont Ventoux in July."]
    for i, text in enumerate(texts):
        store.add("alice", make_lora(i), text=text)
    store.add("bob", make_lora(9), text="Invoice XQ7734 belongs to Bob, not Alice.")

    hits = store.search("What is the name of the cat?", "alice", k=2)
    assert hits[0].text == texts[0] and hits[0].score > hits[1].score
    assert "text" not in store._index_columns(store._table)  # the full-text index is built on first hybrid use
    hybrid = store.search("XQ7734", "alice", k=3, hybrid=True)
    assert "text" in store._index_columns(store._table)
    assert hybrid[0].text == texts[2] and {h.user_id for h in hybrid} == {"alice"}
    assert [h.score for h in hybrid] == sorted((h.score for h in hybrid), reverse=True)
    store.add("alice", make_lora(7), text="Invoice XQ9999 is still open.")  # not indexed yet, still found
    found = store.search("XQ9999", "alice", k=2, hybrid=True)
    assert "Invoice XQ9999 is still open." in [h.text for h in found]
    with pytest.raises(ValueError, match="text"):
        store.search(unit(0), "alice", k=2, hybrid=True)
    with pytest.raises(ValueError, match="k must"):
        store.search("cat", "alice", k=0)


def test_keep_text_false_stores_no_text(tmp_path: Path, embedder: Embedder) -> None:
    with MemoryStore(tmp_path / "s", keep_text=False, embedder=embedder) as store:
        m = store.add("alice", make_lora(0), text="zqxsecret Alice's cat is called Miso.")
        store.add("alice", make_lora(1), text="The quarterly report is due on Friday.")
        assert m.text is None and store.get(m.id).text is None
        assert store._table.search().select(["text"]).to_arrow().column("text").null_count == 2
        assert store.search("what is the cat called?", "alice", k=1)[0].id == m.id  # recall by embedding
        with pytest.raises(ValueError, match="keep_text=False"):
            store.search("cat", "alice", k=1, hybrid=True)
    assert b"zqxsecret" not in disk_bytes(tmp_path / "s")


def _corrupt(store: MemoryStore, memory_id: str, adapter: bytes, sha256: str | None = None) -> None:
    """Overwrite a memory's adapter straight through LanceDB, as a bad disk or a foreign writer would."""
    store._adapter_table.delete(f"id = '{memory_id}'")
    store._adapter_table.add([{"id": memory_id, "adapter": adapter, "created_at": datetime.now(UTC)}])
    if sha256 is not None:
        store._table.update(where=f"id = '{memory_id}'", values={"adapter_sha256": sha256})


def test_corrupt_or_foreign_adapter_is_an_error(store: MemoryStore) -> None:
    ids = [store.add("alice", make_lora(i), vector=unit(i)).id for i in range(4)]
    good = make_lora(0).to_bytes()
    flipped = bytearray(good)
    flipped[-5] ^= 0x01
    _corrupt(store, ids[0], bytes(flipped))
    with pytest.raises(AdapterError, match="sha256"):
        store.get_adapter(ids[0], base_model="tiny", hypernet="h1")
    _corrupt(store, ids[1], b"\x00garbage", sha256=hashlib.sha256(b"\x00garbage").hexdigest())
    with pytest.raises(AdapterError, match="safetensors"):
        store.get_adapter(ids[1], base_model="tiny", hypernet="h1")
    foreign = make_lora(5, base_model="other-model").to_bytes()
    _corrupt(store, ids[2], foreign, sha256=hashlib.sha256(foreign).hexdigest())
    with pytest.raises(AdapterError, match="other-model"):
        store.get_adapter(ids[2], base_model="tiny", hypernet="h1")
    with pytest.raises(AdapterError, match="hypernetwork"):
        store.get_adapter(ids[3], base_model="tiny", hypernet="h2")
    with pytest.raises(AdapterError, match="does not have"):  # a module the model lacks
        one = {"model.layers.0.mlp.down_proj": (6, 8)}
        store.get_adapter(ids[3], base_model="tiny", hypernet="h1", shapes=one)
    with pytest.raises(AdapterError, match="the base model's is 6x9"):
        store.get_adapter(ids[3], base_model="tiny", hypernet="h1", shapes=dict.fromkeys(SHAPES, (6, 9)))
    with pytest.raises(AdapterError):  # one bad adapter fails the batch: nothing corrupt is composed
        store.get_adapters([ids[3], ids[0]], base_model="tiny", hypernet="h1")
    assert set(store.get_adapters([ids[3]], base_model="tiny", hypernet="h1")) == {ids[3]}


def test_delete_and_exact_user_erasure(tmp_path: Path, embedder: Embedder) -> None:
    root = tmp_path / "s"
    store = MemoryStore(root, embedder=embedder, index_threshold=4)  # so every index kind exists
    erased: list[list[str]] = []
    store.on_erase(erased.append)
    alice = [make_lora(i) for i in range(2)]
    bob = [make_lora(10 + i) for i in range(30)]
    alice_ids = [store.add("alicesecret", lo, text=f"zqxalice{i} likes tuna").id
                 for i, lo in enumerate(alice)]
    bob_ids = [m.id for m in store.add_many([MemoryInput(user_id="bob", adapter=lo, text=f"bob note {i} about tuna")
                                             for i, lo in enumerate(bob)])]
    store.search("tuna", "bob", k=2, hybrid=True)  # builds the full-text index too
    # One data file holding both users, alice's rows under 10 % of it: compaction alone would keep them.
    store.optimize(older_than=timedelta(0))
    assert {"parts", "user_id", "id", "text"} <= store._index_columns(store._table)
    assert all(fingerprint(lo) in disk_bytes(root) for lo in alice + bob)

    assert store.delete(bob_ids[-1]) == 1 and store.delete(bob_ids[-1]) == 0
    assert erased == [[bob_ids[-1]]]
    assert store.delete_user("alicesecret") == 2
    assert sorted(erased[-1]) == sorted(alice_ids)
    assert store.count("alicesecret") == 0 and store.list("alicesecret") == []
    assert store.search("tuna", "alicesecret", k=5) == []
    assert all(store.get(i) is None for i in alice_ids)
    on_disk = disk_bytes(root)
    assert not any(fingerprint(lo) in on_disk for lo in alice), "an erased adapter is still on disk"
    assert b"zqxalice" not in on_disk and b"alicesecret" not in on_disk
    assert all(fingerprint(lo) in on_disk for lo in bob[:-1])  # the check itself can see adapters
    # bob is untouched and the store keeps working
    assert {m.id for m in store.list("bob")} == set(bob_ids[:-1])
    assert store.get_adapters(bob_ids[:-1], base_model="tiny", hypernet="h1").keys() == set(bob_ids[:-1])
    assert {h.user_id for h in store.search("tuna", "bob", k=5, hybrid=True)} == {"bob"}
    store.add("alicesecret", make_lora(3), vector=unit(3))
    assert store.count("alicesecret") == 1 and store.delete_user("alicesecret", purge=False) == 1
    store.close()
    with pytest.raises(D2LMemoryError, match="closed"):
        store.count()


def test_schema_version_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = tmp_path / "s"
    MemoryStore(uri).close()
    meta = lancedb.connect(uri).open_table("meta")

    meta.update(where="key = 'schema_version'", values={"value": str(SCHEMA_VERSION + 1)})
    with pytest.raises(SchemaVersionError) as err:
        MemoryStore(uri)
    assert (err.value.found, err.value.expected) == (SCHEMA_VERSION + 1, SCHEMA_VERSION)
    assert f"schema version {SCHEMA_VERSION + 1}" in str(err.value) and "Upgrade d2l-memory" in str(err.value)

    meta.update(where="key = 'schema_version'", values={"value": "0"})
    with pytest.raises(SchemaVersionError, match="No migration") as err:
        MemoryStore(uri)
    assert err.value.found == 0
    calls: list[int] = []
    monkeypatch.setitem(store_migrations.MIGRATIONS, 0, lambda store: calls.append(1))
    with pytest.raises(SchemaVersionError, match="migrate=True"):
        MemoryStore(uri)
    MemoryStore(uri, migrate=True).close()
    assert calls == [1]
    MemoryStore(uri).close()  # now at the current version

    other = tmp_path / "foreign"
    lancedb.connect(other).create_table("memories", data=[{"id": "x"}])
    with pytest.raises(SchemaVersionError, match="no schema version") as err:
        MemoryStore(other)
    assert err.value.found is None


def test_ann_index_once_large_enough(tmp_path: Path) -> None:
    with MemoryStore(tmp_path / "s", index_threshold=40) as store:
        store.add_many([MemoryInput(user_id=f"u{i % 3}", adapter=make_lora(0), vector=unit(i))
                        for i in range(30)])
        assert store._index_columns(store._table) == set()
        store.add_many([MemoryInput(user_id=f"u{i % 3}", adapter=make_lora(0), vector=unit(i))
                        for i in range(30, 45)])
        assert {"parts", "user_id", "id"} <= store._index_columns(store._table)
        assert store._index_columns(store._adapter_table) == {"id"}
        for i in (0, 31, 44):  # the indexed search is still exact here and still scoped
            hits = store.search(unit(i), f"u{i % 3}", k=3)
            assert hits[0].score == pytest.approx(1.0, abs=1e-4)
            assert {h.user_id for h in hits} == {f"u{i % 3}"}


def test_small_scopes_are_searched_exactly_large_ones_through_the_index(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with MemoryStore(tmp_path / "s", index_threshold=40) as store:
        store.add_many([MemoryInput(user_id=f"u{i % 3}", adapter=make_lora(0), vector=unit(i))
                        for i in range(45)])  # 15 memories per user, indexed
        where = "user_id = 'u0'"
        assert "KNNVectorDistance" in store._vector_query(unit(0), where, "parts").explain_plan()
        monkeypatch.setattr(store_module, "EXACT_SEARCH_ROWS", 14)
        assert "ANNSubIndex" in store._vector_query(unit(0), where, "parts").explain_plan()
        hits = store.search(unit(3), "u0", k=3)
        assert hits[0].score == pytest.approx(1.0, abs=1e-4) and {h.user_id for h in hits} == {"u0"}


def test_optimize_drops_old_versions(tmp_path: Path) -> None:
    with MemoryStore(tmp_path / "s") as store:
        for i in range(25):
            store.add("u", make_lora(i), vector=unit(i))
        assert len(store._table.list_versions()) > 25
        size = sum(p.stat().st_size for p in (tmp_path / "s").rglob("*") if p.is_file())
        store.optimize(older_than=timedelta(0))
        assert len(store._table.list_versions()) == 1
        assert sum(p.stat().st_size for p in (tmp_path / "s").rglob("*") if p.is_file()) < size
        ids = [m.id for m in store.list("u")]
        assert len(ids) == 25 and len(store.get_adapters(ids, base_model="tiny", hypernet="h1")) == 25


WRITER = """
import os, sys, traceback
import numpy as np, torch
import d2l_memory  # the package's heavy imports, made once before forking (they start no threads)
from d2l_memory.lora import LoRA

def run(uri, worker, n, size):
    from d2l_memory.store import MemoryStore  # lancedb starts threads: import it after the fork
    store = MemoryStore(uri)
    rng = np.random.default_rng(worker)
    for i in range(n):
        lora = LoRA({"model.layers.0.mlp.down_proj": (torch.randn(2, size), torch.randn(size, 2))},
                    base_model="tiny", hypernet="h1")
        m = store.add(f"user{worker}", lora, vector=rng.standard_normal(384), metadata={"i": i})
        os.write(1, f"{m.id}\\n".encode())  # one write per line: lines of the workers never mix

uri, workers, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
pids = []
for worker in range(workers):  # separate writer processes, forked so they share the import work
    pid = os.fork()
    if pid == 0:
        try:
            run(uri, worker, n, size)
            code = 0
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    pids.append(pid)
    os.write(1, f"pid {pid}\\n".encode())
codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
print("exit codes", codes, file=sys.stderr)
sys.exit(0 if all(c == 0 for c in codes) else 1)
"""


def _writers(uri: Path | str, workers: int, n: int, size: int = 8) -> subprocess.Popen[str]:
    """`workers` processes each adding `n` memories to the store at `uri`, printing each id once added."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "LANCE_LOG": "error"}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(uri), str(workers), str(n), str(size)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def check_concurrent_writers(uri: Path | str, workers: int, each: int) -> None:
    """`workers` writer processes add `each` memories each to one store: nothing lost, nothing duplicated,
    every row with its adapter."""
    MemoryStore(uri).close()  # created before the workers open it (as they do: from the environment on S3)
    writers = _writers(uri, workers, each)
    out, err = writers.communicate(timeout=300)
    assert writers.returncode == 0, err[-2000:]
    printed = [line for line in out.splitlines() if not line.startswith("pid ")]
    total = workers * each
    assert len(printed) == total and len(set(printed)) == total
    with MemoryStore(uri) as store:
        stored = store._table.search().select(["id"]).to_arrow().column("id").to_pylist()
        assert len(stored) == total and set(stored) == set(printed)
        assert [store.count(f"user{w}") for w in range(workers)] == [each] * workers
        assert store._adapter_table.count_rows() == total
        assert len(store.get_adapters(stored, base_model="tiny", hypernet="h1")) == total


def test_four_writer_processes(tmp_path: Path) -> None:
    check_concurrent_writers(tmp_path / "s", 4, 50)


def kill_writer_mid_add(uri: Path | str, lines: int, max_sleep_s: float) -> list[str]:
    """Start one writer of ~320 KB adapters (so the kill lands inside an add), read `lines` ids, kill it with
    SIGKILL after up to `max_sleep_s`; returns every id it reported as added."""
    child = _writers(uri, 1, 10_000, size=20_000)
    assert child.stdout is not None
    worker = int(child.stdout.readline().split()[1])
    reported = [child.stdout.readline().strip() for _ in range(lines)]
    time.sleep(random.uniform(0.0, max_sleep_s))
    os.kill(worker, signal.SIGKILL)
    rest, err = child.communicate(timeout=60)
    reported += rest.split()
    assert f"exit codes [{-signal.SIGKILL}]" in err and all(len(i) == 32 for i in reported)
    return reported


def check_whole_after_kill(store: MemoryStore, reported: list[str]) -> list[str]:
    """Every reported add is stored once, every row has its adapter, and the one adapter a kill between an
    add's two commits may leave is swept; returns the stored ids."""
    stored = store._table.search().select(["id"]).to_arrow().column("id").to_pylist()
    assert set(reported) <= set(stored), "an add that returned is missing after kill -9"
    assert len(stored) - len(reported) <= 1 and len(set(stored)) == len(stored)
    adapters = store.get_adapters(stored, base_model="tiny", hypernet="h1")  # no half-written adapter
    assert len(adapters) == len(stored)
    assert store._adapter_table.count_rows() - len(stored) in (0, 1)
    store.sweep_orphans(older_than=timedelta(0))
    assert store._adapter_table.count_rows() == len(stored)
    return stored


def test_kill_9_during_add_loop(tmp_path: Path) -> None:
    uri = tmp_path / "s"
    MemoryStore(uri).close()
    reported = kill_writer_mid_add(uri, 12, 0.05)
    with MemoryStore(uri) as store:
        stored = check_whole_after_kill(store, reported)
        m = store.add("user0", make_lora(0), vector=unit(0))  # and the store keeps working
        assert store.search(unit(0), "user0", k=1)[0].id == m.id
        store.optimize(older_than=timedelta(0))
        assert store.count("user0") == len(stored) + 1
