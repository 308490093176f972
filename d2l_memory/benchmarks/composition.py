"""Composition: recall when several memories' adapters are composed: summed, averaged or relevance-weighted.

    python -m d2l_memory.benchmarks.composition [--quick] [--rank-budget R] [--out result.json] [--plot PNG]

Each user absorbs `memories` synthetic fact documents about different people (the meta-training
generator, `training.data.fact_sample`, with a seed no training or evaluation run uses) and is asked
about the first. `D2LMemory.chat(mode="adapter")` answers with the recalled memories that pass the
relevance gate composed as their `sum` (weight 1 each), their `mean` (weight 1/k each) and weighted by
their recall scores (`relevance`: `compose.member_weights`), the three `MemoryConfig.composition`s side
by side in one run; the references are the same question for a user
holding only that one document (`alone`: no composition) and the base model (`none`). Accuracy: the
normalised gold answer appears in the answer. `--rank-budget` sets `MemoryConfig.rank_budget`: recalled
memories whose ranks sum above it are SVD-truncated to it (`compose.compose`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from d2l_memory.benchmarks.common import bench_args, environment, memory_in_tempdir, pyplot, report, save_figure, table
from d2l_memory.kinds import WEIGHTINGS
from d2l_memory.scoring import normalize
from d2l_memory.training.data import fact_sample

SEED = 31_337  # neither a training seed nor the evaluation's
SYSTEMS = (*WEIGHTINGS, "alone", "none")


class Size(BaseModel):
    """How much one run measures."""

    users: int
    memories: int  # fact documents per user, about as many people
    max_new_tokens: int = 24


QUICK = Size(users=3, memories=3, max_new_tokens=16)
FULL = Size(users=48, memories=4)


def run(size: Size, rank_budget: int | None = None) -> dict[str, Any]:
    """Absorb every user's documents, ask each user's question under every system, score (`rank_budget`
    None: `MemoryConfig`'s default)."""
    rng = random.Random(SEED)
    started = environment()
    correct = dict.fromkeys(SYSTEMS, 0)
    composed: list[int] = []
    with memory_in_tempdir(rank_budget=rank_budget) as mem:
        default = mem.config
        for u in range(size.users):
            docs = [fact_sample(rng) for _ in range(size.memories)]
            for doc in docs:
                mem.absorb(doc.context, f"user-{u}")
            mem.absorb(docs[0].context, f"alone-{u}")
            question, gold = docs[0].question, normalize(docs[0].answer)
            composed.append(len(mem.relevant(question, f"user-{u}")))
            for system in SYSTEMS:
                mem.config = default.model_copy(update={"composition": system}) if system in WEIGHTINGS else default
                user = f"alone-{u}" if system == "alone" else f"user-{u}"
                answer = mem.chat(question, user, "none" if system == "none" else "adapter", size.max_new_tokens)
                correct[system] += gold in normalize(answer)
            mem.config = default
    return {"benchmark": "composition", "environment": started, "size": size.model_dump(),
            "rank_budget": default.rank_budget,
            "accuracy": {s: correct[s] / size.users for s in SYSTEMS},
            "composed_per_question": sum(composed) / len(composed)}


def render(result: dict[str, Any]) -> str:
    """The Markdown table of a result."""
    acc = result["accuracy"]
    head = [f"{s} (n={result['size']['users']})" for s in SYSTEMS] + ["memories composed per question", "rank budget"]
    return f"{result['environment']}\n\n" + table(head, [[*(f"{acc[s]:.3f}" for s in SYSTEMS),
                                                           f"{result['composed_per_question']:.2f}",
                                                           str(result["rank_budget"])]])


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy per system."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    colors = ["#999999", "#2a6fdb", "#1b4a9a", "#7fa7e8", "#cccccc"]
    ax.bar(SYSTEMS, [result["accuracy"][s] for s in SYSTEMS], color=colors)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (adapter mode)")
    ax.set_title(f"{result['size']['memories']} fact memories per user, "
                 f"{result['composed_per_question']:.2f} composed per question")
    save_figure(fig, path)


def main() -> None:
    parser = bench_args(__doc__.splitlines()[0], f"{QUICK.users} users of {QUICK.memories} memories")
    parser.add_argument("--rank-budget", type=int, default=None,
                        help="largest rank of a composed adapter (default: MemoryConfig's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report(run(QUICK if args.quick else FULL, args.rank_budget), args, render, plot)


if __name__ == "__main__":
    main()
