"""Exceptions that d2l-memory raises on purpose, so callers can catch them by kind."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

_log = logging.getLogger("d2l_memory")


class D2LMemoryError(Exception):
    """Base class of every error d2l-memory raises on purpose."""


class ModelNotInstalledError(D2LMemoryError, ImportError):
    """A base model or embedder was asked for whose package is not installed."""


class AdapterError(D2LMemoryError, ValueError):
    """An adapter is corrupt, non-finite, or made for another base model or hypernetwork."""


class SchemaVersionError(D2LMemoryError):
    """A memory store was written with another schema version than this d2l-memory reads.

    Attributes:
        found: the version recorded in the store (None for a store that records none).
        expected: the version this d2l-memory reads and writes.
        uri: where the store lives.
    """

    def __init__(self, message: str, *, found: int | None, expected: int, uri: str) -> None:
        super().__init__(message)
        self.found = found
        self.expected = expected
        self.uri = uri


class MemoryNotFoundError(D2LMemoryError, KeyError):
    """No memory with the asked-for id is in the store."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class EngineError(D2LMemoryError, RuntimeError):
    """A generation engine or server failed to start or to answer (the message carries its log or reply)."""


def call_all(callbacks: Iterable[Callable[[list[str]], object]], names: Sequence[str]) -> None:
    """Call every callback with a copy of `names`, even after one fails (each failure is logged), then raise
    the first failure: forgetting must reach every cache and engine that listens."""
    if not names:
        return
    errors: list[BaseException] = []
    for callback in callbacks:
        try:
            callback(list(names))
        except Exception as exc:
            _log.error("erase callback %r failed: %s", callback, exc)
            errors.append(exc)
    if errors:
        raise errors[0]
