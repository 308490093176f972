"""LongMemEval (oracle): chat-assistant memory questions, accuracy by question type for every memory system.

    python -m d2l_memory.benchmarks.longmemeval [--quick] [--out result.json] [--plot docs/img/bench-longmemeval.png]

Data: the oracle set (`longmemeval_oracle.json`, MIT): each question comes with only its evidence
sessions. Per question, those sessions are cut into dated memories (as for LoCoMo) and absorbed for a
user of its own; the full-history system reads all of them (most recent tokens that fit the window).
The question is asked with its date, as the official prompt does.

Metric: the official one is a GPT-4o judge, which a CPU-only, offline run cannot use. We report
`accuracy` = the normalised gold answer appears in the answer (abstention questions, `_abs`: the answer
says it does not know or that it was not mentioned), and token F1 next to it. Both are stricter than
a judge on paraphrases; the same for every system.

Sizes: `--quick` is 1 question (the shortest haystack, CD as a smoke test); the reported size is a seeded
sample of 2 questions of each of the 6 types, without CD (distilling a question's ~25 memories takes about
40 minutes on this CPU; see the LoCoMo subset for CD).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from d2l_memory.benchmarks.common import (
    HistoryReader,
    absorb_timed,
    ask,
    bench_args,
    distill_into_store,
    environment,
    memory_in_tempdir,
    percentile,
    pyplot,
    report,
    save_figure,
    save_json,
    segments,
    system_list,
    table,
)
from d2l_memory.scoring import normalize, token_f1
from d2l_memory.training.data import shared_data

log = logging.getLogger(__name__)
TYPES = ("single-session-user", "single-session-assistant", "single-session-preference", "multi-session",
         "knowledge-update", "temporal-reasoning")
ABSTAIN = ("not mention", "no information", "don't know", "do not know", "not sure", "cannot", "can't",
           "no record", "not provided", "unknown", "didn't mention", "did not mention", "not available")


class Size(BaseModel):
    """How much of LongMemEval one run reads."""

    per_type: int
    types: tuple[str, ...] = TYPES
    shortest: bool = False  # quick: the question with the shortest haystack per type, instead of a sample
    max_new_tokens: int = 32
    cd: bool = False  # per-document CD: about 1.5 min per 256-token memory here, ~25 memories per question
    cd_steps: int = 20
    cd_probes: int | None = None  # None: cd.py's probes; n: n generic probes (quick smoke test only)
    seed: int = 0


QUICK = Size(per_type=1, types=("single-session-assistant",), shortest=True, max_new_tokens=16, cd=True, cd_steps=2,
             cd_probes=2)
# reported: a seeded sample of 2 per type (about 3-5 minutes per question for all systems on this CPU, the
# full history's prefill dominating)
FULL = Size(per_type=2, max_new_tokens=32)


def load(path: Path | None = None) -> list[dict[str, Any]]:
    """The 500 oracle questions."""
    return json.loads((path or shared_data() / "longmemeval" / "longmemeval_oracle.json").read_text())


def pick(data: list[dict[str, Any]], size: Size) -> list[dict[str, Any]]:
    """`per_type` questions of each type: a seeded sample, or the shortest haystacks (quick)."""
    rng = random.Random(size.seed)
    per_kind = []
    for kind in size.types:
        pool = [q for q in data if q["question_type"] == kind]
        if size.shortest:
            pool.sort(key=lambda q: sum(len(t["content"]) for s in q["haystack_sessions"] for t in s))
            per_kind.append(pool[: size.per_type])
        else:
            per_kind.append(rng.sample(pool, min(size.per_type, len(pool))))
    # round robin over the types, so that a run cut short has covered every type evenly
    return [q for group in zip(*per_kind, strict=False) for q in group]


def sessions_of(item: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """`(header, turns)` per evidence session, in date order."""
    pairs = sorted(zip(item["haystack_dates"], item["haystack_sessions"], strict=True), key=lambda p: p[0])
    return [(f"DATE: {date}", [f"{t['role'].capitalize()}: {t['content'].strip()}" for t in session
                               if t["content"].strip()]) for date, session in pairs]


def correct(item: dict[str, Any], answer: str) -> float:
    """1.0 if the answer holds the normalised gold answer as whole tokens ("7" is not found in "741"),
    for abstention questions if it declines; else 0.0."""
    if item["question_id"].endswith("_abs"):
        return float(any(p in answer.lower() for p in ABSTAIN))
    gold, said = normalize(str(item["answer"])).split(), normalize(answer).split()
    return float(bool(gold) and any(said[i : i + len(gold)] == gold for i in range(len(said) - len(gold) + 1)))


def rescore(result: dict[str, Any]) -> dict[str, Any]:
    """A saved result scored again with this module's `correct` (same answers), e.g. after a scorer fix."""
    for r in result["records"]:
        r["correct"] = correct({"question_id": r["question_id"], "answer": r["gold"]}, r["answer"])
    result["summary"] = summarize(result["records"], tuple(result["systems"]))
    return result


def run(size: Size, systems: Sequence[str] | None = None, out: Path | None = None,
        composition: str | None = None, hypernet: Path | None = None) -> dict[str, Any]:
    """Absorb each question's sessions, answer it with every system, score and time (the result so far is
    saved to `out` after each question, so a run cut short still reports what it measured; `composition`:
    `MemoryConfig.composition`, `hypernet`: `MemoryConfig.hypernet`, their defaults when None)."""
    systems = tuple(systems or system_list(size.cd))
    started = environment()  # the date and commit the run started from
    records: list[dict[str, Any]] = []

    def result() -> dict[str, Any]:
        return {"benchmark": "longmemeval", "environment": started, "size": size.model_dump(),
                "systems": list(systems), "composition": composition, "hypernet": str(hypernet or "shipped"),
                "summary": summarize(records, systems),
                "records": records}

    with memory_in_tempdir(composition=composition, hypernet=hypernet and str(hypernet)) as mem:
        composition = mem.config.composition
        tok = mem.d2l.base.tokenizer
        for item in pick(load(), size):
            user = f"q{item['question_id']}"
            sessions = sessions_of(item)
            texts = segments(sessions, tok, mem.config.segment_tokens)
            history = "\n\n".join("\n".join([h, *turns]) for h, turns in sessions)
            question = f"{item['question']} (Current date: {item['question_date']})"
            absorb: dict[str, float] = {"full-history": 0.0, "none": 0.0}
            if {"adapter", "hybrid", "rag"} & set(systems):
                absorb["adapter"] = absorb["hybrid"] = sum(absorb_timed(mem, texts, user))
                start = time.perf_counter()
                mem.store.embedder.embed(texts)
                absorb["rag"] = time.perf_counter() - start
            if "cd" in systems:
                absorb["cd"] = sum(distill_into_store(mem, texts, f"{user}-cd", size.cd_steps, probes=size.cd_probes))
            log.info("%s: %d memories absorbed (%s)", user, len(texts),
                     ", ".join(f"{k} {v:.0f} s" for k, v in absorb.items()))
            for system in systems:
                if system == "full-history":
                    got = HistoryReader(mem.d2l.base, history, size.max_new_tokens).answer(question)
                else:
                    got = ask(mem, question, f"{user}-cd" if system == "cd" else user, system, size.max_new_tokens)
                records.append({"question_id": item["question_id"], "type": item["question_type"],
                                "gold": str(item["answer"]), "system": system, "answer": got.text,
                                "correct": correct(item, got.text), "f1": token_f1(got.text, str(item["answer"])),
                                "seconds": got.seconds, "prompt_tokens": got.prompt_tokens,
                                "memories": len(texts), "absorb_s": absorb.get(system, 0.0),
                                "history_tokens": len(tok(history, add_special_tokens=False)["input_ids"])})
            save_json(out, result())
    return result()


def summarize(records: list[dict[str, Any]], systems: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Per system: accuracy overall and by type, F1, prompt tokens, latency and absorb cost per question."""
    out = {}
    for system in systems:
        mine = [r for r in records if r["system"] == system]
        out[system] = {
            "accuracy": float(np.mean([r["correct"] for r in mine])), "f1": float(np.mean([r["f1"] for r in mine])),
            "n": len(mine),
            "by_type": {t: float(np.mean([r["correct"] for r in mine if r["type"] == t]))
                        for t in TYPES if any(r["type"] == t for r in mine)},
            "f1_by_type": {t: float(np.mean([r["f1"] for r in mine if r["type"] == t]))
                           for t in TYPES if any(r["type"] == t for r in mine)},
            "prompt_tokens": float(np.mean([r["prompt_tokens"] for r in mine])),
            "p50_s": percentile([r["seconds"] for r in mine], 50),
            "p95_s": percentile([r["seconds"] for r in mine], 95),
            "absorb_s_per_question": float(np.mean([r["absorb_s"] for r in mine])),
        }
    return out


def render(result: dict[str, Any]) -> str:
    """The Markdown table of a result."""
    summary = result["summary"]
    types = [t for t in TYPES if any(t in v["by_type"] for v in summary.values())]
    rows = [[s, f"{v['accuracy']:.2f}", *(f"{v['by_type'][t]:.2f}" if t in v["by_type"] else "-" for t in types),
             f"{v['f1']:.3f}", f"{v['prompt_tokens']:.0f}", f"{v['p50_s']:.1f} / {v['p95_s']:.1f}",
             f"{v['absorb_s_per_question']:.1f}"] for s, v in summary.items()]
    n = next(iter(summary.values()))["n"]
    return (f"{result['environment']}\n\n"
            + table(["system", f"accuracy (n={n})", *types, "token F1", "prompt tokens / query",
                     "answer s p50 / p95", "absorb s / question"], rows))


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy and token F1 by question type: one bar group per type, one bar per system."""
    plt = pyplot()
    summary = result["summary"]
    types = [t for t in TYPES if any(t in v["by_type"] for v in summary.values())]
    systems = list(summary)
    width = 0.8 / len(systems)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for ax, key, label in ((axes[0], "by_type", "accuracy (gold answer in the answer)"),
                           (axes[1], "f1_by_type", "token F1")):
        for i, system in enumerate(systems):
            xs = [j + i * width for j in range(len(types))]
            ax.bar(xs, [summary[system].get(key, {}).get(t, 0.0) for t in types], width, label=system)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(types))], [t.replace("-", "-\n") for t in types],
                      fontsize=7)
        ax.set_ylabel(label)
        ax.set_ylim(0, 1 if key == "by_type" else None)
    axes[0].set_title(f"LongMemEval oracle, n={summary[systems[0]]['n']}, SmolLM2-135M reader", fontsize=9)
    axes[1].legend(fontsize=7, ncol=3)
    save_figure(fig, path)


def main() -> None:
    parser = bench_args(__doc__.splitlines()[0], "1 question (the shortest haystack)", systems=True)
    parser.add_argument("--rescore", type=Path, default=None, help="score a saved result again, run nothing")
    args = parser.parse_args()
    if args.rescore:
        result = rescore(json.loads(args.rescore.read_text()))
    else:
        torch.set_num_threads(args.threads)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        result = run(QUICK if args.quick else FULL, args.systems, out=args.out, composition=args.composition,
                     hypernet=args.hypernet)
    report(result, args, render, plot)


if __name__ == "__main__":
    main()
