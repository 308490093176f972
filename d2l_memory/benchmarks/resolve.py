"""What a replica pays for an adapter it has never seen: built from the store by name, against one already in
its cache and one already loaded, in one run on one vLLM server.

Run: `python -m d2l_memory.benchmarks.resolve [--adapters 8] [--members 4]` (starts its own server and
store in a temporary directory; `--quick`: 2 adapters of 2 members). Each adapter is a recipe of
`--members` stored memories (rank-8 `down_proj` adapters, as the shipped hypernetwork makes), recorded in
the store as `D2LMemory` records it. Timed per adapter, as the time to a 1-token answer naming it:

- `from the store`: the replica's cache has no entry, so the resolver reads the recipe from the store,
  fetches the member adapters, composes them into its cache, and vLLM loads the result;
- `from the cache`: the entry is in the replica's cache (unloaded from vLLM first), so only vLLM's load;
- `loaded`: the adapter is already loaded in vLLM (the steady state).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from d2l_memory.benchmarks.common import environment, percentile, save_json, table
from d2l_memory.compose import ComposedCache, Recipe
from d2l_memory.engines.vllm_server import ServerConfig, VLLMServer, auth_headers, unload_adapters
from d2l_memory.lora import LoRA
from d2l_memory.models import DEFAULT_MODEL
from d2l_memory.store import MemoryStore

CASES = ("from the store", "from the cache", "loaded")
VECTOR = [1.0] + [0.0] * 383


def member(seed: int, layers: int = 30) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    return LoRA({f"model.layers.{i}.mlp.down_proj": (torch.randn(8, 1536, generator=g) * 0.03,
                                                      torch.randn(576, 8, generator=g) * 0.03)
                 for i in range(layers)}, base_model=DEFAULT_MODEL)


def _ask(server: VLLMServer, name: str) -> float:
    start = time.perf_counter()  # the server's key is $D2L_MEMORY_API_KEY, when the environment sets one
    reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=300, headers=auth_headers(server.config.api_key),
                       json={"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
    reply.raise_for_status()
    return time.perf_counter() - start


def run(adapters: int, members: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as root:
        store = MemoryStore(Path(root) / "db")
        names = []
        for a in range(adapters):
            ids = [store.add("bench", member(a * members + m), vector=VECTOR).id for m in range(members)]
            recipe = Recipe(members=tuple((i, 1.0 / members) for i in ids), base_model=DEFAULT_MODEL)
            store.put_recipe(recipe.name, recipe.model_dump_json(), recipe.memory_ids)
            names.append(recipe.name)
        cache = ComposedCache(Path(root) / "replica")
        config = ServerConfig(lora_target_modules=("down_proj",), max_model_len=1024,
                              env={"D2L_MEMORY_STORE_URI": str(Path(root) / "db"), "D2L_MEMORY_SWEEP_S": "0"})
        times: dict[str, list[float]] = {case: [] for case in CASES}
        with VLLMServer(config, cache) as server:
            _ask(server, DEFAULT_MODEL)  # the first request warms the server up
            for name in names:
                times["from the store"].append(_ask(server, name))
                times["loaded"].append(_ask(server, name))
                unload_adapters(server.url, [name], server.config.api_key)
                times["from the cache"].append(_ask(server, name))
        ms = {case: {"p50": 1e3 * percentile(t, 50), "p95": 1e3 * percentile(t, 95)} for case, t in times.items()}
    return {"benchmark": "resolve", "environment": environment(), "adapters": adapters, "members": members,
            "member_bytes": len(member(0).to_bytes()), "ms": ms}


def render(result: dict[str, Any]) -> str:
    ms = result["ms"]
    rows = [[case, f"{ms[case]['p50']:.0f} / {ms[case]['p95']:.0f}",
             f"{ms[case]['p50'] / ms['loaded']['p50']:.1f}x"] for case in CASES]
    return (f"{result['environment']}; {result['adapters']} adapters of {result['members']} members "
            f"({result['member_bytes']:,} bytes each), time to a 1-token answer\n\n"
            + table(["adapter", "p50 / p95 ms", "/ loaded (p50)"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="2 adapters of 2 members")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args()
    result = run(2, 2) if args.quick else run(args.adapters, args.members)
    print(render(result))
    save_json(args.out, result)


if __name__ == "__main__":
    main()
