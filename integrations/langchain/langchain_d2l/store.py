"""`D2LStore`: a LangGraph `BaseStore` whose items are d2l-memory memories.

Namespace mapping (one `D2LStore` has a fixed `prefix`, `("memories",)` by default, as LangMem uses):

    (*prefix, user_id)                        -> user_id
    (*prefix, user_id, agent_id)              -> user_id, agent_id
    (*prefix, user_id, agent_id, session_id)  -> user_id, agent_id, session_id

so namespaces follow d2l-memory's own scopes, and LangGraph's prefix search is scope narrowing:
`search(("memories", "alice"))` covers all of Alice's memories, also those an agent absorbed through
`D2LMemoryMiddleware` or `D2LMemory.absorb` (their key is the memory id). A memory with a session but no
agent is listed under `(*prefix, user_id)`. Other namespaces raise `InvalidNamespaceError`; searching
above the user level (e.g. `("memories",)`) is refused, so a search never crosses users. Listing is scoped
the same way: `list_namespaces` needs a `prefix` that names the user (`(*prefix, user_id, ...)`) and lists
that user's namespaces only; a listing of every user (no prefix, a wildcard in the user's place, or only a
suffix) is refused, because which users a store holds is itself another user's data.

Labels: any label LangGraph allows (a non-empty str without `.` or NUL) works. A label made only of d2l's
id characters (letters, digits, `_ : @ + / = -`) is the d2l id as it is; any other (`auth0|abc`, `José`,
`two words`) is stored as `.` + base32 of its UTF-8 bytes, which no LangGraph label can collide with
(LangGraph labels never hold a period) and which reads back as the label. d2l ids hold 256 characters, so
an encoded label holds up to 159 bytes of UTF-8; a longer label is refused on `put` and found nowhere.

Items: `put` absorbs the value's text (see `D2LStore`) with the item's key and value kept in the memory's
metadata (`metadata["langgraph"] = {"key", "value", "fields", "indexed", "created_at"}`); `get` returns
the value as put; `search` with a query ranks by cosine similarity (the best of the item's indexed texts,
as LangGraph scores), without one lists the scope's memories newest first; `delete` forgets every copy of
the item. A second `put` of a key absorbs the new value, then forgets the old memory.

Over a `D2LMemory` opened with `keep_text=False` the value is not kept either (it holds the text the store
drops): such items read back with the empty value `{}`, a filter on their value matches nothing, and the
item's content lives only in its adapter and embedding.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
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
)
from langgraph.store.base import validate_op_namespace as _validate_labels

from d2l_memory import D2LMemory, MemoryRecord, render_tool_output

META = "langgraph"
SCOPES = ("user_id", "agent_id", "session_id")
DEFAULT_FIELDS = ("text", "content", "memory")
# A query search ranks at least this many of the scope's memories by their stored embedding before the
# store re-scores items with several indexed texts by their best text. Their stored embedding is of the
# joined texts, so it under-ranks them (an exact match on one of two fields scored 0.43-0.83 in issue 21's
# check); one is missed only if hundreds of the scope's memories sit closer to the query than its joined texts.
SEARCH_DEPTH = 256
_VECTORS_KEPT = 4096  # per-text embeddings of multi-text items, cached by memory id (memories never change)

# d2l-memory's id characters (`MemoryStore`'s `_NAME`) without the period, which LangGraph labels never hold.
_PLAIN = re.compile(r"[A-Za-z0-9_:@+/=\-]{1,256}")
_ENCODED = re.compile(r"\.([A-Z2-7]+)")
_MAX_ID_CHARS = 256
_OPERATORS = {
    "$eq": lambda a, b: a == b, "$ne": lambda a, b: a != b,
    "$gt": lambda a, b: a is not None and a > b, "$gte": lambda a, b: a is not None and a >= b,
    "$lt": lambda a, b: a is not None and a < b, "$lte": lambda a, b: a is not None and a <= b,
}


class _Unrepresentable(InvalidNamespaceError):
    """A valid LangGraph label that no d2l id can hold (too long): refused on put, empty on reads."""


class D2LStore(BaseStore):
    """LangGraph long-term memory store over a `D2LMemory` (namespaces: see the module docstring).

    Args:
        memory: the memories (and the model that absorbs them).
        prefix: the namespace labels before the user id; `()` makes namespaces `(user_id, ...)`.
        fields: value paths whose text is indexed (LangGraph path syntax, `"content.text"`, `"$"` for the
            whole value as JSON); a `put`'s `index=[...]` overrides them. None: the first of `text`,
            `content`, `memory` that holds a string, else the whole value rendered as `key: value` lines.
        kind: the memory kind of items put here (`document`, `chat` or `tool`).

    Every item is a d2l memory, so every item is absorbed (an adapter and an embedding); the indexed texts,
    joined, are what it absorbs. An item with no text to index (`index=False`, `{}`, `{"text": ""}`) is
    absorbed from its rendered value and marked unindexed: `get`, `search` without a query, `delete` and
    `list_namespaces` see it; `search` with a query skips it, as LangGraph's SQL stores (Postgres, SQLite)
    do with unembedded items. Several indexed texts (several fields, or `[*]` paths) are scored one by one
    and the item gets the best score, as in LangGraph. TTLs are not supported.

    Writers of one key are serialised within the process (a lock per namespace and key, shared by every
    `D2LStore` over the same `D2LMemory`), so concurrent puts leave exactly one item. Across processes, a
    put forgets every older copy of its key once its own is durable, and reads take the newest copy.

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
        self.fields = None if fields is None else list(fields)
        self.kind = kind
        self._locks = _locks_for(memory)
        self._vectors: dict[str, np.ndarray] = {}
        self._vectors_lock = threading.Lock()

    # -- namespaces <-> scopes ------------------------------------------------------------------------
    def _scope(self, namespace: tuple[str, ...], *, search: bool = False) -> dict[str, str]:
        """The d2l scope (encoded ids) of a namespace.

        Raises:
            InvalidNamespaceError: a namespace outside this store's layout, or a search above the user.
            _Unrepresentable: a label too long for a d2l id.
        """
        n = len(self.prefix)
        labels = namespace[n:]
        if namespace[:n] != self.prefix or not 1 <= len(labels) <= len(SCOPES):
            where = "search" if search else "namespace"
            raise InvalidNamespaceError(
                f"{where} {namespace!r} does not map to a d2l-memory scope: use {(*self.prefix, 'user_id')!r}, "
                f"optionally followed by an agent id and a session id"
                + ("; searches never cross users" if search and namespace[:n] == self.prefix else ""))
        return dict(zip(SCOPES, map(_encode_label, labels), strict=False))

    def _labels(self, user_id: str, agent_id: str | None, session_id: str | None) -> tuple[str, ...]:
        # A session without an agent has no namespace of its own (the session label would sit where the
        # agent's goes), so such memories belong to the user's namespace.
        scope = (user_id, agent_id, session_id if agent_id else None)
        return (*self.prefix, *(_decode_label(label) for label in scope if label))

    def _namespace(self, record: MemoryRecord) -> tuple[str, ...]:
        return self._labels(record.user_id, record.agent_id, record.session_id)

    @staticmethod
    def _meta(record: MemoryRecord) -> dict[str, Any] | None:
        meta = record.metadata.get(META)
        return meta if isinstance(meta, dict) and "key" in meta else None

    def _key(self, record: MemoryRecord) -> str:
        meta = self._meta(record)
        return str(meta["key"]) if meta is not None else record.id  # "" is a key like any other

    def _value(self, record: MemoryRecord) -> dict[str, Any]:
        meta = self._meta(record)
        if meta is not None:
            return dict(meta.get("value") or {})  # no value: the memory keeps no text (keep_text=False)
        value: dict[str, Any] = {"text": record.text, "kind": record.kind}
        return value | ({"metadata": record.metadata} if record.metadata else {})

    def _item(self, record: MemoryRecord, cls: type[Item] = Item, **extra: Any) -> Any:
        meta = self._meta(record) or {}
        return cls(namespace=self._namespace(record), key=self._key(record), value=self._value(record),
                   created_at=meta.get("created_at") or record.created_at, updated_at=record.created_at, **extra)

    def _copies(self, namespace: tuple[str, ...], key: str) -> list[MemoryRecord]:
        """Every memory holding the item, newest first (more than one only while writers race)."""
        scope = self._scope(namespace)
        records = self.memory.list(scope.pop("user_id"), **scope)
        return [r for r in records if self._namespace(r) == namespace and self._key(r) == key]

    # -- what an item absorbs and indexes -------------------------------------------------------------
    def _texts(self, value: Mapping[str, Any], fields: Sequence[str] | None) -> list[str]:
        """The value's texts to index, one per field (and array element), blank ones left out."""
        if fields is not None:
            return [t for path in fields for t in get_text_at_path(value, path) if t.strip()]
        field = next((f for f in DEFAULT_FIELDS if isinstance(value.get(f), str)), None)
        text = value[field] if field is not None else render_tool_output(dict(value))
        return [text] if text.strip() else []

    def _entry(self, op: PutOp, created_at: str | None) -> tuple[str, dict[str, Any]]:
        """The text to absorb for a put, and the metadata that makes the memory an item."""
        value = dict(op.value or {})
        fields = list(op.index) if isinstance(op.index, list | tuple) else self.fields
        texts = [] if op.index is False else self._texts(value, fields)
        if texts:
            text = "\n".join(texts)
        else:  # absorb needs text: an unindexed item is absorbed as its value, and never searched by it
            text = "\n".join(self._texts(value, None)) or json.dumps(value, ensure_ascii=False, sort_keys=True)
        meta = {"key": op.key, "fields": fields, "indexed": bool(texts), "created_at": created_at}
        if self.memory.keep_text:  # the value holds the text that keep_text=False drops
            meta["value"] = value
        return text, meta

    def _best_scores(self, query: str, records: list[MemoryRecord]) -> dict[str, float]:
        """Scores of the items with several indexed texts: the best cosine of the query with each text,
        as LangGraph scores a multi-field item (their memory's own embedding is of the joined texts)."""
        several: dict[str, list[str]] = {}
        for record in records:
            meta = self._meta(record)
            if meta is not None and meta.get("indexed", True) and "value" in meta:
                texts = self._texts(meta["value"], meta.get("fields"))
                if len(texts) > 1:
                    several[record.id] = texts
        if not several:
            return {}
        with self._vectors_lock:
            missing = [i for i in several if i not in self._vectors]
        if missing:
            vectors = self.memory.embed([t for i in missing for t in several[i]])
            with self._vectors_lock:
                start = 0
                for i in missing:
                    if len(self._vectors) >= _VECTORS_KEPT:
                        self._vectors.pop(next(iter(self._vectors)))
                    self._vectors[i] = vectors[start : start + len(several[i])]
                    start += len(several[i])
        q = self.memory.embed([query])[0]
        with self._vectors_lock:
            return {i: float(np.max(self._vectors[i] @ q)) for i in several if i in self._vectors}

    # -- operations ----------------------------------------------------------------------------------
    def _get(self, op: GetOp) -> Item | None:
        try:
            copies = self._copies(op.namespace, op.key)
        except _Unrepresentable:
            return None
        return self._item(copies[0]) if copies else None

    def _put(self, op: PutOp) -> None:
        if op.value is None:
            self._delete(op)
            return
        scope = self._scope(op.namespace)  # an invalid namespace raises before any work
        with self._locks.hold((op.namespace, op.key)):
            copies = self._copies(op.namespace, op.key)
            created = self._item(copies[0]).created_at.isoformat() if copies else None
            text, meta = self._entry(op, created)
            new = self.memory.absorb(text, scope.pop("user_id"), self.kind, metadata={META: meta}, **scope)
            # After the new memory is durable (a failed put leaves the old item): forget the copies seen
            # above and any a writer in another process committed meanwhile, but only older ones; a newer
            # copy's writer forgets this one, so racing processes converge on the newest.
            later = self._copies(op.namespace, op.key)
            mine = next((r for r in later if r.id == new.id), new)  # as stored: compare like with like
            for record in later:
                if record.id != mine.id and (record.created_at, record.id) < (mine.created_at, mine.id):
                    self.memory.forget(record.id, user_id=record.user_id)

    def _delete(self, op: PutOp) -> None:
        try:
            self._scope(op.namespace)
        except _Unrepresentable:
            return
        with self._locks.hold((op.namespace, op.key)):
            copies = self._copies(op.namespace, op.key)  # every copy: a deleted key never reads back
            if copies:
                self.memory.forget([r.id for r in copies], user_id=copies[0].user_id)

    def _search(self, op: SearchOp) -> list[SearchItem]:
        try:
            scope = self._scope(op.namespace_prefix, search=True)
        except _Unrepresentable:
            return []
        user_id = scope.pop("user_id")
        query = op.query if op.query and op.query.strip() else None
        want = op.offset + op.limit
        if query is None:
            hits = self._ranked(self.memory.list(user_id, **scope), op.filter, None)
            return hits[op.offset : want]
        total = self.memory.count(user_id)  # an upper bound of the scope's size
        if total == 0:
            return []
        depth = total if op.filter else min(total, max(want, SEARCH_DEPTH))
        while True:
            hits = self._ranked(self.memory.recall(query, user_id, k=depth, **scope), op.filter, query)
            if len(hits) >= want or depth >= total:  # unindexed items and stale copies thinned the ranks
                return hits[op.offset : want]
            depth = total

    def _ranked(self, records: list[MemoryRecord], condition: Mapping[str, Any] | None,
                query: str | None) -> list[SearchItem]:
        """Items from memories: one per (namespace, key), its newest copy; filtered; with a query, the
        indexed ones best first, else in the given (newest first) order."""
        newest: dict[tuple[tuple[str, ...], str], MemoryRecord] = {}
        for record in records:
            if query is not None and not (self._meta(record) or {}).get("indexed", True):
                continue
            if condition and not _matches(self._value(record), condition):
                continue
            slot = (self._namespace(record), self._key(record))
            if slot not in newest or (record.created_at, record.id) > (newest[slot].created_at, newest[slot].id):
                newest[slot] = record
        kept = sorted(newest.values(), key=lambda r: (r.created_at, r.id), reverse=True)
        if query is None:
            return [self._item(r, SearchItem) for r in kept]
        best = self._best_scores(query, kept)
        scored = [(best.get(r.id, r.score), r) for r in kept]
        scored.sort(key=lambda pair: -1.0 if pair[0] is None else pair[0], reverse=True)
        return [self._item(r, SearchItem, score=score) for score, r in scored]

    def _list_namespaces(self, op: ListNamespacesOp) -> list[tuple[str, ...]]:
        try:
            user_id = self._listed_user(op.match_conditions or ())
        except _Unrepresentable:
            return []
        namespaces = {self._namespace(record) for record in self.memory.list(user_id)}
        found = [ns for ns in namespaces if all(_matches_path(c, ns) for c in op.match_conditions or ())]
        if op.max_depth is not None:
            found = [ns[: op.max_depth] for ns in found]
        return sorted(set(found))[op.offset : op.offset + op.limit]

    def _listed_user(self, conditions: Sequence[MatchCondition]) -> str:
        """The d2l user id a listing is scoped to: the user label of a prefix condition that names it.

        Raises:
            InvalidNamespaceError: no prefix condition names one user (a listing would cross users).
            _Unrepresentable: a user label too long for a d2l id.
        """
        n = len(self.prefix)
        for condition in conditions:
            path = tuple(condition.path)
            if condition.match_type == "prefix" and path[:n] == self.prefix and len(path) > n and path[n] != "*":
                return _encode_label(path[n])
        raise InvalidNamespaceError(
            f"list_namespaces lists one user's namespaces: pass prefix={(*self.prefix, 'user_id')!r} (optionally "
            "with more labels, a suffix or max_depth); a listing never crosses users")

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        """Run the operations in order; each is one call into `D2LMemory`.

        Raises:
            InvalidNamespaceError: a label LangGraph refuses (empty, not a str, a period or NUL), a
                namespace given as one str, or one outside this store's layout (see the module docstring).
        """
        results: list[Result] = []
        for op in map(_normalised, ops):
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


# -- labels <-> d2l ids ------------------------------------------------------------------------------
def _encode_label(label: str) -> str:
    """The d2l id of a namespace label: the label itself when d2l allows it, else `.` + base32(UTF-8)."""
    if _PLAIN.fullmatch(label):
        return label
    try:
        raw = label.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidNamespaceError(f"namespace label {label!r} is not valid Unicode: {exc}") from exc
    encoded = "." + base64.b32encode(raw).decode("ascii").rstrip("=")
    if len(encoded) > _MAX_ID_CHARS:
        raise _Unrepresentable(f"namespace label {label[:40]!r}... is too long for D2LStore: d2l ids hold "
                               f"{_MAX_ID_CHARS} characters, which is 159 bytes of UTF-8 once encoded")
    return encoded


def _decode_label(name: str) -> str:
    """The namespace label of a d2l id (ids absorbed outside the store come back unchanged)."""
    match = _ENCODED.fullmatch(name)
    if match is None:
        return name
    try:
        label = base64.b32decode(match[1] + "=" * (-len(match[1]) % 8)).decode("utf-8")
    except (binascii.Error, ValueError):
        return name
    # only a canonical encoding is one: an id that merely looks like base32 stays itself
    return label if "." not in label and _encode_label(label) == name else name


def _normalised(op: Op) -> Op:
    """Namespaces as tuples (LangGraph's type; lists arrive from JSON and are taken as the same path).

    Raises:
        InvalidNamespaceError: a namespace given as one str, which would be read as one label per character.
    """
    def path(labels: Any) -> tuple[Any, ...]:
        if isinstance(labels, str | bytes):
            raise InvalidNamespaceError(f"a namespace is a tuple of str labels, got the string {labels!r}: "
                                        f"write ({labels!r},)")
        return tuple(labels)

    if isinstance(op, GetOp | PutOp):
        return op._replace(namespace=path(op.namespace))
    if isinstance(op, SearchOp):
        return op._replace(namespace_prefix=path(op.namespace_prefix))
    if isinstance(op, ListNamespacesOp) and op.match_conditions:
        return op._replace(match_conditions=tuple(c._replace(path=path(c.path)) for c in op.match_conditions))
    return op


# -- one lock per key being written ---------------------------------------------------------------------
class _KeyLocks:
    """A lock per (namespace, key) while some writer holds or awaits it; then it is dropped."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[tuple[tuple[str, ...], str], tuple[threading.Lock, list[int]]] = {}

    @contextmanager
    def hold(self, slot: tuple[tuple[str, ...], str]) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.setdefault(slot, (threading.Lock(), [0]))
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._guard:
                users[0] -= 1
                if not users[0]:
                    del self._locks[slot]


_LOCKS: weakref.WeakKeyDictionary[D2LMemory, _KeyLocks] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _locks_for(memory: D2LMemory) -> _KeyLocks:
    """The key locks of a memory, shared by all its stores (two stores over one memory write one table)."""
    with _LOCKS_GUARD:
        locks = _LOCKS.get(memory)
        if locks is None:
            locks = _LOCKS[memory] = _KeyLocks()
        return locks


# -- LangGraph's namespace conditions and filters -------------------------------------------------------
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

