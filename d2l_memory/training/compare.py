"""Compare two checkpoints' evaluations question by question: is a difference more than noise?

    python -m d2l_memory.training.compare runs/evals/shipped.json runs/evals/candidate.json

Both files come from `evaluate --out` (or `d2l-memory eval --out`) with the same commands, so their
`items` hold the same questions in the same order; or both from the same LoCoMo or LongMemEval benchmark
command (`--out`), whose `records` are paired question by question (`locomo.<system>` is the F1 of
categories 1-4, `locomo.<system>.adversarial` category 5's accuracy; `longmemeval.<system>` the F1 and
`longmemeval.<system>.correct` the accuracy). For each score both have, with per-question scores
`a_i` (the first file, the baseline) and `b_i`, the difference is `mean(b - a)` and its standard error
is the paired one, `std(b - a) / sqrt(n)` (sample std): questions both checkpoints answer alike add no
noise, which makes the comparison much tighter than the two rates' own errors at n = 12-48. The
conversation groups are also pooled (`conversations.<mode>`). A difference beyond `--z` (2) standard
errors is marked `better` or `worse` (for the echo shares, a fall is `better`); the ship rule in
docs/training.md reads this table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from d2l_memory.training.evaluate import CONVERSATION_GROUPS, MODES, Items


class Difference(BaseModel):
    """One score of two evaluations on the same questions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    n: int
    baseline: float
    candidate: float
    diff: float
    se: float  # paired standard error of `diff`; 0 when every question moved alike

    @property
    def lower_is_better(self) -> bool:
        """The echo share counts replies that say a told session back instead of answering."""
        return self.key.startswith("conversations.echo_")

    def verdict(self, z: float) -> str:
        """`better`, `worse`, or `~` (within `z` standard errors)."""
        if self.diff != 0 and (self.se == 0 or abs(self.diff) > z * self.se):
            return "better" if (self.diff > 0) != self.lower_is_better else "worse"
        return "~"


def pooled(items: Items) -> Items:
    """`items` plus `conversations.<mode>`: each mode's three groups as one list (updates are a subset of
    them, and the echo share is not an accuracy, so neither is pooled)."""
    out = dict(items)
    for mode in MODES:
        keys = [f"conversations.{group}_{mode}" for group in CONVERSATION_GROUPS]
        if all(k in items for k in keys):
            out[f"conversations.{mode}"] = [s for k in keys for s in items[k]]
    return out


def compare(baseline: Items, candidate: Items) -> list[Difference]:
    """The paired difference of every score both evaluations hold, in the baseline's order.

    Raises:
        ValueError: a score whose question counts differ (not the same draw), or no score in common.
    """
    a, b = pooled(baseline), pooled(candidate)
    shared = [k for k in a if k in b]
    if not shared:
        raise ValueError("the two evaluations have no score in common (were they run with --out and the same tasks?)")
    out = []
    for key in shared:
        if len(a[key]) != len(b[key]):
            raise ValueError(f"{key}: {len(a[key])} questions against {len(b[key])}; run both with the same --n")
        n = len(a[key])
        d = [y - x for x, y in zip(a[key], b[key], strict=True)]
        mean = sum(d) / n
        var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
        out.append(Difference(key=key, n=n, baseline=sum(a[key]) / n, candidate=sum(b[key]) / n, diff=mean,
                              se=math.sqrt(var / n)))
    return out


def record_items(report: dict[str, Any]) -> tuple[Items, list[str]]:
    """A benchmark report's per-question scores (see the module docstring for the keys), and the
    questions they answer, once each in the order of the scores, so two runs can be checked to be one draw.

    Raises:
        ValueError: a benchmark whose records this does not know how to score.
    """
    name, records = report.get("benchmark"), report["records"]
    fields = {"locomo": (("", "score"),), "longmemeval": (("", "f1"), (".correct", "correct"))}
    if name not in fields:
        raise ValueError(f"benchmark {name!r} has no per-question pairing (only LoCoMo and LongMemEval)")
    items: Items = {}
    questions: list[str] = []
    for r in records:
        group = ".adversarial" if r.get("category") == 5 else ""
        for suffix, field in fields[name]:
            items.setdefault(f"{name}.{r['system']}{group}{suffix}", []).append(float(r[field]))
        if r["system"] == records[0]["system"]:
            questions.append(f"{r.get('conversation', '')}|{r.get('question_id') or r.get('question')}")
    return items, questions


def load_items(path: Path) -> tuple[Items, list[str] | None, str | None]:
    """The per-question scores of an `evaluate --out` file or a LoCoMo/LongMemEval benchmark's `--out`
    file, for a benchmark the questions they answer (None for an evaluation, whose draw is fixed), and the
    composition weighting the file records (None in files written before it was recorded).

    Raises:
        ValueError: a file without them (written before they were recorded, or not an evaluation).
    """
    report = json.loads(path.read_text())
    if isinstance(report, dict) and "records" in report:
        return *record_items(report), report.get("composition")
    if not isinstance(report, dict) or "items" not in report:
        raise ValueError(f"{path} holds no per-question scores ('items'): re-run the evaluation with --out")
    return report["items"], None, report.get("composition")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baseline", type=Path)
    parser.add_argument("candidate", type=Path)
    parser.add_argument("--z", type=float, default=2.0, help="standard errors a difference must exceed")
    args = parser.parse_args()
    try:
        (a, a_questions, a_weighting), (b, b_questions, b_weighting) = map(load_items, (args.baseline, args.candidate))
        if a_questions != b_questions:
            raise ValueError("the two files answer different questions: run the same benchmark command (same "
                             "--size and seed) on both checkpoints")
        if None not in (a_weighting, b_weighting) and a_weighting != b_weighting:
            raise ValueError(f"the two files compose memories differently ({a_weighting} against {b_weighting}): "
                             "run both with the same --composition")
        rows = compare(a, b)
    except (OSError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    print("| score | n | baseline | candidate | difference | paired SE | verdict |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.key} | {r.n} | {r.baseline:.3f} | {r.candidate:.3f} | {r.diff:+.3f} | {r.se:.3f} | "
              f"{r.verdict(args.z)} |")


if __name__ == "__main__":
    main()
