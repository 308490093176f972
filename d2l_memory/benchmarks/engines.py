"""Serving benchmark: what adapters cost and save against the base model and against memory in the prompt.

One offline vLLM engine measures, in one run:
1. decode throughput for 1, 4 and 16 concurrent users, each with a distinct composed adapter (two rank-8
   memories on every MLP down_proj, the hypernetwork's default target, concatenated to rank 16), against
   the same requests on the base model with no adapter;
2. the time to compose an adapter (exact concat, and SVD truncation when the ranks exceed the budget),
   write it to the cache, and load it into vLLM;
3. first-token latency of a question answered with an adapter against the same question with 1k, 4k
   and 8k tokens of memory text in the prompt.

Run it: `python -m d2l_memory.benchmarks.engines --quick`. Adapters are random (throughput and latency do not
depend on what they hold). Prefix caching is off on CPU (see `VLLMEngine`), so every in-context prompt
is prefilled in full, as it is for a memory set that changes from one query to the next.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch

from d2l_memory.compose import ComposedCache, Recipe
from d2l_memory.engines.base import render_chat
from d2l_memory.lora import LoRA
from d2l_memory.models import DEFAULT_MODEL
from d2l_memory.prompts import QA_TEMPLATE

QUESTION = [{"role": "user", "content": "What did Alice say her favourite city was?"}]
FILLER = ("Alice wrote in her notes that she spent the spring walking along the river, reading old letters, "
          "and keeping a list of the birds she saw each morning before work. ")


class _Memories:
    """An in-memory adapter source: random rank-8 down_proj adapters, one per memory id."""

    def __init__(self, base_model: str, layers: int = 30, d_model: int = 576, d_mlp: int = 1536) -> None:
        self.base_model, self.layers, self.d_model, self.d_mlp = base_model, layers, d_model, d_mlp

    def get_adapters(self, memory_ids: Sequence[str], *, base_model: str | None,
                     hypernet: str | None) -> dict[str, LoRA]:
        return {memory_id: self._adapter(memory_id) for memory_id in memory_ids}

    def existing(self, memory_ids: Sequence[str]) -> set[str]:
        return set(memory_ids)  # every id names an adapter here

    def _adapter(self, memory_id: str) -> LoRA:
        g = torch.Generator().manual_seed(int(memory_id, 16) % (2**31))
        return LoRA({f"model.layers.{i}.mlp.down_proj": (torch.randn(8, self.d_mlp, generator=g) * 0.02,
                                                          torch.randn(self.d_model, 8, generator=g) * 0.02)
                     for i in range(self.layers)}, base_model=self.base_model)


def _memory_prompt(tokenizer: Any, n_tokens: int) -> list[dict[str, str]]:
    ids = tokenizer(FILLER * (n_tokens // 20 + 1), add_special_tokens=False)["input_ids"][:n_tokens]
    memory = tokenizer.decode(ids)
    return [{"role": "user", "content": QA_TEMPLATE.format(context=memory, question=QUESTION[0]["content"])}]


def run_engine_bench(quick: bool = True, model: str = DEFAULT_MODEL, dtype: str = "float32",
                     lora_target_modules: tuple[str, ...] | None = ("down_proj",)) -> dict[str, Any]:
    """Run the benchmark, print its table, and return the numbers.

    Args:
        quick: 32 new tokens and one timed repeat per point (a few minutes on 2 CPU cores); else 128
            tokens and the median of three.
        model: the base model.
        dtype: vLLM weight dtype: float32 on CPUs without native bf16 (AVX2 only, like this machine's:
            bf16 measured 4-5x slower there), "bfloat16" on GPUs and AVX512-BF16/AMX CPUs.
        lora_target_modules: the modules vLLM wraps with LoRA (None: all); the adapters here adapt
            down_proj only.
    """
    from d2l_memory.engines.vllm_engine import VLLMEngine

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    new_tokens, repeats = (32, 1) if quick else (128, 3)
    users = (1, 4, 16)
    contexts = (1000, 4000, 8000)
    results: dict[str, Any] = {"new_tokens": new_tokens, "repeats": repeats, "dtype": dtype,
                               "lora_target_modules": lora_target_modules}

    root = tempfile.mkdtemp(prefix="d2l-bench-")
    try:
        cache = ComposedCache(root)
        t0 = time.perf_counter()
        engine = VLLMEngine(model, dtype=dtype, max_lora_rank=16, max_loras=max(users), max_cpu_loras=64,
                            max_model_len=8192, lora_target_modules=lora_target_modules, cache=cache)
        results["engine_start_s"] = time.perf_counter() - t0
        try:
            results |= _measure(engine, cache, model, new_tokens, repeats, users, contexts)
        finally:
            engine.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    _print(results, users, contexts)
    return results


def _measure(engine: Any, cache: ComposedCache, model: str, new_tokens: int, repeats: int,
             users: tuple[int, ...], contexts: tuple[int, ...]) -> dict[str, Any]:
    from vllm import SamplingParams

    memories = _Memories(model)
    results: dict[str, Any] = {}

    def timed(call: Any) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    # 2. compose + write + load (before throughput, so these adapters are cold)
    compose_ms, truncate_ms, load_ms = [], [], []
    for i in range(3):
        ids = (f"{1000 + 2 * i:032x}", f"{1001 + 2 * i:032x}")
        start = time.perf_counter()
        composed = cache.get_or_compose(Recipe(members=tuple((m, 1.0) for m in ids), base_model=model), memories)
        compose_ms.append(1e3 * (time.perf_counter() - start))
        start = time.perf_counter()
        engine.llm.llm_engine.add_lora(engine.lora_request(composed))
        load_ms.append(1e3 * (time.perf_counter() - start))
        four = tuple((f"{2000 + 4 * i + j:032x}", 1.0) for j in range(4))  # rank 32 > budget 16: SVD
        start = time.perf_counter()
        cache.get_or_compose(Recipe(members=four, base_model=model, rank_budget=16), memories)
        truncate_ms.append(1e3 * (time.perf_counter() - start))
    results["compose_concat_ms"] = statistics.median(compose_ms)
    results["compose_svd_ms"] = statistics.median(truncate_ms)
    results["vllm_load_ms"] = statistics.median(load_ms)

    # 1. throughput, distinct adapters vs base, steady state (adapters loaded by a warm-up pass)
    tokenizer = engine.tokenizer
    prompt = {"prompt_token_ids": render_chat(tokenizer, QUESTION)}
    fixed = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    adapters = [engine.lora_request(cache.get_or_compose(
        Recipe(members=((f"{10 * u:032x}", 1.0), (f"{10 * u + 1:032x}", 1.0)), base_model=model), memories))
        for u in range(max(users))]
    throughput: dict[int, dict[str, float]] = {}
    for n in users:
        row = {}
        for label, loras in (("base", None), ("adapters", adapters[:n])):
            def call(loras: Any = loras, n: int = n) -> None:
                engine.llm.generate([prompt] * n, fixed, lora_request=loras, use_tqdm=False)
            call()  # warm-up: loads the adapters, sizes the batch
            row[label] = n * new_tokens / timed(call)
        row["ratio"] = row["adapters"] / row["base"]
        throughput[n] = row
    results["throughput_tok_s"] = throughput

    # 3. first token: the question with an adapter vs the memory in the prompt
    first = SamplingParams(max_tokens=1, temperature=0.0)
    ttft: dict[str, float] = {}
    ttft["adapter"] = timed(lambda: engine.llm.generate([prompt], first, lora_request=adapters[0], use_tqdm=False))
    prompt_tokens = {"adapter": len(prompt["prompt_token_ids"])}
    for n in contexts:
        stuffed = {"prompt_token_ids": render_chat(tokenizer, _memory_prompt(tokenizer, n))}
        prompt_tokens[f"context_{n}"] = len(stuffed["prompt_token_ids"])
        ttft[f"context_{n}"] = timed(lambda s=stuffed: engine.llm.generate([s], first, use_tqdm=False))
    results["first_token_s"] = ttft
    results["prompt_tokens"] = prompt_tokens
    return results


def _print(r: dict[str, Any], users: tuple[int, ...], contexts: tuple[int, ...]) -> None:
    print(f"\nvLLM offline, {r['dtype']}, LoRA on {r['lora_target_modules'] or 'all linears'}, "
          f"{r['new_tokens']} new tokens, median of {r['repeats']}; engine start {r['engine_start_s']:.1f} s")
    print(f"{'users':>6} {'base tok/s':>11} {'adapters tok/s':>15} {'ratio':>6}")
    for n in users:
        row = r["throughput_tok_s"][n]
        print(f"{n:>6} {row['base']:>11.1f} {row['adapters']:>15.1f} {row['ratio']:>6.2f}")
    print(f"\ncompose 2 x rank 8 (concat) + write: {r['compose_concat_ms']:.0f} ms; "
          f"compose 4 x rank 8 -> 16 (SVD) + write: {r['compose_svd_ms']:.0f} ms; "
          f"load into vLLM: {r['vllm_load_ms']:.0f} ms")
    print(f"\n{'first token':<22} {'prompt tokens':>13} {'seconds':>8} {'vs adapter':>10}")
    base = r["first_token_s"]["adapter"]
    print(f"{'adapter, no memory text':<22} {r['prompt_tokens']['adapter']:>13} {base:>8.3f} {1.0:>10.1f}")
    for n in contexts:
        key = f"context_{n}"
        s = r["first_token_s"][key]
        print(f"{f'memory in prompt, {n // 1000}k':<22} {r['prompt_tokens'][key]:>13} {s:>8.3f} {s / base:>10.1f}")
    ratio = r["throughput_tok_s"][users[-1]]["ratio"]
    speedup = r["first_token_s"][f"context_{contexts[-1]}"] / base
    print(f"\ntargets: throughput with {users[-1]} distinct adapters >= 0.5x base: {ratio:.2f}x "
          f"({'met' if ratio >= 0.5 else 'missed'}); first token >= 5x faster than {contexts[-1] // 1000}k "
          f"in context: {speedup:.1f}x ({'met' if speedup >= 5 else 'missed'})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 tokens, one repeat")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--all-modules", action="store_true", help="let vLLM wrap every linear with LoRA")
    args = parser.parse_args()
    run_engine_bench(quick=args.quick, dtype=args.dtype,
                     lora_target_modules=None if args.all_modules else ("down_proj",))
