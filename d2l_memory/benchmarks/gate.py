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

A third table measures the product's own case, the threshold for messages that speak of the user
(`MemoryConfig.personal_relevance_threshold`): memories are conversations as `absorb_messages` cuts them
(`training.conversations`, held-out phrasings and values), each asked one of the held-out question forms
("Do you remember my usual order?"); the unrelated questions are the general control questions and real
first-person chat questions from the MSC test dialogues ("Do you think I should get a dog?"), against
users holding that many conversation memories.
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
from d2l_memory.models import load_model
from d2l_memory.store.store import part_vectors
from d2l_memory.training.conversations import conversation_sample, msc_lines
from d2l_memory.training.data import ATTRIBUTES, control_questions, fact_sample
from d2l_memory.training.prepare import token_counter
from d2l_memory.transcripts import refers_to_user

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


def conversation_memories(n: int, seed: int = 2027) -> tuple[list[str], list[tuple[str, list[int]]]]:
    """Memories of `n` synthetic users' conversations (held-out phrasings and values, cut as `absorb_messages`
    cuts them) and, per user, the question asked and the indices of the memories that hold its answer."""
    count_tokens = token_counter(load_model().tokenizer)
    rng, memories, asked = random.Random(seed), [], []
    for _ in range(n):
        sample = conversation_sample(rng, "eval", count_tokens)
        holding = [m for m in sample.memories if sample.answer in m]
        asked.append((sample.question, [len(memories) + i for i in range(len(holding))]))
        memories += holding + [m for m in sample.memories if m not in holding]
    return memories, asked


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
    config = MemoryConfig()
    return {"benchmark": "gate", "environment": environment(), "memories": n_memories,
            "default": config.relevance_threshold, "personal_default": config.personal_relevance_threshold,
            "scorings": {name: _gate(parts, first, para, general, n_users, seed) for name, parts in scorings.items()},
            "conversations": _conversations(embedder, n_memories // 6, general, n_users, seed)}


def _conversations(embedder: Embedder, n: int, general: np.ndarray, n_users: int, seed: int) -> dict[str, Any]:
    """The related and unrelated pass rates per threshold for `n` users' conversation memories."""
    memories, asked = conversation_memories(n)
    parts = part_vectors(embedder, memories, list(np.asarray(embedder.embed(memories))))
    questions = np.asarray(embedder.embed([q for q, _ in asked]))
    related = np.array([_scores([parts[i] for i in holding], questions[j : j + 1]).max()
                        for j, (_, holding) in enumerate(asked)])
    chat = sorted({line for line in msc_lines("eval") if line.endswith("?") and refers_to_user(line)})
    chat = random.Random(seed).sample(chat, min(len(chat), 200))
    unrelated = {"first-person chat": _scores(parts, np.asarray(embedder.embed(chat))),
                 "general": _scores(parts, general)}
    rng = np.random.default_rng(seed)
    users = {size: [rng.choice(len(parts), size=min(size, len(parts)), replace=False) for _ in range(n_users)]
             for size in USER_SIZES}
    best = {(kind, size): np.concatenate([scores[:, u].max(1) for u in users[size]])
            for kind, scores in unrelated.items() for size in USER_SIZES}
    rows = [{"threshold": t, "related, conversation questions": float((related >= t).mean()),
             **{f"unrelated {kind}, {size} memories": float((b >= t).mean()) for (kind, size), b in best.items()}}
            for t in THRESHOLDS]
    return {"rows": rows, "users": n, "memories": len(memories), "chat_questions": len(chat),
            "similarity": {"related": {"p5": float(np.percentile(related, 5)), "p50": float(np.median(related))}}}


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
        out += f"\n\nmemory scored by its {name}\n\n" + _table(scoring["rows"], result["default"])
    conv = result["conversations"]
    return out + (f"\n\nconversations ({conv['users']} users, {conv['memories']} memories, {conv['chat_questions']} "
                  f"chat questions), scored by the best part\n\n" + _table(conv["rows"], result["personal_default"]))


def _table(rows: list[dict[str, float]], default: float) -> str:
    headers = list(rows[0])
    return table(headers, [[f"**{r['threshold']}**" if r["threshold"] == default else r["threshold"],
                            *(f"{r[h]:.3f}" for h in headers[1:])] for r in rows])


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    panels = [(f"scored by its {name}", s["rows"], result["default"]) for name, s in result["scorings"].items()]
    panels.append(("conversations, by the best part", result["conversations"]["rows"], result["personal_default"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 4), sharey=True)
    for ax, (title, rows, default) in zip(axes, panels, strict=True):
        xs = [r["threshold"] for r in rows]
        for column in list(rows[0])[1:]:
            ax.plot(xs, [r[column] for r in rows], marker="o", label=column,
                    linestyle="-" if column.startswith("related") else "--")
        ax.axvline(default, color="grey", linewidth=0.8)
        ax.set(xlabel="relevance threshold (MiniLM cosine)", title=title)
        ax.legend(fontsize=6)
    axes[0].set_ylabel("fraction passing the gate")
    save_figure(fig, path)


def main() -> None:
    parser = bench_args(__doc__.splitlines()[0], "60 memories instead of 600")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(60 if args.quick else 600)
    report(result, args, render, plot)


if __name__ == "__main__":
    main()
