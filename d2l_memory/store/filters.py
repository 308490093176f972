"""Every value that reaches a LanceDB `where()` string, checked and quoted here.

Scope ids pass `scope_name`, memory ids `memory_id`, kinds `check_kind` (strict patterns), and are then
quoted by `sql` (quotes doubled), so a hostile id such as `x' OR '1'='1` is rejected with a ValueError and
could not widen a query even if it were not.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TypeVar

from d2l_memory.kinds import KINDS

T = TypeVar("T")

# User, agent and session ids: what ids, emails and slugs use; never a quote, space or backslash.
_NAME = re.compile(r"[A-Za-z0-9_.:@+/=\-]{1,256}")
# Memory ids: uuid4().hex.
_ID = re.compile(r"[0-9a-f]{32}")
IN_CHUNK = 1_000  # ids per `id IN (...)` filter


def scope_name(value: object, field: str) -> str:
    """Check a user/agent/session id against the allowed pattern."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(
            f"{field} {value!r} is not allowed: use 1-256 characters from letters, digits and _ . : @ + / = -"
        )
    return value


def check_id(value: object) -> str:
    """Check a memory id: 32 lowercase hex characters (uuid4().hex)."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ValueError(f"memory id {value!r} is not a 32-character lowercase hex uuid")
    return value


def check_kind(value: object) -> str:
    """Check a memory kind against `kinds.KINDS`."""
    if value not in KINDS:
        raise ValueError(f"kind {value!r} is not one of {', '.join(KINDS)}")
    return str(value)


def sql(value: str) -> str:
    """A SQL string literal. Values are validated before they get here; doubling quotes is the second
    guard, so even an unvalidated value would be matched literally."""
    return "'" + value.replace("'", "''") + "'"


def scope_filter(user_id: str, agent_id: str | None = None, session_id: str | None = None,
                 kind: str | None = None) -> str:
    """The `where` clause of one scope; raises ValueError on an id or kind that is not allowed."""
    parts = [f"user_id = {sql(scope_name(user_id, 'user_id'))}"]
    if agent_id is not None:
        parts.append(f"agent_id = {sql(scope_name(agent_id, 'agent_id'))}")
    if session_id is not None:
        parts.append(f"session_id = {sql(scope_name(session_id, 'session_id'))}")
    if kind is not None:
        parts.append(f"kind = {sql(check_kind(kind))}")
    return " AND ".join(parts)


def ids_filter(ids: Sequence[str]) -> str:
    """`id IN (...)` over checked memory ids (at most `IN_CHUNK` per filter: see `chunks`)."""
    return "id IN (" + ", ".join(sql(check_id(i)) for i in ids) + ")"


def chunks(items: Sequence[T], size: int = IN_CHUNK) -> Iterable[Sequence[T]]:
    """`items` in runs of at most `size`."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
