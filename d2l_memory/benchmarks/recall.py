"""Evidence recall@k of the memory store's search on LoCoMo and LongMemEval: which search finds the memories
that hold a question's answer.

Every conversation is cut into the memories `D2LMemory.absorb_messages` writes (`common.segments`, the
default segment budget, each segment headed by its session's date) and added to a real `MemoryStore`. A
memory is evidence for a question when it holds one of the question's evidence turns: LoCoMo's `evidence`
dialogue ids, LongMemEval's `has_answer` turns. recall@k is the share of a question's evidence memories
among the k best hits, averaged over questions; "hit@k" counts questions with at least one in the top k.

Scopes: a LoCoMo user is one conversation (all of its sessions); LongMemEval's oracle set gives each
question only its own evidence sessions, so its questions are dealt, in a seeded order, into users of
`GROUP` questions: a user holds those questions' sessions, and each question is searched among them all.

Searches compared in one run, on the same stores: `whole` (each memory scored by its whole text: the
search before schema version 2), `parts` (by its best sentence), `fused` (parts, fused with full-text
BM25 by reciprocal rank fusion: what `D2LMemory` uses when it keeps text). Retrieval reads no adapter, so
every memory carries the same small real adapter.

Run: `python -m d2l_memory.benchmarks.recall [--quick]`.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from d2l_memory.benchmarks import locomo, longmemeval
from d2l_memory.benchmarks.common import (
    bench_args,
    environment,
    percentile,
    pyplot,
    report,
    save_figure,
    segments,
    table,
)
from d2l_memory.lora import LoRA
from d2l_memory.memory import MemoryConfig
from d2l_memory.models import load_model
from d2l_memory.store import MemoryInput, MemoryStore

KS = (1, 4, 8)
SEARCHES = {"whole": {"parts": False, "hybrid": False}, "parts": {"parts": True, "hybrid": False},
            "fused": {"parts": True, "hybrid": True}}
GROUP = 10  # LongMemEval questions per user


def _adapter() -> LoRA:
    gen = torch.Generator().manual_seed(0)
    return LoRA({"model.layers.0.mlp.down_proj": (torch.randn(1, 8, generator=gen), torch.randn(8, 1, generator=gen))},
                base_model="bench", hypernet="bench")


def locomo_cases(tokenizer: Any, budget: int, conversations: int | None) -> tuple[dict[str, list[str]], list[dict]]:
    """Memories per user (one LoCoMo conversation each) and the questions with their evidence memories."""
    users: dict[str, list[str]] = {}
    cases = []
    for sample in locomo.load()[:conversations]:
        user = sample["sample_id"]
        memories = segments(locomo.sessions_of(sample), tokenizer, budget)
        users[user] = memories
        lines = {t["dia_id"]: f"{t['speaker']}: {t['text']}" for k, v in sample["conversation"].items()
                 if k.startswith("session_") and isinstance(v, list) for t in v}
        for qa in sample["qa"]:
            if qa["category"] == 5 or not qa.get("evidence"):
                continue  # adversarial questions have no answer to find
            want = {i for i, m in enumerate(memories) for d in qa["evidence"] if d in lines and lines[d] in m}
            if want:
                cases.append({"user": user, "question": qa["question"], "evidence": want,
                              "type": locomo.CATEGORIES.get(qa["category"], str(qa["category"]))})
    return users, cases


def longmemeval_cases(tokenizer: Any, budget: int, questions: int) -> tuple[dict[str, list[str]], list[dict]]:
    """Memories per user (the sessions of `GROUP` questions) and the questions with their evidence memories."""
    items = [i for i in longmemeval.load() if any(t.get("has_answer") for s in i["haystack_sessions"] for t in s)]
    random.Random(0).shuffle(items)
    items = items[:questions]
    users: dict[str, list[str]] = {}
    cases = []
    for g in range(0, len(items), GROUP):
        user, group = f"lme{g // GROUP}", items[g : g + GROUP]
        memories: list[str] = []
        owners: list[str] = []
        for item in group:
            part = segments(longmemeval.sessions_of(item), tokenizer, budget)
            memories += part
            owners += [item["question_id"]] * len(part)
        users[user] = memories
        for item in group:
            answers = [f"{t['role'].capitalize()}: {t['content'].strip()}" for s in item["haystack_sessions"]
                       for t in s if t.get("has_answer") and t["content"].strip()]
            want = {i for i, m in enumerate(memories) if owners[i] == item["question_id"]
                    and any(a in m or m.split("\n", 1)[-1] in a for a in answers)}
            if want:
                cases.append({"user": user, "question": item["question"], "evidence": want,
                              "type": item["question_type"]})
    return users, cases


def evaluate(users: dict[str, list[str]], cases: Sequence[dict], root: Path) -> dict[str, Any]:
    """Fill one store with every user's memories, then run each search over every question."""
    adapter = _adapter()
    store = MemoryStore(root)
    ids: dict[str, dict[str, int]] = {}
    start = time.perf_counter()
    for user, memories in users.items():
        added = store.add_many([MemoryInput(user_id=user, adapter=adapter, text=m, kind="chat") for m in memories])
        ids[user] = {m.id: i for i, m in enumerate(added)}
    fill_s = time.perf_counter() - start
    out: dict[str, Any] = {"memories": sum(map(len, users.values())), "questions": len(cases), "fill_s": fill_s}
    for name, how in SEARCHES.items():
        rows, latency = [], []
        for case in cases:
            t0 = time.perf_counter()
            hits = store.search(case["question"], case["user"], k=max(KS), **how)
            latency.append(time.perf_counter() - t0)
            ranked = [ids[case["user"]][h.id] for h in hits]
            rows.append({"type": case["type"],
                         **{f"recall@{k}": len(case["evidence"] & set(ranked[:k])) / len(case["evidence"]) for k in KS},
                         **{f"hit@{k}": float(bool(case["evidence"] & set(ranked[:k]))) for k in KS}})
        out[name] = {"all": _mean(rows), "by_type": {t: _mean([r for r in rows if r["type"] == t])
                                                      for t in sorted({r["type"] for r in rows})},
                     "p50_ms": 1e3 * percentile(latency, 50), "p95_ms": 1e3 * percentile(latency, 95)}
    store.close()
    return out


def _mean(rows: Sequence[dict]) -> dict[str, float]:
    keys = [k for k in rows[0] if k != "type"] if rows else []
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys} | {"n": len(rows)}


def run(quick: bool) -> dict[str, Any]:
    tokenizer = load_model(MemoryConfig().base_model).tokenizer
    budget = MemoryConfig().segment_tokens
    result: dict[str, Any] = {"benchmark": "recall", "environment": environment(), "segment_tokens": budget}
    with tempfile.TemporaryDirectory() as tmp:
        users, cases = locomo_cases(tokenizer, budget, 2 if quick else None)
        result["locomo"] = evaluate(users, cases, Path(tmp) / "locomo")
        users, cases = longmemeval_cases(tokenizer, budget, 20 if quick else 60)
        result["longmemeval"] = evaluate(users, cases, Path(tmp) / "longmemeval")
    return result


def render(result: dict[str, Any]) -> str:
    headers = ["data set", "search", *(f"recall@{k}" for k in KS), *(f"hit@{k}" for k in KS), "search p50/p95 ms"]
    rows = []
    for data in ("locomo", "longmemeval"):
        r = result[data]
        for name in SEARCHES:
            a = r[name]["all"]
            rows.append([f"{data} ({r['questions']} q, {r['memories']} memories)", name,
                         *(f"{a[f'recall@{k}']:.3f}" for k in KS), *(f"{a[f'hit@{k}']:.3f}" for k in KS),
                         f"{r[name]['p50_ms']:.1f} / {r[name]['p95_ms']:.1f}"])
    by_type = []
    for data in ("locomo", "longmemeval"):
        for t, whole in result[data]["whole"]["by_type"].items():
            scores = (f"{result[data][n]['by_type'][t]['recall@4']:.3f}" for n in SEARCHES)
            by_type.append([data, t, whole["n"], *scores])
    return (f"{result['environment']}; segments of {result['segment_tokens']} tokens\n\n" + table(headers, rows)
            + "\n\nrecall@4 by question type\n\n" + table(["data set", "type", "n", *SEARCHES], by_type))


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for ax, data in zip(axes, ("locomo", "longmemeval"), strict=True):
        for name in SEARCHES:
            ax.plot(KS, [result[data][name]["all"][f"recall@{k}"] for k in KS], marker="o", label=name)
        ax.set(title=data, xlabel="k", xticks=KS)
    axes[0].set_ylabel("evidence recall@k")
    axes[0].legend()
    save_figure(fig, path)


def main() -> None:
    parser = bench_args(__doc__.splitlines()[0], "2 LoCoMo conversations and 20 LongMemEval questions")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.quick)
    report(result, args, render, plot)
    if args.out is None:
        print(json.dumps({d: {n: result[d][n]["all"] for n in SEARCHES} for d in ("locomo", "longmemeval")}))


if __name__ == "__main__":
    main()
