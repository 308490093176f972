"""Benchmark of the memory store: add, filtered search and adapter reads at 1k / 10k / 100k memories.

Run: `python -m d2l_memory.benchmarks.store [--quick]` (quick: 1k and 10k only). Every memory holds the same
adapter, sized like a real one: rank 8 on the 30 `down_proj` modules (576 x 1536) of SmolLM2-135M in
bf16, 1,013,760 bytes of tensors. Vectors are random unit vectors. "many users" gives each user 100
memories; each search is pre-filtered to one user picked at random. The table is filled in batches
(one commit each), then single adds and searches are timed; recall@5 compares the store's results with
an exact numpy search over the same user's vectors. After `optimize()` as many single adds again, and a
second `optimize()`: the periodic one's cost.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d2l_memory.benchmarks.common import environment
from d2l_memory.lora import LoRA
from d2l_memory.store.schema import MemoryInput
from d2l_memory.store.store import MemoryStore

FILL_BATCH = 250


def bench_adapter(rank: int = 8, layers: int = 30, d_out: int = 576, d_in: int = 1536) -> LoRA:
    """A random bf16 LoRA on `layers` down_proj modules (default: about 1 MB, like a real rank-8 one)."""
    gen = torch.Generator().manual_seed(0)
    weights = {f"model.layers.{i}.mlp.down_proj": (torch.randn(rank, d_in, generator=gen).to(torch.bfloat16),
                                                   torch.randn(d_out, rank, generator=gen).to(torch.bfloat16))
               for i in range(layers)}
    return LoRA(weights, base_model="bench", hypernet="bench")


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 384)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _disk(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _ms(samples: list[float], q: float) -> float:
    return round(float(np.percentile(samples, q)) * 1e3, 2)


def _bench_one(root: Path, n: int, n_users: int, lora: LoRA, *, n_adds: int, n_searches: int,
               seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    vectors = _unit(rng, n)
    users = np.arange(n) % n_users
    store = MemoryStore(root / "store")
    ids: list[str] = []
    t0 = time.perf_counter()
    for start in range(0, n, FILL_BATCH):
        stop = min(n, start + FILL_BATCH)
        batch = [MemoryInput(user_id=f"user{users[i]}", adapter=lora, vector=vectors[i])
                 for i in range(start, stop)]
        ids += [m.id for m in store.add_many(batch)]
    fill_s = time.perf_counter() - t0

    add_lat = []
    for i in range(n_adds):  # single adds on top of the full table, each its own commit
        v = _unit(rng, 1)[0]
        t = time.perf_counter()
        ids.append(store.add(f"user{i % n_users}", lora, vector=v).id)
        add_lat.append(time.perf_counter() - t)
        vectors = np.vstack([vectors, v[None]])
        users = np.append(users, i % n_users)

    def searches() -> tuple[list[float], float]:
        lat, hits = [], 0
        queries = _unit(np.random.default_rng(seed + 1), n_searches)
        for q in queries:
            user = int(rng.integers(n_users))
            t = time.perf_counter()
            got = store.search(q, f"user{user}", k=5)
            lat.append(time.perf_counter() - t)
            mine = np.flatnonzero(users == user)
            exact = mine[np.argsort(-(vectors[mine] @ q))[:5]]
            hits += len({ids[j] for j in exact} & {m.id for m in got})
        return lat, hits / (5 * n_searches)

    search_lat, recall = searches()
    get_lat = []
    for memory_id in ids[:: max(1, len(ids) // 20)]:
        t = time.perf_counter()
        store.get_adapter(memory_id, base_model="bench", hypernet="bench")
        get_lat.append(time.perf_counter() - t)
    versions = store.version_count()
    disk_before = _disk(root / "store")
    t = time.perf_counter()
    store.optimize(older_than=timedelta(0))
    optimize_s = time.perf_counter() - t
    disk_after = _disk(root / "store")
    search_opt_lat, recall_opt = searches()
    rows = store.count()
    # A periodic optimize after it: what the adds since the last one cost (the first one above folds the
    # whole fill in).
    for i in range(n_adds):
        store.add(f"user{i % n_users}", lora, vector=_unit(rng, 1)[0])
    t = time.perf_counter()
    store.optimize(older_than=timedelta(0))
    optimize_again_s = time.perf_counter() - t
    indexed = "parts" in store._index_columns(store._table)
    store.close()
    return {
        "memories": rows, "users": n_users, "indexed": indexed, "fill_rows_per_s": round(n / fill_s),
        "add_p50_ms": _ms(add_lat, 50), "add_p95_ms": _ms(add_lat, 95),
        "search_p50_ms": _ms(search_lat, 50), "search_p95_ms": _ms(search_lat, 95), "recall@5": recall,
        "search_opt_p50_ms": _ms(search_opt_lat, 50), "search_opt_p95_ms": _ms(search_opt_lat, 95),
        "recall@5_opt": recall_opt, "get_adapter_p50_ms": _ms(get_lat, 50),
        "versions_before_optimize": versions, "bytes_per_memory_before": disk_before // rows,
        "bytes_per_memory_after": disk_after // rows, "optimize_s": round(optimize_s, 2),
        "optimize_again_s": round(optimize_again_s, 2),
    }


def run_store_bench(quick: bool, *, n_adds: int = 50, n_searches: int = 200, rank: int = 8,
                    root: Path | None = None, sizes: list[int] | None = None,
                    settings: tuple[str, ...] = ("one", "many")) -> list[dict[str, Any]]:
    """Run the benchmark; one dict of measurements per (size, users) setting.

    Args:
        quick: 1k and 10k memories only (else also 100k, which needs about 100 GB of disk at ~1 MB
            per adapter).
        rank: adapter rank (8: about 1 MB per adapter).
        root: where the temporary stores go (a temp dir by default; each is deleted after use).
        sizes: the store sizes to run (overrides `quick`).
        settings: "one" (every memory is one user's) and/or "many" (100 memories per user).
    """
    lora = bench_adapter(rank)
    sizes = sizes or ([1_000, 10_000] if quick else [1_000, 10_000, 100_000])
    results = []
    for n in sizes:
        for n_users in [{"one": 1, "many": max(1, n // 100)}[s] for s in settings]:
            work = Path(tempfile.mkdtemp(prefix="d2l-store-bench-", dir=root))
            try:
                result = _bench_one(work, n, n_users, lora, n_adds=n_adds, n_searches=n_searches)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            result["adapter_bytes"] = len(lora.to_bytes())
            results.append(result)
            print(_row(result), flush=True)
    return results


_COLUMNS = ["memories", "users", "indexed", "fill_rows_per_s", "add_p50_ms", "add_p95_ms", "search_p50_ms",
            "search_p95_ms", "recall@5", "search_opt_p50_ms", "search_opt_p95_ms", "recall@5_opt",
            "get_adapter_p50_ms", "versions_before_optimize", "bytes_per_memory_before", "bytes_per_memory_after",
            "optimize_s", "optimize_again_s"]


def _row(result: dict[str, Any]) -> str:
    return " | ".join(str(result[c]) for c in _COLUMNS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1k and 10k memories only")
    parser.add_argument("--rank", type=int, default=8, help="adapter rank (8: about 1 MB per adapter)")
    parser.add_argument("--sizes", type=int, nargs="*", default=None, help="store sizes to run, e.g. 100000")
    parser.add_argument("--root", type=Path, default=None, help="where the temporary stores go")
    parser.add_argument("--users", nargs="*", choices=["one", "many"], default=["one", "many"],
                        help="one user holding every memory, and/or 100 memories per user")
    args = parser.parse_args()
    size = len(bench_adapter(args.rank).to_bytes())
    print(f"adapter: {size:,} bytes (rank {args.rank}, 30 x down_proj, bf16); {environment()}")
    print(" | ".join(_COLUMNS))
    print(" | ".join("---" for _ in _COLUMNS))
    run_store_bench(args.quick, rank=args.rank, sizes=args.sizes, root=args.root, settings=tuple(args.users))


if __name__ == "__main__":
    main()
