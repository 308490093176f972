"""Two vLLM server replicas behind a round-robin balancer, sharing only the memory store.

Each replica has a composed-adapter cache of its own (no shared folder); the application's `D2LMemory`
has a third. A replica builds an adapter it has never seen from the recipe `D2LMemory` records in the
store, so the same request answers the same on both; a forget reaches both: at once for the adapters the
forgetting process knows (`VLLMServerEngine(replicas=...)`), and within the replicas' sweep interval for
a forget made by a process that knows no replica.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch
from chats import BASE, LoopbackServer, QuietHandler, down_proj_lora

from d2l_memory.compose import ComposedCache, Recipe
from d2l_memory.engines.resolver_plugin import D2LResolver
from d2l_memory.store import MemoryStore

KEY = "replica-test-key-41d9"
SWEEP_S = 0.5
VECTOR = [1.0] + [0.0] * 383


# -- the recipe table and the resolver, without vLLM -------------------------------------------------
def test_a_cache_that_never_composed_a_name_builds_it_from_the_recipe_in_the_store(tmp_path: Path) -> None:
    store = MemoryStore(tmp_path / "db")
    ids = [store.add("alice", down_proj_lora(seed, 0.04), vector=VECTOR).id for seed in (1, 2)]
    recipe = Recipe(members=((ids[0], 0.5), (ids[1], 0.5)), base_model=BASE)
    ComposedCache(tmp_path / "app").get_or_compose(recipe, store)
    store.put_recipe(recipe.name, recipe.model_dump_json(), recipe.memory_ids)
    store.put_recipe(recipe.name, recipe.model_dump_json(), recipe.memory_ids)  # idempotent
    assert Recipe.model_validate_json(store.get_recipe(recipe.name)) == recipe

    replica = D2LResolver(ComposedCache(tmp_path / "replica"), source=store, recipes=store)
    entry = replica._entry(recipe.name)
    assert entry is not None and entry.path.is_relative_to(tmp_path / "replica")
    assert torch.equal(entry.lora.weights[next(iter(entry.lora.modules))][0],
                       ComposedCache(tmp_path / "app").get(recipe.name).lora.weights[next(iter(entry.lora.modules))][0])

    store.delete(ids[1])  # a member goes: its recipe goes with it, and no cache can build the name again
    assert store.get_recipe(recipe.name) is None
    assert D2LResolver(ComposedCache(tmp_path / "fresh"), source=store, recipes=store)._entry(recipe.name) is None
    with pytest.raises(ValueError, match="uuid"):
        store.put_recipe("d2l-x", "{}", ["not-an-id"])


def test_optimize_drops_a_recipe_recorded_while_its_member_was_erased(tmp_path: Path) -> None:
    store = MemoryStore(tmp_path / "db")
    kept, gone = (store.add("alice", down_proj_lora(seed, 0.04), vector=VECTOR).id for seed in (1, 2))
    store.delete(gone)
    store.put_recipe("d2l-late", "{}", [kept, gone])  # written by a process that composed before the erase
    store.put_recipe("d2l-fine", "{}", [kept])
    store.optimize()
    assert store.get_recipe("d2l-late") is None and store.get_recipe("d2l-fine") == "{}"


# -- two real replicas --------------------------------------------------------------------------------
class RoundRobin(LoopbackServer):
    """A plain HTTP balancer: each request goes to the next backend in turn, headers and body as they are."""

    def __init__(self, backends: list[str]) -> None:
        self.backends = backends
        self.served: list[tuple[str, str]] = []  # (backend, path) of each forwarded request
        self._turn = 0
        self._lock = threading.Lock()
        balancer = self

        class Handler(QuietHandler):
            def _forward(self) -> None:
                with balancer._lock:
                    backend = balancer.backends[balancer._turn % len(balancer.backends)]
                    balancer._turn += 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
                reply = httpx.request(self.command, backend + self.path, content=body, headers=headers,
                                      timeout=300)
                balancer.served.append((backend, self.path))
                self.send_response(reply.status_code)
                self.send_header("Content-Type", reply.headers.get("content-type", "application/json"))
                self.send_header("Content-Length", str(len(reply.content)))
                self.end_headers()
                self.wfile.write(reply.content)

            do_GET = do_POST = _forward

        super().__init__(Handler)


def eventually(check: Callable[[], bool], timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return check()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from d2l_memory.engines.vllm_server import ServerConfig, VLLMServer

    root = tmp_path_factory.mktemp("replicas")
    MemoryStore(root / "db").close()  # the replicas open it on first use
    config = ServerConfig(model=BASE, api_key=KEY, lora_target_modules=("down_proj",), max_model_len=2048,
                          extra_args=("--kv-cache-memory-bytes", str(512 << 20)),  # two servers on one machine
                          env={"D2L_MEMORY_STORE_URI": str(root / "db"), "D2L_MEMORY_SWEEP_S": str(SWEEP_S)})
    servers = [VLLMServer(config, ComposedCache(root / f"replica-{i}")) for i in range(2)]
    errors: list[BaseException] = []

    def start(server: VLLMServer) -> None:
        try:
            server.start()
        except BaseException as exc:  # raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    balancer = RoundRobin([s.url for s in servers])
    try:
        if errors:
            raise errors[0]
        yield {"root": root, "servers": servers, "balancer": balancer}
    finally:
        balancer.close()
        for server in servers:
            server.stop()


def loaded(url: str) -> set[str]:
    models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()["data"]
    return {m["id"] for m in models if m.get("parent")}


@pytest.mark.vllm
@pytest.mark.slow
def test_two_replicas_answer_alike_from_the_store_and_forget_reaches_both(cluster: dict) -> None:
    from d2l_memory import D2LMemory
    from d2l_memory.engines.vllm_server import VLLMServerEngine

    root, servers, balancer = cluster["root"], cluster["servers"], cluster["balancer"]
    urls = [s.url for s in servers]
    engine = VLLMServerEngine(balancer.url, api_key=KEY, replicas=urls, model=BASE)
    with D2LMemory(root / "db", engine=engine) as mem:
        record = mem.absorb("User: My favourite colour is teal and my dog is called Biscuit.", "alice", "chat")
        messages, adapter = mem.prepare("What is my favourite colour?", "alice")
        assert adapter is not None
        name = mem.adapter_name(adapter)
        before = len(balancer.served)
        answers = [mem.generate(messages, adapter) for _ in range(2)]
        assert answers[0] == answers[1]
        assert {b for b, _ in balancer.served[before:]} == set(urls)  # one request went to each replica
        for server in servers:  # each built it in its own cache, from the store alone
            assert name in loaded(server.url)
            assert (server.cache.root / name).is_dir() and server.cache.root != mem.cache.root

        mem.forget(record.id, user_id="alice")  # this process knows the replicas: unloaded from both at once
        assert all(name not in loaded(url) for url in urls)
        assert eventually(lambda: not any((s.cache.root / name).exists() for s in servers))

        # A forget by a process that knows no replica (here: the store alone) reaches both by their sweep.
        other = mem.absorb("User: I live in Lisbon.", "alice", "chat")
        messages, adapter = mem.prepare("Where do I live?", "alice")
        other_name = mem.adapter_name(adapter)
        for _ in range(2):
            mem.generate(messages, adapter)
        assert all(other_name in loaded(url) for url in urls)
        with MemoryStore(root / "db") as store:
            store.delete(other.id)
        assert eventually(lambda: all(other_name not in loaded(url) for url in urls))
        assert eventually(lambda: not any((s.cache.root / other_name).exists() for s in servers))
        for url in urls:  # and no replica builds it again: its recipe went with the memory
            reply = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                               json={"model": other_name, "messages": messages, "max_tokens": 4}, timeout=60)
            assert reply.status_code == 404
