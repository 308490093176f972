"""A vLLM LoRA resolver that serves d2l-memory adapter names on first use.

When a request names a model the server has not loaded, vLLM (with `VLLM_ALLOW_RUNTIME_LORA_UPDATING`)
asks its registered resolvers. This one answers names of `ComposedCache` entries (`d2l-<hex>`):

1. the name must pass `check_name` (`[a-z0-9-]` only: `../x`, `a/b` and the like are refused);
2. with the memory store (`D2L_MEMORY_STORE_URI`), an entry is served only while every one of its
   members is still stored (one `id IN (...)` query, `ComposedCache.get_or_compose`): an entry whose
   memory was forgotten is erased and not served, even if the forget's own erase never ran. An entry whose
   weights were evicted, or whose files no longer match their sha256, is composed again from its recipe,
   so server replicas sharing the cache root and the store serve the same names;
3. without the store, an intact cached entry is served from its PEFT directory as it is (`forget` erases
   entries from the cache, and `sweep` whatever a killed forget left).

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
from pathlib import Path

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from d2l_memory.compose import AdapterSource, Composed, ComposedCache, cache_root_for, check_name
from d2l_memory.errors import MemoryNotFoundError

log = logging.getLogger(__name__)

RESOLVER_NAME = "d2l-memory"
PREFIX = "d2l-"


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
    """

    def __init__(self, cache: ComposedCache | None = None, source: AdapterSource | None = None) -> None:
        self.cache = cache or cache_from_env()
        self._source = source

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
        recipe = self.cache.recipe(name)
        source = self._source or store_from_env()
        if recipe is None or source is None:  # an exported adapter, or no store to check members against
            return self.cache.get(name)
        try:
            return self.cache.get_or_compose(recipe, source)
        except MemoryNotFoundError as exc:
            log.warning("refused LoRA %s: %s", name, exc)
            return None


def _same_model(served: str, base_model: str) -> bool:
    # vLLM passes the served model's path; registry models live in a directory named after them.
    return served == base_model or Path(served).name == base_model


def register() -> None:
    """Register the resolver with vLLM (idempotent: vLLM calls plugins once in every process)."""
    if RESOLVER_NAME not in LoRAResolverRegistry.get_supported_resolvers():
        LoRAResolverRegistry.register_resolver(RESOLVER_NAME, D2LResolver())


if __name__ == "__main__":
    register()
    from vllm.entrypoints.launchers.api_server.entry import main

    main()
