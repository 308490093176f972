"""Answer scoring, written once: SQuAD-style normalisation, token F1 and containment.

The meta-training teacher filter, `d2l-memory eval` and every benchmark score answers here. LoCoMo's
official scorer also drops "and" (`LOCOMO_DROPPED`); everything else drops the articles only.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Collection

ARTICLES = ("a", "an", "the")
LOCOMO_DROPPED = (*ARTICLES, "and")


def normalize(text: str, dropped: Collection[str] = ARTICLES) -> str:
    """Lower case, no punctuation, none of the `dropped` words, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    pattern = r"\b(" + "|".join(map(re.escape, dropped)) + r")\b"
    return " ".join(re.sub(pattern, " ", text).split())


def token_f1(prediction: str, gold: str, dropped: Collection[str] = ARTICLES) -> float:
    """Bag-of-tokens F1 between the normalised texts (the paper's and SQuAD's `f1_score`)."""
    pred, ref = normalize(prediction, dropped).split(), normalize(gold, dropped).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def contains(prediction: str, gold: str) -> float:
    """1.0 if the normalised gold answer occurs in the normalised prediction, else 0.0."""
    return float(normalize(gold) in normalize(prediction))


def echoes(prediction: str, source: str, words: int = 8) -> float:
    """1.0 if `words` consecutive normalised words of `source` occur in the prediction, else 0.0: an
    answer that says a memory back instead of answering from it (a value alone is never that long)."""
    pred, src = f" {normalize(prediction)} ", normalize(source).split()
    return float(any(f" {' '.join(src[i : i + words])} " in pred for i in range(len(src) - words + 1)))
