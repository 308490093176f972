"""Relevance gate: how many questions about a memory pass it, and how many unrelated questions slip through.

`D2LMemory.chat` uses a recalled memory only when its MiniLM cosine similarity to the message is at least
`MemoryConfig.relevance_threshold`. This measures that trade-off per threshold, for a memory scored by its
whole text (the store before schema version 2) and by its best part (`MemoryStore.search` now: the nearest
of its whole text and its sentences, `store.part_vectors`), side by side. Memories are first-person chat
turns from the meta-training generator (`training.data.fact_sample`, a seed of its own) followed by an
assistant reply, as `absorb_messages` stores them. Each is asked about one of its facts twice: in the first
person ("Where do I live?") and paraphrased ("Which city am I based in?"). Unrelated questions are the general
control questions; one passes when any of a user's memories reaches the threshold, so it is counted against
users holding 1, 10 and 100 memories. Passing an unrelated question costs little (the composed adapter's
interference, docs/training.md); failing a related one loses the memory.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d2l_memory.benchmarks.common import bench_args, environment, pyplot, report, save_figure, table
from d2l_memory.embedder import Embedder
from d2l_memory.memory import MemoryConfig
from d2l_memory.store.store import part_vectors
from d2l_memory.training.data import ATTRIBUTES, control_questions, fact_sample

FIRST_PERSON = {"color": "What is my favorite color?", "city": "Where do I live?",
                "pet": "What kind of pet do I have?", "job": "What is my job?",
                "food": "What is my favorite food?", "sport": "Which sport do I play?",
                "instrument": "Which instrument do I play?", "code": "What is my secret code?",
                "age": "How old am I?"}
PARAPHRASED = {"color": "Which colour do I like best?", "city": "Which city am I based in?",
               "pet": "Do I have any animals at home?", "job": "What do I do for a living?",
               "food": "What dish do I love the most?", "sport": "What sport am I into?",
               "instrument": "What music do I make?", "code": "Remind me of my code.", "age": "What's my age?"}
THRESHOLDS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
USER_SIZES = (1, 10, 100)


def chats(n: int, seed: int = 2026) -> list[tuple[str, str]]:
    """`n` first-person chat memories and the attribute each one is asked about."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        sample = fact_sample(rng)
        if not sample.context.startswith("User:"):
            continue  # the third-person notes are not how users talk to an assistant
        name = sample.context.split("My name is ", 1)[1].split(".", 1)[0]
        key = next(k for k, (_, question, _) in ATTRIBUTES.items() if question.format(name=name) == sample.question)
        out.append((f"{sample.context}\nAssistant: Thanks for telling me, {name}!", key))
    return out


def _scores(parts: list[np.ndarray], queries: np.ndarray) -> np.ndarray:
    """`[queries, memories]` similarity of each query to each memory's nearest part."""
    return np.stack([(p @ queries.T).max(0) for p in parts], axis=1)


def run(n_memories: int, n_users: int = 200, seed: int = 0) -> dict[str, Any]:
    memories = chats(n_memories)
    embedder = Embedder()
    texts = [text for text, _ in memories]
    whole = np.asarray(embedder.embed(texts))
    first = np.asarray(embedder.embed([FIRST_PERSON[key] for _, key in memories]))
    para = np.asarray(embedder.embed([PARAPHRASED[key] for _, key in memories]))
    general = np.asarray(embedder.embed([q for q, _ in control_questions("train") + control_questions("eval")]))
    scorings = {"whole": [w[None] for w in whole], "best part": part_vectors(embedder, texts, list(whole))}
    return {"benchmark": "gate", "environment": environment(), "memories": n_memories,
            "default": MemoryConfig().relevance_threshold,
            "scorings": {name: _gate(parts, first, para, general, n_users, seed) for name, parts in scorings.items()}}


def _gate(parts: list[np.ndarray], first: np.ndarray, para: np.ndarray, general: np.ndarray, n_users: int,
          seed: int) -> dict[str, Any]:
    own = np.arange(len(parts))
    related = {"first person": _scores(parts, first)[own, own], "paraphrased": _scores(parts, para)[own, own]}
    unrelated = _scores(parts, general)  # (questions, memories)
    rng = np.random.default_rng(seed)
    best: dict[int, np.ndarray] = {}  # per simulated user of each size: each general question's best memory
    for size in USER_SIZES:
        users = [rng.choice(len(parts), size=min(size, len(parts)), replace=False) for _ in range(n_users)]
        best[size] = np.concatenate([unrelated[:, u].max(1) for u in users])
    rows = [{"threshold": t, **{f"related {k}": float((v >= t).mean()) for k, v in related.items()},
             **{f"unrelated passes, {s} memories": float((best[s] >= t).mean()) for s in USER_SIZES}}
            for t in THRESHOLDS]
    return {"rows": rows, "similarity": {k: {"p5": float(np.percentile(v, 5)), "p50": float(np.median(v))}
                                         for k, v in {**related, "unrelated": unrelated.ravel()}.items()}}


def render(result: dict[str, Any]) -> str:
    out = f"{result['environment']}; {result['memories']} memories"
    for name, scoring in result["scorings"].items():
        headers = list(scoring["rows"][0])
        rows = [[f"**{r['threshold']}**" if r["threshold"] == result["default"] else r["threshold"],
                 *(f"{r[h]:.3f}" for h in headers[1:])] for r in scoring["rows"]]
        out += f"\n\nmemory scored by its {name}\n\n" + table(headers, rows)
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(result["scorings"]), figsize=(11, 4), sharey=True)
    for ax, (name, scoring) in zip(axes, result["scorings"].items(), strict=True):
        xs = [r["threshold"] for r in scoring["rows"]]
        for column in list(scoring["rows"][0])[1:]:
            ax.plot(xs, [r[column] for r in scoring["rows"]], marker="o", label=column,
                    linestyle="-" if column.startswith("related") else "--")
        ax.axvline(result["default"], color="grey", linewidth=0.8)
        ax.set(xlabel="relevance threshold (MiniLM cosine)", title=f"scored by its {name}")
    axes[0].set_ylabel("fraction passing the gate")
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    parser = bench_args(__doc__.splitlines()[0], "60 memories instead of 600")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(60 if args.quick else 600)
    report(result, args, render, plot)


if __name__ == "__main__":
    main()
