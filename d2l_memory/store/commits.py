"""Commit conflicts between processes writing one store: LanceDB retries most; one that escapes it is
retried here a bounded number of times, with jittered exponential backoff."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
CONFLICT_RETRIES = 8


def is_conflict(exc: BaseException) -> bool:
    """Whether `exc` is a commit conflict another try may get past."""
    text = str(exc).lower()
    return "conflict" in text or "retryable" in text or "concurrent" in text


def backoff(attempt: int) -> None:
    """Sleep before retry `attempt` (0-based): about 20 ms doubling per attempt, at most a second."""
    time.sleep(min(1.0, 0.02 * 2**attempt) * (0.5 + random.random()))


def retrying(op: Callable[[], T], what: str) -> T:
    """Run `op`, retrying a bounded number of times when a commit conflict escapes LanceDB."""
    for attempt in range(CONFLICT_RETRIES):
        try:
            return op()
        except Exception as exc:
            if attempt == CONFLICT_RETRIES - 1 or not is_conflict(exc):
                raise
            log.info("%s hit a commit conflict (attempt %d), retrying: %s", what, attempt + 1, exc)
            backoff(attempt)
    raise AssertionError("unreachable")
