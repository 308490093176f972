"""A vLLM LoRA resolver that serves d2l-memory adapter names on first use.

When a request names a model the server has not loaded, vLLM (with `VLLM_ALLOW_RUNTIME_LORA_UPDATING`)
asks its registered resolvers. This one answers names of `ComposedCache` entries (`d2l-<hex>`):

1. the name must pass `check_name` (`[a-z0-9-]` only: `../x`, `a/b` and the like are refused);
2. with the memory store (`D2L_MEMORY_STORE_URI`), an entry is served only while every one of its
   members is still stored (one `id IN (...)` query, `ComposedCache.get_or_compose`): an entry whose
   memory was forgotten is erased and not served, even if the forget's own erase never ran. An entry whose
   weights were evicted, or whose files no longer match their sha256, is composed again from its recipe,
   so server replicas sharing the cache root and the store serve the same names;
3. a name this server's cache has no recipe for is looked up in the store's `recipes` table (where
   `D2LMemory` records each adapter it composes for a server engine): a replica with a cache of its own
   builds any adapter by name from the store alone, so replicas share no filesystem;
4. without the store, an intact cached entry is served from its PEFT directory as it is (`forget` erases
   entries from the cache, and `sweep` whatever a killed forget left).

With the store, the server started as `python -m d2l_memory.engines.resolver_plugin` also sweeps its
cache every `D2L_MEMORY_SWEEP_S` seconds (default `SWEEP_S`; 0: never): an entry with a member that
another process forgot is erased and unloaded from this server, so a forget reaches every replica within
that time even when the forgetting process does not know the replica.

Configuration, read in the server process: `D2L_MEMORY_COMPOSED_DIR` (cache root; by default the store's
own, `compose.cache_root_for`, which `D2LMemory` writes to, else `$D2L_MEMORY_HOME/composed`) and
`D2L_MEMORY_STORE_URI` (the store; without it only cached entries resolve).

vLLM loads `register` through the `vllm.general_plugins` entry point. `python -m
d2l_memory.engines.resolver_plugin <vllm serve arguments>` registers it and starts vLLM's OpenAI
server without the entry point being installed (what `VLLMServer` runs).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Protocol

from pydantic import SecretStr
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from d2l_memory.compose import AdapterSource, Composed, ComposedCache, Recipe, cache_root_for, check_name
from d2l_memory.engines.vllm_server import unload_adapters
from d2l_memory.errors import MemoryNotFoundError

log = logging.getLogger(__name__)

RESOLVER_NAME = "d2l-memory"
PREFIX = "d2l-"
SWEEP_S = 2.0


class RecipeBook(Protocol):
    """Where recipes recorded by name come from (`store.MemoryStore` is one)."""

    def get_recipe(self, name: str) -> str | None: ...


def cache_from_env() -> ComposedCache:
    """The composed-adapter cache named by `D2L_MEMORY_COMPOSED_DIR`; by default the one `D2LMemory` uses
    for the store at `D2L_MEMORY_STORE_URI`, else `home()/composed`."""
    root = os.environ.get("D2L_MEMORY_COMPOSED_DIR")
    store = os.environ.get("D2L_MEMORY_STORE_URI")
    return ComposedCache(root or (cache_root_for(store) if store else None))


@functools.cache
def store_from_env() -> AdapterSource | None:
    """The memory store at `D2L_MEMORY_STORE_URI`, opened once per process; None when unset."""
    uri = os.environ.get("D2L_MEMORY_STORE_URI")
    if not uri:
        return None
    from d2l_memory.store import MemoryStore  # only servers that rebuild adapters need the store

    return MemoryStore(uri)


class D2LResolver(LoRAResolver):
    """Resolves `d2l-` names to PEFT directories in a `ComposedCache`, recomposing evicted ones.

    Args:
        cache: the cache to serve from (default: `cache_from_env()`).
        source: the store to rebuild evicted entries from (default: `store_from_env()`, opened lazily).
        recipes: where to look up a name the cache has no recipe for (default: the store).
    """

    def __init__(self, cache: ComposedCache | None = None, source: AdapterSource | None = None,
                 recipes: RecipeBook | None = None) -> None:
        self.cache = cache or cache_from_env()
        self._source = source
        self._recipes = recipes

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        try:
            check_name(lora_name)
        except ValueError:
            log.warning("refused LoRA name %r: not a d2l-memory adapter name", lora_name)
            return None
        if not lora_name.startswith(PREFIX):
            return None
        # Composing reads the store and runs SVDs: keep it off the server's event loop.
        entry = await asyncio.to_thread(self._entry, lora_name)
        if entry is None:
            return None
        if entry.recipe is not None and not _same_model(base_model_name, entry.recipe.base_model):
            log.warning("adapter %s was composed for %s, not for the served %s", lora_name,
                        entry.recipe.base_model, base_model_name)
            return None
        # vLLM assigns its own integer id after resolution; 1 only satisfies LoRARequest's check.
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(entry.path))

    def _entry(self, name: str) -> Composed | None:
        source = self._source or store_from_env()
        recipe = self.cache.recipe(name) or self._recorded(name)
        if recipe is None or source is None:  # an exported adapter, or no store to check members against
            return self.cache.get(name)
        try:
            return self.cache.get_or_compose(recipe, source)
        except MemoryNotFoundError as exc:
            log.warning("refused LoRA %s: %s", name, exc)
            return None


    def _recorded(self, name: str) -> Recipe | None:
        book = self._recipes or store_from_env()
        text = book.get_recipe(name) if book is not None else None
        return Recipe.model_validate_json(text) if text else None

    def sweep_forever(self, url: str, interval_s: float, api_key: SecretStr | None = None) -> None:
        """Every `interval_s`, erase the cache's entries with a forgotten member and unload them from the
        server at `url` (this one); runs until the process ends."""
        source = self._source or store_from_env()
        if source is None:
            return
        self.cache.on_erase(lambda names: unload_adapters(url, names, api_key))
        while True:
            time.sleep(interval_s)
            try:
                self.cache.sweep(source)
            except Exception as exc:  # a store briefly unreachable: the next sweep tries again
                log.warning("sweeping %s failed: %s", self.cache.root, exc)


def _same_model(served: str, base_model: str) -> bool:
    # vLLM passes the served model's path; registry models live in a directory named after them.
    return served == base_model or Path(served).name == base_model


def register() -> D2LResolver:
    """Register the resolver with vLLM (idempotent: vLLM calls plugins once in every process)."""
    if RESOLVER_NAME not in LoRAResolverRegistry.get_supported_resolvers():
        LoRAResolverRegistry.register_resolver(RESOLVER_NAME, D2LResolver())
    return LoRAResolverRegistry.get_resolver(RESOLVER_NAME)


def _option(args: list[str], name: str, default: str) -> str:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


if __name__ == "__main__":
    resolver = register()
    interval = float(os.environ.get("D2L_MEMORY_SWEEP_S", SWEEP_S))
    if interval > 0 and os.environ.get("D2L_MEMORY_STORE_URI"):
        own = f"http://{_option(sys.argv, '--host', '127.0.0.1')}:{_option(sys.argv, '--port', '8000')}"
        key = os.environ.get("VLLM_API_KEY")
        threading.Thread(target=resolver.sweep_forever, args=(own, interval, SecretStr(key) if key else None),
                         name="d2l-sweep", daemon=True).start()
    from vllm.entrypoints.launchers.api_server.entry import main

    main()
