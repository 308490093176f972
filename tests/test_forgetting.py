"""Forgetting reaches every copy: composed entries (on hits, across races, after a kill -9), the servers that
loaded them, and the store's bytes. Each interleaving is replayed step by step at a fixed point."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from chats import LoopbackServer, QuietHandler
from test_compose import BASE, MODULES, Source, mid, random_lora
from typer.testing import CliRunner

from d2l_memory.compose import ORPHAN_AGE_S, ComposedCache, Recipe, cache_root_for
from d2l_memory.engines.resolver_plugin import D2LResolver
from d2l_memory.engines.vllm_server import (
    SERVERS_DIR,
    ServerConfig,
    VLLMServer,
    VLLMServerEngine,
    evict_from_servers,
)
from d2l_memory.errors import MemoryNotFoundError
from d2l_memory.store import MemoryStore

REPO = Path(__file__).resolve().parents[1]
VECTOR = [1.0] + [0.0] * 383


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict]:
    """A store with two memories of alice, and the cache that erases with it."""
    store = MemoryStore(tmp_path / "db")
    cache = ComposedCache(tmp_path / "composed")
    store.on_erase(cache.erase)
    erased: list[str] = []
    cache.on_erase(erased.extend)
    one, two = (store.add("alice", random_lora(i), vector=VECTOR).id for i in (1, 2))
    recipe = Recipe(members=((one, 1.0), (two, 1.0)), base_model=BASE)
    yield {"store": store, "cache": cache, "one": one, "two": two, "recipe": recipe, "erased": erased,
           "root": tmp_path}
    store.close()


def test_a_hit_whose_member_is_gone_is_erased_not_served(world) -> None:
    store, cache, recipe = world["store"], world["cache"], world["recipe"]
    entry = cache.get_or_compose(recipe, store)
    # The row goes but the erase callbacks never run (what a kill -9 between the two leaves).
    store._erase_callbacks.clear()
    store.delete(world["one"])
    assert cache.get(entry.name) is not None  # the entry is still on disk...
    with pytest.raises(MemoryNotFoundError, match=world["one"]):
        cache.get_or_compose(recipe, store)  # ...but no hit serves it
    assert not entry.path.exists() and world["erased"] == [entry.name]
    other = ComposedCache(cache.root)
    lone = other.get_or_compose(Recipe(members=((world["two"], 1.0),), base_model=BASE), store)
    store.delete(world["two"])
    assert D2LResolver(other, source=store)._entry(lone.name) is None  # the server's path checks too
    assert not lone.path.exists()


def test_a_forget_between_the_read_and_the_write_never_leaves_the_memory_in_a_new_entry(world) -> None:
    store, cache, recipe, one = world["store"], world["cache"], world["recipe"], world["one"]

    class ForgetAfterRead:
        """The store, with a forget landing right after the members' adapters were read."""

        def get_adapters(self, *args, **kwargs):
            adapters = store.get_adapters(*args, **kwargs)
            assert store.delete(one) == 1  # its erase runs now and finds no entry to drop
            return adapters

        def existing(self, memory_ids):
            return store.existing(memory_ids)

    with pytest.raises(MemoryNotFoundError):
        cache.get_or_compose(recipe, ForgetAfterRead())
    assert not cache.path(recipe.name).exists() and world["erased"] == [recipe.name]
    assert cache.recipe(recipe.name) is None


def test_a_forget_between_the_write_and_the_check_erases_the_new_entry(world, monkeypatch) -> None:
    store, cache, recipe, one = world["store"], world["cache"], world["recipe"], world["one"]
    write = cache._write

    def write_then_forget(*args, **kwargs):
        entry = write(*args, **kwargs)
        assert entry.path.exists()
        assert store.delete(one) == 1  # its erase sees the entry, now in place, and drops it
        assert not entry.path.exists()
        return entry

    monkeypatch.setattr(cache, "_write", write_then_forget)
    with pytest.raises(MemoryNotFoundError):
        cache.get_or_compose(recipe, store)
    assert not cache.path(recipe.name).exists() and recipe.name in world["erased"]


KILLED_FORGET = """
import os, signal, sys
from d2l_memory.store import MemoryStore

store = MemoryStore(sys.argv[1])
store.on_erase(lambda ids: os.kill(os.getpid(), signal.SIGKILL))  # dies after the rows went, before any erase
store.delete(sys.argv[2])
"""


def test_a_kill_9_between_the_row_delete_and_the_callbacks_is_swept(world) -> None:
    store, cache, recipe, one = world["store"], world["cache"], world["recipe"], world["one"]
    entry = cache.get_or_compose(recipe, store)
    kept = cache.get_or_compose(Recipe(members=((world["two"], 1.0),), base_model=BASE), store)
    env = {**os.environ, "PYTHONPATH": str(REPO), "LANCE_LOG": "error"}
    child = subprocess.run([sys.executable, "-c", KILLED_FORGET, str(world["root"] / "db"), one], env=env,
                           cwd=REPO, capture_output=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    assert store.get(one) is None and entry.path.exists()  # the row went, the entry stayed
    # Temporary directories of killed writers: an old one goes, one a live writer may still fill stays.
    old, fresh = cache.root / ".d2l-0123-old", cache.root / ".d2l-4567-fresh"
    for path in (old, fresh):
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes(b"partial")
    past = time.time() - ORPHAN_AGE_S - 60
    os.utime(old, (past, past))
    assert cache.sweep(store) == [entry.name]
    assert not entry.path.exists() and world["erased"] == [entry.name]
    assert not old.exists() and fresh.exists() and cache.get(kept.name) is not None


def test_one_store_spelled_any_way_has_one_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("D2L_MEMORY_HOME", str(tmp_path))
    same = {cache_root_for(uri) for uri in ("s3://b/p", "s3://b/p/", "S3://b//p", "s3://b/x/../p", "s3://b/p//")}
    assert len(same) == 1
    assert cache_root_for("s3://b/q") not in same and cache_root_for("gs://b/p") not in same
    assert cache_root_for("db://name") == cache_root_for("db://name/")


def test_a_corrupted_entry_is_rebuilt_never_served(tmp_path) -> None:
    source = Source({mid(1): random_lora(1), mid(2): random_lora(2)})
    cache = ComposedCache(tmp_path)
    recipe = Recipe(members=((mid(1), 1.0), (mid(2), 0.5)), base_model=BASE)
    entry = cache.get_or_compose(recipe, source)
    expected = entry.lora.delta(MODULES[0])
    weights = entry.path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100:] = bytes(100)  # same size, other values: what a bad disk or a partial copy leaves
    weights.write_bytes(bytes(data))
    assert cache.get(entry.name) is None and not weights.exists()  # refused and dropped
    assert D2LResolver(cache)._entry(entry.name) is None  # a server without the store refuses it too
    reads = source.reads
    rebuilt = cache.get_or_compose(recipe, source)
    assert source.reads == reads + 2 and cache.get(rebuilt.name) is not None
    torch.testing.assert_close(ComposedCache(tmp_path).get(rebuilt.name).lora.delta(MODULES[0]), expected)
    meta = json.loads((entry.path / "d2l_recipe.json").read_text())
    assert set(meta["sha256"]) == {"adapter_model.safetensors", "adapter_config.json"}


class Replica(LoopbackServer):
    """A stand-in vLLM server that records unload requests; `loaded` names answer 200, others 404."""

    def __init__(self, loaded: set[str]) -> None:
        self.loaded, self.unloaded = set(loaded), []
        replica = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert self.path == "/v1/unload_lora_adapter"
                replica.unloaded.append((body["lora_name"], self.headers.get("Authorization")))
                status = 200 if body["lora_name"] in replica.loaded else 404
                replica.loaded.discard(body["lora_name"])
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        super().__init__(Handler)


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    running = [Replica({"d2l-a"}), Replica({"d2l-a", "d2l-b"})]
    yield running
    for replica in running:
        replica.close()


def test_evict_unloads_from_every_replica(replicas) -> None:
    first, second = replicas
    engine = VLLMServerEngine(first.url, replicas=[second.url, first.url + "/"], api_key="k")
    engine.evict(["d2l-a", "d2l-b"])
    engine.http.close()
    assert first.unloaded == second.unloaded == [("d2l-a", "Bearer k"), ("d2l-b", "Bearer k")]
    assert first.loaded == second.loaded == set()


def test_forget_anywhere_unloads_from_every_registered_server(replicas, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("D2L_MEMORY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("D2L_MEMORY_API_KEY", raising=False)
    first, second = replicas
    store_uri = tmp_path / "db"
    with MemoryStore(store_uri) as store:
        memory = store.add("alice", random_lora(1), vector=VECTOR).id
    cache = ComposedCache(cache_root_for(store_uri))
    with MemoryStore(store_uri) as store:
        entry = cache.get_or_compose(Recipe(members=((memory, 1.0),), base_model=BASE), store)
    first.loaded.add(entry.name)
    second.loaded.add(entry.name)
    # Two servers serve this store's cache; a third registration is a server killed without `stop`.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    registrations = cache.root / SERVERS_DIR
    registrations.mkdir()
    for name, url, pid in [("a", first.url, os.getpid()), ("b", second.url, os.getpid()),
                           ("c", "http://127.0.0.1:9", int(dead.stdout))]:
        (registrations / f"{name}.json").write_text(json.dumps({"url": url, "pid": pid}))
    from d2l_memory.cli import app

    result = CliRunner().invoke(app, ["forget", "--user", "alice", "--yes", "--store", str(store_uri), "--json"])
    assert result.exit_code == 0, result.output
    assert (first.unloaded, second.unloaded) == ([(entry.name, None)], [(entry.name, None)])
    assert sorted(p.name for p in registrations.iterdir()) == ["a.json", "b.json"]  # the dead one is dropped
    assert not entry.path.exists()
    evict_from_servers(cache, [])  # nothing to unload: no request at all
    assert len(first.unloaded) == 1


def test_a_server_is_registered_while_it_runs(tmp_path) -> None:
    server = VLLMServer(ServerConfig(), ComposedCache(tmp_path))
    assert server.registration.parent == tmp_path / SERVERS_DIR
    server._register()
    assert json.loads(server.registration.read_text())["url"] == server.url
    server.stop()
    assert not server.registration.exists()


def test_delete_is_scoped_and_purges_in_one_rewrite(tmp_path) -> None:
    from test_store import disk_bytes, fingerprint, make_lora, unit

    root = tmp_path / "s"
    with MemoryStore(root) as store:
        alice = [make_lora(i) for i in range(3)]
        ids = [store.add("alice", lo, vector=unit(i)).id for i, lo in enumerate(alice)]
        bob = store.add("bob", make_lora(9), vector=unit(9)).id
        assert store.delete(ids[0], user_id="bob") == 0 and store.get(ids[0]) is not None  # not bob's
        versions = store.version_count()
        assert store.delete_many([ids[0], ids[1], bob], user_id="alice", purge=True) == 2
        on_disk = disk_bytes(root)
        assert not any(fingerprint(lo) in on_disk for lo in alice[:2]), "a forgotten adapter is still on disk"
        assert fingerprint(alice[2]) in on_disk and fingerprint(make_lora(9)) in on_disk
        assert store.version_count() <= versions  # the old versions holding them are gone too
        assert store.existing([*ids, bob]) == {ids[2], bob}
