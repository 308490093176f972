"""`D2LStore`: a LangGraph `BaseStore` whose items are d2l-memory memories.

Namespace mapping (one `D2LStore` has a fixed `prefix`, `("memories",)` by default, as LangMem uses):

    (*prefix, user_id)                        -> user_id
    (*prefix, user_id, agent_id)              -> user_id, agent_id
    (*prefix, user_id, agent_id, session_id)  -> user_id, agent_id, session_id

so namespaces follow d2l-memory's own scopes, and LangGraph's prefix search is scope narrowing:
`search(("memories", "alice"))` covers all of Alice's memories, also those an agent absorbed through
`D2LMemoryMiddleware` or `D2LMemory.absorb` (their key is the memory id). A memory with a session but no
agent is listed under `(*prefix, user_id)`. Other namespaces raise `InvalidNamespaceError`; searching
above the user level (e.g. `("memories",)`) is refused, so a search never crosses users.

Items: `put` absorbs the value's text (see `D2LStore`) with the item's key and value kept in the memory's
metadata (`metadata["langgraph"] = {"key", "value"}`); `get` returns the value as put; `search` with a
query is `D2LMemory.recall` (score: cosine similarity), without one the scope's memories newest first;
`delete` is `D2LMemory.forget`. A second `put` of a key absorbs the new value, then forgets the old memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from langgraph.store.base import (
    BaseStore,
    GetOp,
    InvalidNamespaceError,
    Item,
    ListNamespacesOp,
    MatchCondition,
    Op,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
    get_text_at_path,
    tokenize_path,
)
from langgraph.store.base import validate_op_namespace as _validate_labels

from d2l_memory.memory import D2LMemory, MemoryRecord, render_tool_output

META = "langgraph"
SCOPES = ("user_id", "agent_id", "session_id")
_OPERATORS = {
    "$eq": lambda a, b: a == b, "$ne": lambda a, b: a != b,
    "$gt": lambda a, b: a is not None and a > b, "$gte": lambda a, b: a is not None and a >= b,
    "$lt": lambda a, b: a is not None and a < b, "$lte": lambda a, b: a is not None and a <= b,
}


class D2LStore(BaseStore):
    """LangGraph long-term memory store over a `D2LMemory` (namespaces: see the module docstring).

    Args:
        memory: the memories (and the model that absorbs them).
        prefix: the namespace labels before the user id; `()` makes namespaces `(user_id, ...)`.
        fields: value paths whose text is absorbed (LangGraph path syntax, `"content.text"`); a `put`'s
            `index=[...]` overrides them. None: the first of `text`, `content`, `memory` that holds a
            string, else the whole value rendered as `key: value` lines.
        kind: the memory kind of items put here (`document`, `chat` or `tool`).

    `put(..., index=False)` still absorbs the item: every d2l memory has an embedding and an adapter.
    TTLs are not supported.

    Example:
        ```python
        store = D2LStore(memory)
        store.put(("memories", "alice"), "color", {"text": "Alice's favorite color is teal."})
        store.search(("memories", "alice"), query="favorite color?", limit=3)
        agent = create_agent(model, tools, store=store)
        ```
    """

    def __init__(self, memory: D2LMemory, *, prefix: Sequence[str] = ("memories",),
                 fields: Sequence[str] | None = None, kind: str = "document") -> None:
        self.memory = memory
        self.prefix = tuple(prefix)
        self.fields = None if fields is None else [(path, tokenize_path(path)) for path in fields]
        self.kind = kind

    # -- namespaces <-> scopes ------------------------------------------------------------------------
    def _scope(self, namespace: tuple[str, ...], *, search: bool = False) -> dict[str, str]:
        n = len(self.prefix)
        labels = namespace[n:]
        if namespace[:n] != self.prefix or not 1 <= len(labels) <= len(SCOPES):
            where = "search" if search else "namespace"
            raise InvalidNamespaceError(
                f"{where} {namespace!r} does not map to a d2l-memory scope: use {(*self.prefix, 'user_id')!r}, "
                f"optionally followed by an agent id and a session id"
                + ("; searches never cross users" if search and namespace[:n] == self.prefix else ""))
        return dict(zip(SCOPES, labels, strict=False))

    def _namespace(self, record: MemoryRecord) -> tuple[str, ...]:
        scope = (record.user_id, record.agent_id, record.session_id if record.agent_id else None)
        return (*self.prefix, *(label for label in scope if label is not None))

    @staticmethod
    def _key(record: MemoryRecord) -> str:
        return (record.metadata.get(META) or {}).get("key") or record.id

    @staticmethod
    def _value(record: MemoryRecord) -> dict[str, Any]:
        if META in record.metadata:
            return dict(record.metadata[META]["value"])
        value: dict[str, Any] = {"text": record.text, "kind": record.kind}
        return value | ({"metadata": record.metadata} if record.metadata else {})

    def _item(self, record: MemoryRecord, cls: type[Item] = Item, **extra: Any) -> Any:
        return cls(namespace=self._namespace(record), key=self._key(record), value=self._value(record),
                   created_at=record.created_at, updated_at=record.created_at, **extra)

    def _in_scope(self, namespace: tuple[str, ...]) -> list[MemoryRecord]:
        scope = self._scope(namespace)
        return self.memory.list(scope.pop("user_id"), **scope)

    def _find(self, namespace: tuple[str, ...], key: str) -> MemoryRecord | None:
        return next((r for r in self._in_scope(namespace) if self._namespace(r) == namespace and self._key(r) == key),
                    None)

    def _text(self, value: Mapping[str, Any], index: list[str] | None) -> str:
        paths = [(p, tokenize_path(p)) for p in index] if index else self.fields
        if paths:
            texts = [t for _, path in paths for t in get_text_at_path(value, path) if t.strip()]
            if not texts:
                raise ValueError(f"the value has no text at {[p for p, _ in paths]}")
            return "\n".join(texts)
        text = next((value[f] for f in ("text", "content", "memory") if isinstance(value.get(f), str)), None)
        return text if text is not None else render_tool_output(dict(value))

    # -- operations ----------------------------------------------------------------------------------
    def _get(self, op: GetOp) -> Item | None:
        record = self._find(op.namespace, op.key)
        return None if record is None else self._item(record)

    def _put(self, op: PutOp) -> None:
        old = self._find(op.namespace, op.key)
        if op.value is not None:
            scope = self._scope(op.namespace)
            self.memory.absorb(self._text(op.value, op.index or None), scope.pop("user_id"), self.kind,
                               metadata={META: {"key": op.key, "value": dict(op.value)}}, **scope)
        if old is not None:  # after the new memory is durable: a failed put leaves the old item
            self.memory.forget(old.id)

    def _search(self, op: SearchOp) -> list[SearchItem]:
        scope = self._scope(op.namespace_prefix, search=True)
        user_id = scope.pop("user_id")
        if op.query:
            k = op.offset + op.limit if not op.filter else max(1, len(self.memory.list(user_id, **scope)))
            records = self.memory.recall(op.query, user_id, k=max(1, k), **scope)
        else:
            records = self.memory.list(user_id, **scope)
        hits = [r for r in records if not op.filter or _matches(self._value(r), op.filter)]
        return [self._item(r, SearchItem, score=r.score) for r in hits[op.offset : op.offset + op.limit]]

    def _list_namespaces(self, op: ListNamespacesOp) -> list[tuple[str, ...]]:
        namespaces = {(*self.prefix, *(s for s in scope if s is not None)) for scope in _scopes(self.memory)}
        found = [ns for ns in namespaces if all(_matches_path(c, ns) for c in op.match_conditions or ())]
        if op.max_depth is not None:
            found = [ns[: op.max_depth] for ns in found]
        return sorted(set(found))[op.offset : op.offset + op.limit]

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        """Run the operations in order; each is one call into `D2LMemory`."""
        results: list[Result] = []
        for op in ops:
            _validate_labels(op)
            if isinstance(op, GetOp):
                results.append(self._get(op))
            elif isinstance(op, PutOp):
                results.append(self._put(op))
            elif isinstance(op, SearchOp):
                results.append(self._search(op))
            elif isinstance(op, ListNamespacesOp):
                results.append(self._list_namespaces(op))
            else:
                raise TypeError(f"unknown store operation {type(op).__name__}")
        return results

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        """`batch` in a worker thread (absorbing and recalling block for the model's forward passes)."""
        return await asyncio.to_thread(self.batch, list(ops))


def _scopes(memory: D2LMemory) -> set[tuple[str | None, ...]]:
    """Every distinct (user_id, agent_id, session_id) in the memory's store.

    `MemoryStore` has no public listing of users yet, so this reads the three scope columns of its table.
    """
    table = memory.store._table.search().select(list(SCOPES)).to_arrow()
    return set(zip(*(table.column(name).to_pylist() for name in SCOPES), strict=True))


def _matches_path(condition: MatchCondition, namespace: tuple[str, ...]) -> bool:
    path = tuple(condition.path)
    if len(namespace) < len(path):
        return False
    labels = namespace[: len(path)] if condition.match_type == "prefix" else namespace[len(namespace) - len(path) :]
    return all(p in ("*", label) for p, label in zip(path, labels, strict=True))


def _matches(value: Any, condition: Any) -> bool:
    """LangGraph's filter semantics: equality, nested dicts, and `$eq $ne $gt $gte $lt $lte`."""
    if isinstance(condition, Mapping):
        if any(str(k).startswith("$") for k in condition):
            unknown = set(condition) - set(_OPERATORS)
            if unknown:
                raise ValueError(f"unknown filter operators {sorted(unknown)}; expected some of {sorted(_OPERATORS)}")
            try:
                return all(_OPERATORS[op](value, arg) for op, arg in condition.items())
            except TypeError:  # values that do not compare (text against a number) do not match
                return False
        return isinstance(value, Mapping) and all(_matches(value.get(k), v) for k, v in condition.items())
    return value == condition
