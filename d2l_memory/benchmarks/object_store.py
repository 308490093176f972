"""The memory store on a local disk against the same operations on S3-compatible object storage, in one run.

Run (docs/scaling.md has the server command): `python -m d2l_memory.benchmarks.object_store --uri
s3://bucket/prefix [--memories 200]`, with the endpoint and credentials in LanceDB's usual environment
variables (`AWS_ENDPOINT`, `AWS_REGION`, `AWS_ALLOW_HTTP`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`).
Both stores get the same memories: a ~1 MB adapter each (`benchmarks.store.bench_adapter`) and a random
unit vector, spread over 10 users. Timed one by one: opening the store, single adds, scoped searches,
adapter reads, purging forgets and one `optimize`; the table gives p50 / p95 and the S3 / local ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np

from d2l_memory.benchmarks.common import environment, percentile, save_json, table
from d2l_memory.benchmarks.store import bench_adapter
from d2l_memory.store import MemoryStore

USERS = 10
OPERATIONS = ("open", "add", "search", "get_adapter", "forget (purge)", "optimize")


def _timed(fn: Callable[[], Any], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def bench_location(uri: str, memories: int, searches: int = 50, forgets: int = 3, seed: int = 0) -> dict[str, Any]:
    """Seconds per call of each operation on a new store at `uri`."""
    rng = np.random.default_rng(seed)
    lora = bench_adapter()
    vectors = rng.standard_normal((memories, 384)).astype(np.float32)
    queries = rng.standard_normal((searches, 384)).astype(np.float32)
    stores: list[MemoryStore] = []
    ids: list[str] = []
    times = {"open": _timed(lambda: stores.append(MemoryStore(uri)), 1)}
    store = stores[0]
    times["add"] = _timed(lambda: ids.append(store.add(f"user{len(ids) % USERS}", lora, vector=vectors[len(ids)]).id),
                          memories)
    asked = iter(queries)
    times["search"] = _timed(lambda: store.search(next(asked), f"user{rng.integers(USERS)}", k=5), searches)
    times["get_adapter"] = _timed(lambda: store.get_adapter(ids[rng.integers(len(ids))], base_model=None,
                                                            hypernet=None), searches)
    times["forget (purge)"] = _timed(lambda: store.delete(ids.pop(), purge=True), forgets)
    times["optimize"] = _timed(lambda: store.optimize(older_than=timedelta(0)), 1)
    store.close()
    return times


def run(uri: str, memories: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as local:
        places = {"local disk": bench_location(f"{local}/store", memories),
                  "S3": bench_location(f"{uri.rstrip('/')}/{uuid.uuid4().hex[:8]}", memories)}
    ms = {place: {op: {"p50": 1e3 * percentile(t, 50), "p95": 1e3 * percentile(t, 95)} for op, t in times.items()}
          for place, times in places.items()}
    return {"benchmark": "object_store", "environment": environment(), "uri": uri, "memories": memories,
            "adapter_bytes": len(bench_adapter().to_bytes()), "ms": ms}


def render(result: dict[str, Any]) -> str:
    local, s3 = result["ms"]["local disk"], result["ms"]["S3"]
    rows = [[op, f"{local[op]['p50']:.1f} / {local[op]['p95']:.1f}", f"{s3[op]['p50']:.1f} / {s3[op]['p95']:.1f}",
             f"{s3[op]['p50'] / local[op]['p50']:.1f}x"] for op in OPERATIONS]
    return (f"{result['environment']}; {result['memories']} memories of {result['adapter_bytes']:,} adapter "
            f"bytes; S3 at {result['uri']}\n\n"
            + table(["operation", "local disk p50 / p95 ms", "S3 p50 / p95 ms", "S3 / local (p50)"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", required=True, help="s3://bucket/prefix (the bucket must exist)")
    parser.add_argument("--memories", type=int, default=200)
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args()
    result = run(args.uri, args.memories)
    print(render(result))
    save_json(args.out, result)


if __name__ == "__main__":
    main()
