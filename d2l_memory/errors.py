"""Exceptions that d2l-memory raises on purpose, so callers can catch them by kind."""

from __future__ import annotations


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
