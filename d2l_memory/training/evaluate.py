"""Measure what a hypernetwork internalizes, side by side with the references, in one run.

Systems, each answering the same held-out questions greedily with the same base model:
- `adapter`: the document internalized by the hypernetwork, nothing about it in the prompt (ours);
- `icl`: the document in the prompt (the upper reference, where it fits the window);
- `none`: no document;
- `cd`: per-document context distillation (`training/cd.py`: a gradient-trained LoRA of the same rank and
  targets, timed), when `cd_steps > 0`.
Tasks: `facts` (held-out synthetic personal facts, accuracy), `needle` (a code in essay filler at each
length, exact match), `squad` (SQuAD v1.1 dev sample) and `fairytale` (FairytaleQA test, explicit
questions), both token F1 and reported normalised by ICL as the paper does, `interference` (general
questions with an unrelated document's adapter, accuracy vs the base model).
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from d2l_memory.d2l import DocToLoRA
from d2l_memory.functional import lora_applied
from d2l_memory.lora import LoRA
from d2l_memory.training.cd import context_distill
from d2l_memory.training.data import (
    Sample,
    control_questions,
    fact_sample,
    fairytale_samples,
    needle_sample,
    shared_data,
    squad_samples,
)
from d2l_memory.training.teacher import greedy, normalize, prompt_ids

EVAL_SEED = 10_007  # disjoint from every training seed
# Held-out QA sets (never read by training): task -> (file under shared/data, reader)
QA_SETS = {"squad": ("squad/saipriya_dev-v1.1_sample.json", squad_samples),
           "fairytale": ("fairytaleqa/fairytaleqa_test.jsonl", fairytale_samples)}


def token_f1(prediction: str, gold: str) -> float:
    """Bag-of-words token F1 after SQuAD normalisation (the paper's `compute_qa_f1_score`)."""
    pred, ref = normalize(prediction).split(), normalize(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


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


def _contains(prediction: str, gold: str) -> float:
    return float(normalize(gold) in normalize(prediction))


def evaluate_samples(d2l: DocToLoRA, samples: Sequence[Sample], metric: str, systems: Sequence[str],
                     fits_window: bool = True, cd_steps: int = 20) -> dict[str, float]:
    """Score `systems` on `samples` with `metric` (`contains` or `f1`); adapter systems are timed per document."""
    score = _contains if metric == "contains" else token_f1
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
        results[system] = sum(score(a, s.answer) for a, s in zip(answers, samples, strict=True)) / len(samples)
    return results


def run_eval(d2l: DocToLoRA, n: int = 40, needle_lengths: Sequence[int] = (512, 2048, 8192),
             tasks: Sequence[str] = ("facts", "needle", "squad", "fairytale", "interference"),
             cd_steps: int = 0) -> dict[str, dict]:
    """All tasks with `n` questions each (per needle length); returns `{task: {system: score}}`.

    With `cd_steps > 0` the per-document context-distillation baseline (`cd`) runs beside the others on
    the facts and QA tasks (its cost grows with document length; the needle sweep leaves it out).
    """
    rng = random.Random(EVAL_SEED)
    report: dict[str, dict] = {}
    systems = ("adapter", "icl", "none")
    with_cd = (*systems, "cd") if cd_steps > 0 else systems
    if "facts" in tasks:
        report["facts"] = evaluate_samples(d2l, [fact_sample(rng) for _ in range(n)], "contains", with_cd,
                                           cd_steps=cd_steps)
    if "needle" in tasks:
        essays = [p.read_text() for p in sorted((shared_data() / "paul_graham_essays").glob("*.txt"))]
        filler = " ".join(essays)
        for length in needle_lengths:
            samples = [needle_sample(rng, [filler], length * 4) for _ in range(max(4, n // 4))]
            fits = length <= d2l.max_positions - 256
            report[f"needle_{length}"] = evaluate_samples(d2l, samples, "contains", systems, fits_window=fits)
    for task, (path, read) in QA_SETS.items():
        if task not in tasks:
            continue
        pool = list(read(shared_data() / path))
        samples = random.Random(EVAL_SEED).sample(pool, min(n, len(pool)))
        scores = evaluate_samples(d2l, samples, "f1", with_cd, cd_steps=cd_steps)
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
        base_acc = sum(_contains(a, g) for a, (_, g) in zip(without, pairs, strict=True)) / len(pairs)
        ours = sum(_contains(a, g) for a, (_, g) in zip(with_doc, pairs, strict=True)) / len(pairs)
        report["interference"] = {"adapter": ours, "none": base_acc,
                                  "adapter_over_none": ours / base_acc if base_acc else 0.0}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, default=None, help="hypernetwork dir (default: shipped)")
    parser.add_argument("--n", type=int, default=40)
    defaults = inspect.signature(run_eval).parameters
    parser.add_argument("--tasks", nargs="*", default=list(defaults["tasks"].default))
    parser.add_argument("--needle-lengths", nargs="*", type=int, default=list(defaults["needle_lengths"].default))
    parser.add_argument("--cd-steps", type=int, default=0, help="also run the context-distillation baseline")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = parser.parse_args()
    d2l = DocToLoRA.from_pretrained(args.checkpoint)
    report = run_eval(d2l, args.n, args.needle_lengths, args.tasks, args.cd_steps)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
