"""Measure what a hypernetwork internalizes, side by side with the references, in one run.

Systems, each answering the same held-out questions greedily with the same base model:
- `adapter`: the document internalized by the hypernetwork, nothing about it in the prompt (ours);
- `icl`: the document in the prompt (the upper reference, where it fits the window);
- `none`: no document;
- `cd`: per-document context distillation (`training/cd.py`: a gradient-trained LoRA of the same rank and
  targets, timed), when `cd_steps > 0`.
Tasks: `facts` (the first generation's template facts with another seed: in-template), `needle` (a code
in essay filler at each length, exact match), `squad` (SQuAD v1.1 dev sample), `fairytale`
(FairytaleQA test, explicit questions) and `friends` (FriendsQA test: a scene's memory holding the
answer, named speakers asked about in the third person), token F1, reported normalised by ICL as the
paper does,
`interference` (general questions with an unrelated document's adapter, accuracy vs the base model; and
the token F1 between the answers with and without such an adapter on 120 held-out questions),
`composed` (k = 1, 2, 4 notes about one person composed as `D2LMemory.prepare` composes them, asked
about the first), and `conversations`: synthetic users (`training/conversations.py`) whose sessions go
through the public `D2LMemory` API (`absorb_messages` session by session, then a question in a fresh
conversation) in the `adapter`, `hybrid`, `context` and `none` modes, in three groups: `in_template`
(trained phrasings, values never trained on), `held_out` (held-out phrasings and values) and
`new_attributes` (attributes never trained on), with knowledge updates scored on their own.
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from d2l_memory.compose import DEFAULT_WEIGHTING
from d2l_memory.d2l import DocToLoRA
from d2l_memory.functional import lora_applied
from d2l_memory.kinds import WEIGHTINGS
from d2l_memory.lora import LoRA
from d2l_memory.scoring import contains, echoes, token_f1
from d2l_memory.training import conversations
from d2l_memory.training.cd import context_distill
from d2l_memory.training.data import (
    Sample,
    control_questions,
    essays,
    fact_sample,
    fairytale_samples,
    friends_samples,
    needle_sample,
    shared_data,
    squad_samples,
)
from d2l_memory.training.teacher import greedy, prompt_ids
from d2l_memory.training.train import text_weights

EVAL_SEED = 10_007  # disjoint from every training seed
# Held-out QA sets (never read by training): task -> (file under shared/data, reader)
QA_SETS = {"squad": ("squad/saipriya_dev-v1.1_sample.json", squad_samples),
           "fairytale": ("fairytaleqa/fairytaleqa_test.jsonl", fairytale_samples),
           "friends": ("friendsqa/friendsqa_tst.json", friends_samples)}
AGREEMENT_QUESTIONS = 120  # interference's held-out questions without gold, drawn from `held_out_questions`
Items = dict[str, list[float]]  # "task.system" -> one score per question, in the draw's order


def tally(items: Items | None, key: str, scores: list[float]) -> float:
    """The mean of `scores`, which are also kept whole under `key` in `items` (when given): two checkpoints
    scored on the same draw then compare question by question (`training/compare.py`)."""
    if items is not None:
        items[key] = scores
    return sum(scores) / len(scores)


INTERFERENCE_SETS = ("squad", "fairytale")  # fixed: a new QA set must not change interference's draw


def held_out_questions() -> list[str]:
    """Every question of the SQuAD and FairytaleQA held-out sets, once, sorted (interference asks them
    without their passage; general questions, where FriendsQA's are about a scene's characters)."""
    return sorted({s.question.strip() for name in INTERFERENCE_SETS
                   for s in QA_SETS[name][1](shared_data() / QA_SETS[name][0])})


@torch.no_grad()
def answer(d2l: DocToLoRA, questions: Sequence[str], contexts: Sequence[str | None],
           adapters: Sequence[LoRA | None], max_new_tokens: int = 32, batch: int = 8) -> list[str]:
    """Greedy answers; row i sees `contexts[i]` in its prompt (if any) and `adapters[i]` in its weights."""
    base = d2l.base
    out: list[str] = []
    for start in range(0, len(questions), batch):
        prompts = [prompt_ids(base, q, c) for q, c in zip(questions[start : start + batch],
                                                            contexts[start : start + batch], strict=True)]
        rows = list(adapters[start : start + batch])
        with lora_applied(base.model, rows if any(r is not None for r in rows) else None):
            generated = greedy(base, prompts, max_new_tokens)
        out += base.tokenizer.batch_decode(generated, skip_special_tokens=True)
    return out


def evaluate_samples(d2l: DocToLoRA, samples: Sequence[Sample], metric: str, systems: Sequence[str],
                     fits_window: bool = True, cd_steps: int = 20, items: Items | None = None,
                     task: str = "") -> dict[str, float]:
    """Score `systems` on `samples` with `metric` (`contains` or `f1`); adapter systems are timed per document.
    Each system's per-question scores go to `items["<task>.<system>"]`."""
    score = contains if metric == "contains" else token_f1
    questions = [s.question for s in samples]
    results: dict[str, float] = {}
    adapters: dict[str, list[LoRA | None]] = {}
    makers = {"adapter": ("absorb_s", d2l.internalize),
              "cd": ("cd_s", lambda text: context_distill(d2l, text, steps=cd_steps))}
    for system, (timing, make) in makers.items():
        if system in systems:
            start = time.perf_counter()
            adapters[system] = [make(s.context) for s in samples]
            results[timing] = (time.perf_counter() - start) / len(samples)
    for system in systems:
        if system == "icl" and not fits_window:
            continue
        contexts = [s.context if system == "icl" else None for s in samples]
        rows = adapters.get(system, [None] * len(samples))
        answers = answer(d2l, questions, contexts, rows)
        results[system] = tally(items, f"{task}.{system}",
                                [score(a, s.answer) for a, s in zip(answers, samples, strict=True)])
    return results


def composed_eval(d2l: DocToLoRA, n: int, ks: Sequence[int] = (1, 2, 4), composition: str = DEFAULT_WEIGHTING,
                  seed: int = EVAL_SEED, items: Items | None = None) -> dict[str, float]:
    """Accuracy on a fact of one person's first note when it is composed with k-1 other notes about the same
    person (held-out phrasings and values), each note its own memory weighted as `D2LMemory.prepare` would
    weigh it (`train.text_weights`: for `relevance`, by its recall score for the question)."""
    rng = random.Random(seed)
    results: dict[str, float] = {}
    people = []
    for _ in range(n):
        person, facts = conversations._profile(rng, "eval", max(ks) * 2, held_out_attributes=False)
        notes = [" ".join(rng.choice(conversations.phrasings(f.attribute.note, "eval")).format(n=person, v=f.value)
                          for f in facts[i : i + 2]) for i in range(0, len(facts), 2)]
        fact = facts[rng.randrange(min(2, len(facts)))]
        question = rng.choice(conversations.phrasings(fact.attribute.ask_about, "eval")).format(n=person)
        people.append((notes, question, fact.value))
    adapters = [d2l.internalize_batch(notes) for notes, _, _ in people]
    for k in ks:
        rows = [LoRA.concat(loras[:k], text_weights(composition, notes[:k], question))
                for loras, (notes, question, _) in zip(adapters, people, strict=True)]
        questions = [q for _, q, _ in people]
        answers = answer(d2l, questions, [None] * n, rows)
        icl = answer(d2l, questions, [" ".join(notes[:k]) for notes, _, _ in people], [None] * n)
        for system, replies in ((f"adapter_k{k}", answers), (f"icl_k{k}", icl)):
            results[system] = tally(items, f"composed.{system}",
                                    [contains(a, v) for a, (_, _, v) in zip(replies, people, strict=True)])
    none = answer(d2l, [q for _, q, _ in people], [None] * n, [None] * n)
    results["none"] = tally(items, "composed.none",
                            [contains(a, v) for a, (_, _, v) in zip(none, people, strict=True)])
    return results


CONVERSATION_GROUPS = {"in_template": ("train", False), "held_out": ("eval", False), "new_attributes": ("eval", True)}
MODES = ("adapter", "hybrid", "context", "none")


def conversation_eval(checkpoint: Path | None, n: int, seed: int = EVAL_SEED,
                      groups: Sequence[str] = tuple(CONVERSATION_GROUPS), items: Items | None = None,
                      composition: str | None = None) -> dict[str, float]:
    """Synthetic users absorbed through `D2LMemory.absorb_messages` (session by session, each with the
    dialogue's roles and segment budget) and asked in a fresh conversation, in every mode.

    In-template users use trained phrasings but values drawn from the evaluation's half of each pool, so
    no group can be answered by recalling a training value. `composition` None keeps `MemoryConfig`'s.
    Returns `{group_mode: accuracy}` plus
    `updates_<mode>` over the users whose question asks for a value they changed, and `echo_<mode>`: the
    share of all replies that say eight or more words of a told session back (`scoring.echoes`) instead of
    answering in their own words.
    """
    from d2l_memory.memory import D2LMemory  # the facade: evaluation exercises the product's own path

    rng = random.Random(seed)
    hits: dict[str, list[float]] = {}
    config = {"hypernet": None if checkpoint is None else str(checkpoint)}
    if composition is not None:
        config["composition"] = composition
    with tempfile.TemporaryDirectory() as store, D2LMemory(store, **config) as mem:
        jobs = [(group, i) for group in groups for i in range(n)]
        for group, i in tqdm(jobs, desc="conversations", unit="user", leave=False):
            split, new_attributes = CONVERSATION_GROUPS[group]
            d = conversations.dialogue(rng, split, new_attributes, update=i % 4 == 3 and not new_attributes,
                                       values="eval")
            user = f"{group}-{i}"
            for session in d.sessions:
                mem.absorb_messages(session, user, roles=d.roles, segment_tokens=d.segment_tokens)
            told = [" ".join(text for _, text in session) for session in d.sessions]
            for mode in MODES:
                reply = mem.chat(d.question, user, mode=mode, max_new_tokens=32)
                score = contains(reply, d.value)
                hits.setdefault(f"{group}_{mode}", []).append(score)
                hits.setdefault(f"echo_{mode}", []).append(max(echoes(reply, text) for text in told))
                if d.old_value is not None:
                    hits.setdefault(f"updates_{mode}", []).append(score)
    return {key: tally(items, f"conversations.{key}", v) for key, v in hits.items()}


def run_eval(d2l: DocToLoRA, n: int = 40, needle_lengths: Sequence[int] = (512, 2048, 8192),
             tasks: Sequence[str] = ("facts", "needle", "squad", "fairytale", "friends", "interference", "composed",
                                     "conversations"),
             cd_steps: int = 0, checkpoint: Path | None = None, items: Items | None = None,
             composition: str | None = None) -> dict[str, dict]:
    """All tasks with `n` questions each (per needle length, per conversation group); returns
    `{task: {system: score}}`, and fills `items` (when given) with every score's per-question list.
    `checkpoint` is the directory `d2l` was loaded from (None: the shipped one), which the conversation
    task opens through `D2LMemory`. `composition` (None: `MemoryConfig`'s default) weighs the composed and
    conversation tasks' memories.

    With `cd_steps > 0` the per-document context-distillation baseline (`cd`) runs beside the others on
    the facts and QA tasks (its cost grows with document length; the needle sweep leaves it out).
    """
    rng = random.Random(EVAL_SEED)
    report: dict[str, dict] = {}
    systems = ("adapter", "icl", "none")
    with_cd = (*systems, "cd") if cd_steps > 0 else systems
    if "facts" in tasks:
        report["facts"] = evaluate_samples(d2l, [fact_sample(rng) for _ in range(n)], "contains", with_cd,
                                           cd_steps=cd_steps, items=items, task="facts")
    if "needle" in tasks:
        filler = " ".join(essays())
        for length in needle_lengths:
            samples = [needle_sample(rng, [filler], length * 4) for _ in range(max(4, n // 4))]
            fits = length <= d2l.max_positions - 256
            report[f"needle_{length}"] = evaluate_samples(d2l, samples, "contains", systems, fits_window=fits,
                                                          items=items, task=f"needle_{length}")
    for task, (path, read) in QA_SETS.items():
        if task not in tasks:
            continue
        pool = list(read(shared_data() / path))
        samples = random.Random(EVAL_SEED).sample(pool, min(n, len(pool)))
        scores = evaluate_samples(d2l, samples, "f1", with_cd, cd_steps=cd_steps, items=items, task=task)
        for system in ("adapter", "cd"):
            if system in scores:
                scores[f"{system}_over_icl"] = scores[system] / scores["icl"] if scores.get("icl") else 0.0
        report[task] = scores
    if "interference" in tasks:
        pairs = control_questions("eval")
        unrelated = [fact_sample(rng).context for _ in pairs]
        adapters = [d2l.internalize(c) for c in unrelated]
        questions = [q for q, _ in pairs]
        with_doc = answer(d2l, questions, [None] * len(pairs), adapters)
        without = answer(d2l, questions, [None] * len(pairs), [None] * len(pairs))
        base_acc = tally(items, "interference.none", [contains(a, g) for a, (_, g) in zip(without, pairs, strict=True)])
        ours = tally(items, "interference.adapter", [contains(a, g) for a, (_, g) in zip(with_doc, pairs, strict=True)])
        # Beside the 22 with gold answers: many more held-out questions, scored by how much an unrelated
        # adapter changes the base model's own answer (no gold needed: leaving it alone is the target).
        pool = held_out_questions()
        asked = random.Random(EVAL_SEED).sample(pool, min(AGREEMENT_QUESTIONS, len(pool)))
        documents = random.Random(EVAL_SEED + 1)  # its own draws: comparable whichever tasks ran before
        disturbed = answer(d2l, asked, [None] * len(asked),
                           [d2l.internalize(fact_sample(documents).context) for _ in asked])
        alone = answer(d2l, asked, [None] * len(asked), [None] * len(asked))
        agreement = tally(items, "interference.agreement_with_base",
                          [token_f1(a, b) for a, b in zip(disturbed, alone, strict=True)])
        report["interference"] = {"adapter": ours, "none": base_acc,
                                  "adapter_over_none": ours / base_acc if base_acc else 0.0,
                                  "agreement_with_base": agreement, "agreement_questions": len(asked)}
    if "composed" in tasks:
        report["composed"] = composed_eval(d2l, n, composition=composition or DEFAULT_WEIGHTING, items=items)
    if "conversations" in tasks:
        report["conversations"] = conversation_eval(checkpoint, n, items=items, composition=composition)
    return report


def write_report(path: Path, report: dict[str, dict], items: Items, composition: str | None = None) -> None:
    """The report as JSON, with the per-question scores under `"items"` and the weighting the composed and
    conversation tasks used under `"composition"` (None: the default; what `training/compare.py` reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**report, "composition": composition or DEFAULT_WEIGHTING, "items": items}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, default=None, help="hypernetwork dir (default: shipped)")
    parser.add_argument("--n", type=int, default=40)
    defaults = inspect.signature(run_eval).parameters
    parser.add_argument("--tasks", nargs="*", default=list(defaults["tasks"].default))
    parser.add_argument("--needle-lengths", nargs="*", type=int, default=list(defaults["needle_lengths"].default))
    parser.add_argument("--cd-steps", type=int, default=0, help="also run the context-distillation baseline")
    parser.add_argument("--composition", choices=WEIGHTINGS, default=None,
                        help="how composed memories are weighted (default: MemoryConfig's)")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = parser.parse_args()
    d2l = DocToLoRA.from_pretrained(args.checkpoint)
    items: Items = {}
    report = run_eval(d2l, args.n, args.needle_lengths, args.tasks, args.cd_steps, args.checkpoint, items,
                      args.composition)
    print(json.dumps(report, indent=1))
    if args.out:
        write_report(args.out, report, items, args.composition)


if __name__ == "__main__":
    main()
