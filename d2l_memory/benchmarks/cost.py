"""Cost of memory in the weights against memory in the prompt and against per-document distillation.

    python -m d2l_memory.benchmarks.cost [--quick] [--out result.json] [--plot docs/img/bench-cost.png]

One process measures:
1. write cost: `D2LMemory.absorb` (internalize + store) against per-document context distillation
   (`d2l_memory.training.cd.context_distill`) of the same document, per document length;
2. memory held per user: the KV cache of the same text kept in context (bf16; measured at 1k tokens,
   the formula checked against it, computed beyond) against the adapter (bf16, rank `(chunks + 1) * 8`;
   measured where internalized, computed beyond) and the composed adapter actually served (rank <= 64);
3. first-token latency on the embedded (transformers) engine: the question with the adapter against
   the question with the text in the prompt;
4. with `--vllm` (on in the full size where vLLM is installed): `d2l_memory.benchmarks.engines` (throughput
   with N distinct user adapters, composition and load times, vLLM first-token latency), reused as is;
5. with `--store`: `d2l_memory.benchmarks.store` at 1k/10k memories (the 100k size is run and reported on
   its own; see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from d2l_memory.benchmarks.common import (
    bench_args,
    environment,
    memory_in_tempdir,
    pyplot,
    report,
    save_figure,
    smoke_probes,
    table,
)
from d2l_memory.benchmarks.internalize import document
from d2l_memory.engines.base import GenerationParams
from d2l_memory.prompts import QA_TEMPLATE
from d2l_memory.training.cd import context_distill

QUESTION = "What is the main point of the text?"


class Size(BaseModel):
    """What one run measures."""

    write_tokens: tuple[int, ...]  # documents absorbed and distilled
    cd_steps: int
    cd_probes: int | None = None  # None: cd.py's probes; n: n generic probes (quick smoke test only)
    kv_tokens: tuple[int, ...] = (1024, 8192, 32768)
    ttft_tokens: tuple[int, ...]
    repeats: int
    vllm: bool
    store: bool = False


QUICK = Size(write_tokens=(256,), cd_steps=2, cd_probes=2, ttft_tokens=(1024,), repeats=1, vllm=False)
FULL = Size(write_tokens=(256, 1024), cd_steps=20, ttft_tokens=(1024, 4096, 7680), repeats=1, vllm=True)


def _first_token_s(engine: Any, messages: list[dict[str, str]], adapter: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        stream = engine.stream(messages, adapter, GenerationParams(max_new_tokens=2))
        next(iter(stream), None)
        times.append(time.perf_counter() - start)
        stream.close()
    return statistics.median(times)


def run(size: Size) -> dict[str, Any]:
    """All measurements of `size`; returns them as one dict."""
    result: dict[str, Any] = {"benchmark": "cost", "environment": environment(), "size": size.model_dump()}
    with memory_in_tempdir() as mem:
        base, d2l = mem.d2l.base, mem.d2l
        cfg = d2l.config
        # 1. write cost
        writes = []
        for n in size.write_tokens:
            text = document(base.tokenizer, n)
            start = time.perf_counter()
            record = mem.absorb(text, "cost", "document")
            absorb_s = time.perf_counter() - start
            start = time.perf_counter()
            context_distill(d2l, text, steps=size.cd_steps, **smoke_probes(size.cd_probes))
            cd_s = time.perf_counter() - start
            writes.append({"tokens": n, "absorb_s": absorb_s, "cd_s": cd_s, "rank": record.rank})
        result["writes"] = writes

        # 2. bytes: KV cache per token, measured at the first length; adapters by their rank
        model_cfg = base.model.config
        head_dim = getattr(model_cfg, "head_dim", None) or model_cfg.hidden_size // model_cfg.num_attention_heads
        kv_per_token = model_cfg.num_hidden_layers * 2 * model_cfg.num_key_value_heads * head_dim * 2  # bf16
        probe = min(size.kv_tokens)
        ids = base.tokenizer(document(base.tokenizer, probe), add_special_tokens=False)["input_ids"][:probe]
        with base.lock, torch.inference_mode():
            cache = base.model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1).past_key_values
        measured = sum(t.numel() * 2 for layer in cache.layers for t in (layer.keys, layer.values))  # as bf16
        per_rank = sum(a.shape[1] + b.shape[0] for a, b in
                       d2l.internalize(document(base.tokenizer, 64)).weights.values()) * 2  # bf16 bytes
        rows = []
        for n in size.kv_tokens:
            rank = math.ceil(n / cfg.chunk_tokens) * cfg.chunk_rank + cfg.rank
            rows.append({"tokens": n, "kv_bytes": kv_per_token * n, "adapter_rank": rank,
                         "adapter_bytes": per_rank * rank,
                         "served_rank": min(rank, mem.config.rank_budget),
                         "served_bytes": per_rank * min(rank, mem.config.rank_budget)})
        result["bytes"] = {"kv_per_token": kv_per_token, "kv_measured_tokens": probe, "kv_measured_bytes": measured,
                           "adapter_bytes_per_rank": per_rank, "rows": rows}
        for w in writes:  # the formula against the adapters actually written
            w["adapter_bytes"] = per_rank * w["rank"]

        # 3. first token, embedded engine
        adapter = d2l.internalize(document(base.tokenizer, 1024))
        question = [{"role": "user", "content": QUESTION}]
        ttft = {"adapter": _first_token_s(mem.engine, question, adapter, max(3, size.repeats))}
        for n in size.ttft_tokens:
            text = document(base.tokenizer, n)
            messages = [{"role": "user", "content": QA_TEMPLATE.format(context=text, question=QUESTION)}]
            ttft[f"context_{n}"] = _first_token_s(mem.engine, messages, None, size.repeats)
        result["first_token_s"] = ttft

    # 4. vLLM serving, reusing the engine benchmark (its own process-wide engine, after ours is closed)
    if size.vllm and importlib.util.find_spec("vllm") is not None:
        from d2l_memory.benchmarks.engines import run_engine_bench

        result["vllm"] = run_engine_bench(quick=True)
    # 5. store
    if size.store:
        from d2l_memory.benchmarks.store import run_store_bench

        result["store"] = run_store_bench(quick=True)
    return result


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def render(result: dict[str, Any]) -> str:
    """The Markdown tables of a result."""
    size = result["size"]
    how = f"{size['cd_steps']} steps" + (f", {size['cd_probes']} probes: smoke test" if size.get("cd_probes") else "")
    writes = table(["document tokens", "absorb s (ours)", f"context distillation s ({how})", "CD / absorb",
                    "adapter rank", "adapter MiB (bf16)"],
                   [[w["tokens"], f"{w['absorb_s']:.2f}", f"{w['cd_s']:.1f}", f"{w['cd_s'] / w['absorb_s']:.0f}x",
                     w["rank"], _mib(w["adapter_bytes"])] for w in result["writes"]])
    b = result["bytes"]
    sizes = table(["memory tokens", "KV cache MiB (bf16, in context)", "adapter rank", "adapter MiB (bf16, stored)",
                   "served rank", "served adapter MiB", "KV / served adapter"],
                  [[f"{r['tokens']:,}", _mib(r["kv_bytes"]), r["adapter_rank"], _mib(r["adapter_bytes"]),
                    r["served_rank"], _mib(r["served_bytes"]), f"{r['kv_bytes'] / r['served_bytes']:.1f}x"]
                   for r in b["rows"]])
    note = (f"KV cache: {b['kv_per_token']:,} bytes per token (formula), {b['kv_measured_bytes']:,} bytes measured "
            f"for {b['kv_measured_tokens']:,} tokens; adapter: {b['adapter_bytes_per_rank']:,} bytes per rank slot.")
    t = result["first_token_s"]
    first = table(["memory served as", "first token s (transformers, CPU)", "vs adapter"],
                  [["adapter, question only", f"{t['adapter']:.2f}", "1x"],
                   *[[f"text in the prompt, {k.split('_')[1]} tokens", f"{v:.2f}", f"{v / t['adapter']:.0f}x"]
                     for k, v in t.items() if k != "adapter"]])
    out = f"{result['environment']}\n\n{writes}\n\n{sizes}\n\n{note}\n\n{first}"
    if "vllm" in result:
        v = result["vllm"]
        out += "\n\n" + table(["concurrent users", "base tok/s", "distinct adapters tok/s", "ratio"],
                              [[n, f"{r['base']:.1f}", f"{r['adapters']:.1f}", f"{r['ratio']:.2f}"]
                               for n, r in v["throughput_tok_s"].items()])
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Bytes per memory (KV vs adapters) and first-token latency, side by side."""
    plt = pyplot()
    rows = result["bytes"]["rows"]
    tokens = [r["tokens"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(tokens, [r["kv_bytes"] / 2**20 for r in rows], "s--", label="KV cache (text in context)")
    ax1.plot(tokens, [r["adapter_bytes"] / 2**20 for r in rows], "o-", label="adapter, stored")
    ax1.plot(tokens, [r["served_bytes"] / 2**20 for r in rows], "^-", label="adapter, served (rank <= 64)")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("memory tokens")
    ax1.set_ylabel("MiB per user (bf16)")
    ax1.legend(fontsize=8)
    ax1.set_title("memory held per user")
    t = result["first_token_s"]
    labels = ["adapter"] + [f"{k.split('_')[1]} tok\nin prompt" for k in t if k != "adapter"]
    ax2.bar(labels, list(t.values()), color=["#2a6fdb"] + ["#999999"] * (len(t) - 1))
    ax2.set_yscale("log")
    ax2.set_ylabel("first token, s (CPU)")
    ax2.set_title("time to first token")
    save_figure(fig, path)


def main() -> None:
    parser = bench_args(__doc__.splitlines()[0], "one 256-token document, 1k-token prompt, no vLLM")
    parser.add_argument("--vllm", action=argparse.BooleanOptionalAction, default=None,
                        help="run the vLLM serving benchmark too (default: on for the full size)")
    parser.add_argument("--store", action="store_true", help="run the store benchmark (1k/10k memories) too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = QUICK if args.quick else FULL
    size = size.model_copy(update={"store": args.store, **({} if args.vllm is None else {"vllm": args.vllm})})
    result = run(size)
    report(result, args, render, plot)


if __name__ == "__main__":
    main()
