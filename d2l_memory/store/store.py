"""`MemoryStore`: memories (row + embedding + adapter) in LanceDB, scoped per user, shared by processes.

One memory is one row of the `memories` table (`schema.MemoryRow`): its scope (user, agent, session),
kind, source text (optional), a 384-d embedding, and the adapter's safetensors bytes in a blob column
with their sha256. A row and its adapter go in by one `table.add`, i.e. one Lance commit: after a crash
either both are there or neither is.

Where the store lives: `uri` is whatever `lancedb.connect` takes, a local directory by default. The
same code opens object storage (`s3://bucket/prefix`, `gs://`, `az://`, credentials from the usual
environment or `connect_options={"storage_options": {...}}`) and LanceDB Cloud (`db://name` with
`connect_options={"api_key": ..., "region": ...}`): that is how a store outgrows one machine.

Safety rules kept here:
- Every value that reaches a `where()` string passes `_scope_name` / `_memory_id` / the kind check
  (strict patterns) and is then quoted by `_sql` (quotes doubled), so a hostile id such as
  `x' OR '1'='1` is rejected with a ValueError and could not widen a query even if it were not.
- Every search is pre-filtered by scope, and every hit is checked against the scope before returning.
- Adapters are checked on read (`get_adapter`): sha256, safetensors parse, finite values, shapes, base
  model and hypernetwork; any mismatch raises `AdapterError`.
- Commit conflicts between processes are retried by LanceDB; one that escapes is retried here a bounded
  number of times, re-checking which rows already landed so that no add is duplicated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import lancedb
import numpy as np
from lancedb.index import FTS, BTree, IvfFlat
from lancedb.query import MatchQuery

from d2l_memory.embedder import EMBEDDING_DIM, Embedder
from d2l_memory.errors import AdapterError, D2LMemoryError, MemoryNotFoundError, SchemaVersionError, call_all
from d2l_memory.kinds import KINDS, Kind
from d2l_memory.lora import LoRA
from d2l_memory.store.schema import (
    MEMORIES_TABLE,
    META_TABLE,
    MIGRATIONS,
    RECORD_COLUMNS,
    SCHEMA_VERSION,
    VERSION_KEY,
    MemoryInput,
    MemoryRow,
    MetaRow,
    StoredMemory,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
# Aliases for signatures inside MemoryStore, whose `list` method would shadow the builtin there.
_Ids = list[str]
_Rows = list[dict[str, Any]]
_Hits = list[tuple[dict[str, Any], float]]
_Memories = list[StoredMemory]
EraseCallback = Callable[[list[str]], None]

# User, agent and session ids: what ids, emails and slugs use; never a quote, space or backslash.
_NAME = re.compile(r"[A-Za-z0-9_.:@+/=\-]{1,256}")
# Memory ids: uuid4().hex.
_ID = re.compile(r"[0-9a-f]{32}")

INDEX_THRESHOLD = 5_000  # rows before the ANN and scalar indices are built (IVF_FLAT works at any size)
# A scope (one user's memories, say) up to this size is searched exactly, bypassing the ANN index: at 100k
# memories a flat scan of 100-2,000 pre-filtered rows was faster than the index (12 vs 14 ms p50) and found
# the true top 5, where IVF's partition probing missed 17-24 % of them (docs/benchmarks.md, memory store).
EXACT_SEARCH_ROWS = 10_000
# Counting a scope costs 1-4 ms for a user with 100 memories but 20-40 ms for one with 100k, so a count is
# reused this long; a stale one can only pick the other plan, never widen the scope.
_SCOPE_COUNT_TTL_S = 60.0
_SCOPE_COUNTS_KEPT = 10_000
RETRAIN_GROWTH = 4  # optimize() retrains the vector index once the table is this many times larger
_INDEX_ROWS_KEY = "vector_index_rows"
_CONFLICT_RETRIES = 8
_IN_CHUNK = 1_000  # ids per `id IN (...)` filter
_RRF_K = 60  # reciprocal rank fusion constant (the usual one)
_STABLE_ROW_IDS = {"new_table_enable_stable_row_ids": "true"}  # blob fetches by row id survive compaction


# -- values that reach SQL ---------------------------------------------------------------------------
def _scope_name(value: object, field: str) -> str:
    """Check a user/agent/session id against the allowed pattern."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(
            f"{field} {value!r} is not allowed: use 1-256 characters from letters, digits and _ . : @ + / = -"
        )
    return value


def _memory_id(value: object) -> str:
    """Check a memory id: 32 lowercase hex characters (uuid4().hex)."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ValueError(f"memory id {value!r} is not a 32-character lowercase hex uuid")
    return value


def _kind(value: object) -> str:
    if value not in KINDS:
        raise ValueError(f"kind {value!r} is not one of {', '.join(KINDS)}")
    return str(value)


def _sql(value: str) -> str:
    """A SQL string literal. Values are validated before they get here; doubling quotes is the second
    guard, so even an unvalidated value would be matched literally."""
    return "'" + value.replace("'", "''") + "'"


def _scope_filter(user_id: str, agent_id: str | None = None, session_id: str | None = None,
                  kind: str | None = None) -> str:
    parts = [f"user_id = {_sql(_scope_name(user_id, 'user_id'))}"]
    if agent_id is not None:
        parts.append(f"agent_id = {_sql(_scope_name(agent_id, 'agent_id'))}")
    if session_id is not None:
        parts.append(f"session_id = {_sql(_scope_name(session_id, 'session_id'))}")
    if kind is not None:
        parts.append(f"kind = {_sql(_kind(kind))}")
    return " AND ".join(parts)


def _ids_filter(ids: Sequence[str]) -> str:
    return "id IN (" + ", ".join(_sql(_memory_id(i)) for i in ids) + ")"


def _chunks(items: Sequence[T], size: int = _IN_CHUNK) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# -- commit conflicts --------------------------------------------------------------------------------
def _is_conflict(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "conflict" in text or "retryable" in text or "concurrent" in text


def _backoff(attempt: int) -> None:
    time.sleep(min(1.0, 0.02 * 2**attempt) * (0.5 + random.random()))


def _retrying(op: Callable[[], T], what: str) -> T:
    """Run `op`, retrying a bounded number of times when a commit conflict escapes LanceDB."""
    for attempt in range(_CONFLICT_RETRIES):
        try:
            return op()
        except Exception as exc:
            if attempt == _CONFLICT_RETRIES - 1 or not _is_conflict(exc):
                raise
            log.info("%s hit a commit conflict (attempt %d), retrying: %s", what, attempt + 1, exc)
            _backoff(attempt)
    raise AssertionError("unreachable")


def _as_vector(value: Any) -> np.ndarray:
    vector = np.asarray(value, dtype=np.float32).reshape(-1)
    if vector.shape != (EMBEDDING_DIM,):
        raise ValueError(f"an embedding must have {EMBEDDING_DIM} values, got {vector.size}")
    if not np.isfinite(vector).all() or not np.any(vector):
        raise ValueError("an embedding must be finite and not all zeros")
    return vector


class MemoryStore:
    """Memories with their adapters in one LanceDB database, scoped by user (and agent, session, kind).

    Args:
        uri: a local directory (created if missing), or any URI `lancedb.connect` opens (`s3://...`,
            `db://...`): see the module docstring.
        keep_text: store each memory's source text (default). With False the text is only embedded
            and then dropped: recall works through embeddings and adapters, hybrid search does not.
        embedder: computes embeddings for text; a MiniLM `Embedder` is loaded on first use if None.
        index_threshold: table size at which the ANN index (IVF_FLAT, cosine) and the scalar indices on
            `user_id` and `id` are built. Below it, and for any scope of at most `EXACT_SEARCH_ROWS`
            memories, searches are exact scans of the scope's rows; larger scopes use the ANN index.
        read_consistency_interval: how stale a read may be relative to other processes' writes.
            `timedelta(0)` (default) checks for new versions before every read; None never does.
        migrate: migrate an older store in place when `schema.MIGRATIONS` has the steps.
        connect_options: extra keyword arguments for `lancedb.connect` (api_key, region,
            storage_options, ...).

    Raises:
        SchemaVersionError: the store was written with another schema version (the message says what
            to do).
    """

    def __init__(
        self,
        uri: str | Path,
        *,
        keep_text: bool = True,
        embedder: Embedder | None = None,
        index_threshold: int = INDEX_THRESHOLD,
        read_consistency_interval: timedelta | None = timedelta(0),
        migrate: bool = False,
        connect_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.uri = str(uri)
        self.keep_text = keep_text
        self.index_threshold = int(index_threshold)
        self._embedder = embedder
        self._erase_callbacks: list[EraseCallback] = []
        self._indexed = False
        self._has_fts = False
        self._scope_counts: dict[str, tuple[float, int]] = {}  # where -> (when counted, rows)
        self._db = lancedb.connect(self.uri, read_consistency_interval=read_consistency_interval,
                                   **dict(connect_options or {}))
        self._meta = self._open_meta(migrate)
        self._tbl: Any = _retrying(
            lambda: self._db.create_table(MEMORIES_TABLE, schema=MemoryRow, exist_ok=True,
                                          storage_options=dict(_STABLE_ROW_IDS)),
            "opening the memories table")

    # -- opening and versions ------------------------------------------------------------------------
    def _table_names(self) -> set[str]:
        names: set[str] = set()
        token = None
        while True:
            page = self._db.list_tables(page_token=token)
            names.update(page.tables)
            token = page.page_token
            if not token:
                return names

    def _open_meta(self, migrate: bool) -> Any:
        names = self._table_names()
        if META_TABLE not in names and MEMORIES_TABLE in names:
            raise SchemaVersionError(
                f"The store at {self.uri} has a '{MEMORIES_TABLE}' table but no schema version, so it was "
                f"not written by d2l-memory (this release reads schema version {SCHEMA_VERSION}). Use "
                "another directory, or move that one away.",
                found=None, expected=SCHEMA_VERSION, uri=self.uri)
        first = [{"key": VERSION_KEY, "value": str(SCHEMA_VERSION)}]  # written only if the table is new
        meta = _retrying(lambda: self._db.create_table(META_TABLE, data=first, schema=MetaRow, exist_ok=True),
                         "opening the meta table")
        found = self._read_version(meta)
        if found == SCHEMA_VERSION:
            return meta
        steps = list(range(found, SCHEMA_VERSION)) if found < SCHEMA_VERSION else []
        if steps and migrate and all(v in MIGRATIONS for v in steps):
            for version in steps:
                log.warning("migrating the store at %s from schema version %d to %d", self.uri, version,
                            version + 1)
                MIGRATIONS[version](self._db)
                self._set_meta(meta, VERSION_KEY, str(version + 1))
            return meta
        if found > SCHEMA_VERSION:
            todo = "Upgrade d2l-memory (pip install -U d2l-memory) to open it."
        elif steps and all(v in MIGRATIONS for v in steps):
            todo = "Back it up, then open it with MemoryStore(uri, migrate=True) to migrate it in place."
        else:
            todo = ("No migration to this version exists: open it with the d2l-memory release that wrote it, "
                    "or re-add its memories to a new store.")
        raise SchemaVersionError(
            f"The store at {self.uri} has schema version {found}; this d2l-memory reads schema version "
            f"{SCHEMA_VERSION}. {todo}",
            found=found, expected=SCHEMA_VERSION, uri=self.uri)

    def _read_version(self, meta: Any) -> int:
        rows = meta.search().where(f"key = {_sql(VERSION_KEY)}").select(["value"]).to_arrow().to_pylist()
        values = {row["value"] for row in rows}
        if len(values) != 1 or not next(iter(values)).isdigit():
            raise SchemaVersionError(
                f"The store at {self.uri} records schema version {sorted(values) or 'nothing'}, which is not "
                f"one version number; this d2l-memory reads schema version {SCHEMA_VERSION}.",
                found=None, expected=SCHEMA_VERSION, uri=self.uri)
        return int(values.pop())

    def _get_meta(self, key: str) -> str | None:
        rows = self._meta.search().where(f"key = {_sql(key)}").select(["value"]).to_arrow().to_pylist()
        return rows[-1]["value"] if rows else None

    @staticmethod
    def _set_meta(meta: Any, key: str, value: str) -> None:
        _retrying(lambda: meta.merge_insert("key").when_matched_update_all().when_not_matched_insert_all()
                  .execute([{"key": key, "value": value}]), f"writing {key}")

    @staticmethod
    def validate_scope(*, user_id: str, agent_id: str | None = None, session_id: str | None = None,
                       kind: str | None = None) -> None:
        """Check scope values the way every store operation does, without touching the store (e.g. before
        spending seconds on an adapter that could then not be stored).

        Raises:
            ValueError: a user/agent/session id outside the allowed pattern, or an unknown kind.
        """
        _scope_filter(user_id, agent_id, session_id, kind)

    @property
    def _table(self) -> Any:
        if self._tbl is None:
            raise D2LMemoryError("this MemoryStore is closed")
        return self._tbl

    @property
    def embedder(self) -> Embedder:
        """The embedder, loaded on first use."""
        if self._embedder is None:
            self._embedder = Embedder()
        return self._embedder

    # -- writing -------------------------------------------------------------------------------------
    def add(
        self,
        user_id: str,
        adapter: LoRA,
        *,
        text: str | None = None,
        vector: Sequence[float] | np.ndarray | None = None,
        kind: Kind = "document",
        agent_id: str | None = None,
        session_id: str | None = None,
        n_tokens: int = 0,
        metadata: Mapping[str, Any] | None = None,
    ) -> StoredMemory:
        """Store one memory: its row and its adapter in one commit.

        Args:
            user_id: whose memory it is (and agent_id, session_id: narrower scopes, optional).
            adapter: the LoRA that holds the memory; checked finite before it is written.
            text: the source text, embedded when no vector is given (dropped if keep_text=False).
            vector: a 384-d embedding, used as given.
            kind: `document`, `chat` or `tool`.
            n_tokens: the source's length in base-model tokens.
            metadata: a JSON-serialisable mapping.

        Raises:
            ValueError: a scope id or kind that is not allowed, neither text nor vector, a bad vector,
                or metadata that is not JSON.
            AdapterError: an adapter with NaN or infinite values.
        """
        memory = MemoryInput(user_id=user_id, adapter=adapter, text=text, vector=vector, kind=kind,
                             agent_id=agent_id, session_id=session_id, n_tokens=n_tokens,
                             metadata=dict(metadata or {}))
        return self.add_many([memory])[0]

    def add_many(self, memories: Sequence[MemoryInput]) -> _Memories:
        """Store several memories in one commit (all or none). Same checks as `add`."""
        memories = list(memories)
        if not memories:
            return []
        vectors: list[np.ndarray | None] = []
        metadata: list[str] = []
        for memory in memories:
            _scope_name(memory.user_id, "user_id")
            for field in ("agent_id", "session_id"):
                if getattr(memory, field) is not None:
                    _scope_name(getattr(memory, field), field)
            _kind(memory.kind)
            try:
                metadata.append(json.dumps(memory.metadata, sort_keys=True, allow_nan=False))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"metadata must be JSON-serialisable: {exc}") from exc
            if memory.text is None and memory.vector is None:
                raise ValueError("a memory needs text or a vector to be found again")
            memory.adapter.validate()
            vectors.append(None if memory.vector is None else _as_vector(memory.vector))
        missing = [i for i, v in enumerate(vectors) if v is None]
        if missing:
            embedded = self.embedder.embed([memories[i].text or "" for i in missing])
            for i, vector in zip(missing, embedded, strict=True):
                vectors[i] = _as_vector(vector)

        now = datetime.now(UTC)
        rows = []
        for memory, vector, meta in zip(memories, vectors, metadata, strict=True):
            blob = memory.adapter.to_bytes()
            rows.append({
                "id": uuid.uuid4().hex, "user_id": memory.user_id, "agent_id": memory.agent_id,
                "session_id": memory.session_id, "kind": memory.kind,
                "text": memory.text if self.keep_text else None, "vector": vector, "adapter": blob,
                "adapter_sha256": hashlib.sha256(blob).hexdigest(), "rank": memory.adapter.rank,
                "n_chunks": memory.adapter.n_chunks, "base_model": memory.adapter.base_model,
                "hypernet": memory.adapter.hypernet, "n_tokens": memory.n_tokens, "created_at": now,
                "metadata": meta,
            })
        self._commit(rows)
        self._maybe_index()
        return [StoredMemory.from_row(row) for row in rows]

    def _commit(self, rows: _Rows) -> None:
        """Append rows in one commit; after an escaped conflict, re-add only the rows that did not land."""
        pending = rows
        for attempt in range(_CONFLICT_RETRIES):
            try:
                self._table.add(pending)
                return
            except Exception as exc:
                if attempt == _CONFLICT_RETRIES - 1 or not _is_conflict(exc):
                    raise
                log.info("add hit a commit conflict (attempt %d), retrying: %s", attempt + 1, exc)
                _backoff(attempt)
                landed = self.existing([row["id"] for row in pending])
                pending = [row for row in pending if row["id"] not in landed]
                if not pending:
                    return

    def existing(self, memory_ids: Sequence[str]) -> set[str]:
        """Which of `memory_ids` are stored: one `id IN (...)` query per 1,000 ids (composed adapters are
        checked against it on every cache hit).

        Raises:
            ValueError: an id that is not a uuid hex string.
        """
        found: set[str] = set()
        for chunk in _chunks([_memory_id(i) for i in memory_ids]):
            table = self._table.search().where(_ids_filter(chunk)).select(["id"]).to_arrow()
            found.update(table.column("id").to_pylist())
        return found

    # -- reading -------------------------------------------------------------------------------------
    def _rows(self, where: str, columns: Sequence[str], *, row_addr: bool = False) -> _Rows:
        query = self._table.search().where(where)
        if row_addr:
            query = query.with_row_address(True)
            columns = [*columns, "_rowaddr"]
        return query.select(columns).to_arrow().to_pylist()

    def get(self, memory_id: str) -> StoredMemory | None:
        """The memory with this id, or None.

        Raises:
            ValueError: an id that is not a uuid hex string.
        """
        rows = self._rows(f"id = {_sql(_memory_id(memory_id))}", RECORD_COLUMNS)
        return StoredMemory.from_row(rows[0]) if rows else None

    def list(
        self,
        user_id: str,
        *,
        agent_id: str | None = None,
        session_id: str | None = None,
        kind: Kind | None = None,
        limit: int | None = None,
    ) -> _Memories:
        """Memories in a scope, newest first (at most `limit`).

        Raises:
            ValueError: a scope id or kind that is not allowed.
        """
        rows = self._rows(_scope_filter(user_id, agent_id, session_id, kind), RECORD_COLUMNS)
        rows.sort(key=lambda row: (row["created_at"], row["id"]), reverse=True)
        return [StoredMemory.from_row(row) for row in rows[:limit]]

    def count(self, user_id: str | None = None) -> int:
        """Number of memories, of one user or of the whole store."""
        where = None if user_id is None else _scope_filter(user_id)
        return int(self._table.count_rows(where))

    def search(
        self,
        query: str | Sequence[float] | np.ndarray,
        user_id: str,
        *,
        k: int = 5,
        agent_id: str | None = None,
        session_id: str | None = None,
        kind: Kind | None = None,
        hybrid: bool = False,
    ) -> _Memories:
        """The `k` memories nearest to a query, always pre-filtered to the scope.

        Args:
            query: text (embedded here) or a 384-d embedding.
            user_id: whose memories; with `agent_id`, `session_id` and `kind` the scope: only memories
                inside it are considered.
            k: how many to return.
            hybrid: fuse full-text (BM25) and vector results with reciprocal rank fusion; needs the
                query as text and a store that keeps text. The full-text index is built on first use.

        Returns:
            Records with `score` set, best first (cosine similarity, or the fusion score if hybrid).

        Raises:
            ValueError: a scope id or kind that is not allowed, a bad k or vector, or hybrid without text.
        """
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        where = _scope_filter(user_id, agent_id, session_id, kind)
        text = query if isinstance(query, str) else None
        vector = _as_vector(self.embedder.embed([text])[0] if text is not None else query)
        if not hybrid:
            hits = [(row, 1.0 - row["_distance"]) for row in self._vector_rows(vector, where, k)]
        else:
            if text is None:
                raise ValueError("hybrid search needs the query as text")
            if not self.keep_text:
                raise ValueError("hybrid search needs stored text, and this store was opened with "
                                 "keep_text=False")
            hits = self._hybrid_rows(text, vector, where, k)
        for row, _ in hits:  # the pre-filter is the rule; this makes a breach loud instead of silent
            if row["user_id"] != user_id or (agent_id is not None and row["agent_id"] != agent_id) or (
                    session_id is not None and row["session_id"] != session_id) or (
                    kind is not None and row["kind"] != kind):
                raise D2LMemoryError(f"search returned memory {row['id']} outside the requested scope")
        return [StoredMemory.from_row(row, score=float(score)) for row, score in hits]

    def _vector_query(self, vector: np.ndarray, where: str) -> Any:
        query = self._table.search(vector, vector_column_name="vector").distance_type("cosine")
        if self._table.count_rows() <= EXACT_SEARCH_ROWS or self._scope_count(where) <= EXACT_SEARCH_ROWS:
            query = query.bypass_vector_index()
        return query.where(where, prefilter=True)

    def _scope_count(self, where: str) -> int:
        now = time.monotonic()
        cached = self._scope_counts.get(where)
        if cached is None or now - cached[0] > _SCOPE_COUNT_TTL_S:
            if len(self._scope_counts) >= _SCOPE_COUNTS_KEPT:
                self._scope_counts.clear()
            cached = self._scope_counts[where] = (now, self._table.count_rows(where))
        return cached[1]

    def _vector_rows(self, vector: np.ndarray, where: str, limit: int) -> _Rows:
        return (self._vector_query(vector, where).limit(limit).select([*RECORD_COLUMNS, "_distance"])
                .to_arrow().to_pylist())

    def _hybrid_rows(self, text: str, vector: np.ndarray, where: str, k: int) -> _Hits:
        self._ensure_fts()
        depth = max(2 * k, 20)
        by_vector = self._vector_rows(vector, where, depth)
        by_text = (self._table.search(MatchQuery(text, "text"), query_type="fts").where(where, prefilter=True)
                   .limit(depth).select([*RECORD_COLUMNS, "_score"]).to_arrow().to_pylist())
        fused: dict[str, float] = {}
        rows: dict[str, dict[str, Any]] = {}
        for ranked in (by_vector, by_text):
            for rank, row in enumerate(ranked):
                fused[row["id"]] = fused.get(row["id"], 0.0) + 1.0 / (_RRF_K + rank + 1)
                rows.setdefault(row["id"], row)
        best = sorted(fused, key=lambda i: fused[i], reverse=True)[:k]
        return [(rows[i], fused[i]) for i in best]

    # -- adapters ------------------------------------------------------------------------------------
    def get_adapter(
        self,
        memory_id: str,
        *,
        base_model: str | None,
        hypernet: str | None,
        shapes: Mapping[str, tuple[int, int]] | None = None,
    ) -> LoRA:
        """Read one memory's adapter and check it before anyone composes it.

        Args:
            memory_id: the memory.
            base_model: the model it will be applied to (None skips this check, on purpose only).
            hypernet: the checksum of the hypernetwork it must come from (None skips this check).
            shapes: the model's `(d_out, d_in)` per module (None skips the shape check).

        Raises:
            MemoryNotFoundError: no such memory.
            AdapterError: checksum mismatch, unparsable bytes, NaN/inf, wrong shapes, another base model
                or hypernetwork, or a rank that differs from the row's.
        """
        adapters = self.get_adapters([memory_id], base_model=base_model, hypernet=hypernet, shapes=shapes)
        return adapters[memory_id]

    def get_adapters(
        self,
        memory_ids: Sequence[str],
        *,
        base_model: str | None,
        hypernet: str | None,
        shapes: Mapping[str, tuple[int, int]] | None = None,
    ) -> dict[str, LoRA]:
        """`get_adapter` for several memories with one blob fetch; same checks, same errors."""
        ids = [_memory_id(i) for i in memory_ids]
        rows: dict[str, dict[str, Any]] = {}
        for chunk in _chunks(ids):
            query = self._table.search().where(_ids_filter(chunk)).with_row_id(True)
            table = query.select(["id", "adapter_sha256", "rank", "_rowid"]).to_arrow()
            blobs = self._table.fetch_blobs("adapter", table.column("_rowid").to_pylist()).to_pylist()
            for row, blob in zip(table.to_pylist(), blobs, strict=True):
                rows[row["id"]] = {**row, "blob": blob}
        out: dict[str, LoRA] = {}
        for memory_id in ids:
            if memory_id not in rows:
                raise MemoryNotFoundError(f"no memory {memory_id} in the store at {self.uri}")
            row = rows[memory_id]
            blob = row["blob"]
            if blob is None or hashlib.sha256(blob).hexdigest() != row["adapter_sha256"]:
                raise AdapterError(f"adapter of memory {memory_id} does not match its sha256: the stored "
                                   "bytes are corrupt")
            try:
                lora = LoRA.from_bytes(blob)
            except ValueError as exc:  # AdapterError, or a LoRA that does not hold together
                raise AdapterError(f"adapter of memory {memory_id}: {exc}") from exc
            if lora.rank != row["rank"]:
                raise AdapterError(f"adapter of memory {memory_id} has rank {lora.rank}, its row says "
                                   f"{row['rank']}")
            try:
                lora.validate(shapes=shapes, base_model=base_model, hypernet=hypernet)
            except AdapterError as exc:
                raise AdapterError(f"adapter of memory {memory_id}: {exc}") from exc
            out[memory_id] = lora
        return out

    # -- erasing -------------------------------------------------------------------------------------
    def on_erase(self, callback: EraseCallback) -> EraseCallback:
        """Register `callback(ids)`, called with the ids of erased memories after every delete (e.g. so a
        cache of composed adapters drops files that contain them). Returns the callback."""
        self._erase_callbacks.append(callback)
        return callback

    def delete(self, memory_id: str, *, user_id: str | None = None, purge: bool = False) -> int:
        """Delete one memory; returns how many rows went (0 or 1). `delete_many` with one id."""
        return self.delete_many([memory_id], user_id=user_id, purge=purge)

    def delete_many(self, memory_ids: Sequence[str], *, user_id: str | None = None, purge: bool = False) -> int:
        """Delete memories by id, only those of `user_id` when it is given; returns how many rows went.

        The rows are gone from every read at once. Without `purge`, their bytes stay in their data files
        (marked deleted) and in the table's older versions until a compaction rewrites those files and
        `optimize` drops those versions. With `purge=True` they are erased now, all of them with one
        rewrite however many ids there are (see `delete_user` for what that does and costs).

        Raises:
            ValueError: an id that is not a uuid hex string, or a user id that is not allowed.
        """
        ids = list(dict.fromkeys(_memory_id(i) for i in memory_ids))
        scope = "" if user_id is None else f" AND {_scope_filter(user_id)}"
        rows: _Rows = []
        for chunk in _chunks(ids):
            rows += self._rows(_ids_filter(chunk) + scope, ["id"], row_addr=purge)
        return self._erase(rows, purge=purge)

    def delete_user(self, user_id: str, *, purge: bool = True) -> int:
        """Erase every memory of a user: returns how many rows went.

        Exact erasure (purge=True, the default): the rows are deleted, the data files that held them are
        rewritten without them, every index is rebuilt, and all older versions are dropped, so no byte of
        the user's text, embeddings or adapters stays on disk; then every `on_erase` callback gets the ids.
        This costs a rewrite of the files that held the user's rows (after `optimize()`, usually the
        whole table) and an index rebuild, and old versions vanish for concurrent readers too.

        Raises:
            ValueError: a user id that is not allowed.
        """
        where = _scope_filter(user_id)
        erased: list[dict[str, Any]] = []
        total = 0
        try:
            for _ in range(10):  # rows another process adds meanwhile are caught by the next round
                rows = self._rows(where, ["id"], row_addr=purge)
                if not rows:
                    break
                total += self._delete_rows(rows)
                erased += rows
            if purge and erased:
                self._purge({row["_rowaddr"] >> 32 for row in erased})
        finally:
            self._notify([row["id"] for row in erased])
        return total

    def _erase(self, rows: _Rows, *, purge: bool) -> int:
        if not rows:
            return 0
        try:
            deleted = self._delete_rows(rows)
            if purge:
                self._purge({row["_rowaddr"] >> 32 for row in rows})
        finally:
            self._notify([row["id"] for row in rows])
        return deleted

    def _delete_rows(self, rows: _Rows) -> int:
        deleted = 0
        for chunk in _chunks([row["id"] for row in rows]):
            # the predicate names only random ids: no user id is written into the transaction log
            result = _retrying(lambda chunk=chunk: self._table.delete(_ids_filter(chunk)), "delete")
            deleted += int(getattr(result, "num_deleted_rows", len(chunk)) or 0)
        return deleted

    def _notify(self, ids: _Ids) -> None:
        call_all(self._erase_callbacks, ids)

    def _purge(self, fragments: set[int]) -> None:
        """Make deleted rows physically gone: move the survivors out of the files that held them (an
        identity update rewrites rows into new files, leaving the old files fully deleted), compact, rebuild
        every index (indices keep copies of vectors, text tokens and ids), drop all older versions."""
        if fragments:
            # a row address is fragment << 32 | offset: these ranges are the files that held the rows
            where = " OR ".join(f"(_rowaddr >= {f << 32} AND _rowaddr < {(f + 1) << 32})"
                                for f in sorted(fragments))
            _retrying(lambda: self._table.update(where=where, values_sql={"n_tokens": "n_tokens"}),
                      "purge rewrite")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*cleanup_older_than.*", category=UserWarning)
            _retrying(lambda: self._table.optimize(cleanup_older_than=timedelta(0)), "purge compaction")
            self._rebuild_indices()
            _retrying(lambda: self._table.optimize(cleanup_older_than=timedelta(0)), "purge cleanup")

    # -- indices and maintenance ---------------------------------------------------------------------
    def _index_columns(self) -> set[str]:
        return {ix.columns[0] for ix in self._table.list_indices() if len(ix.columns) == 1}

    def _maybe_index(self) -> None:
        if self._indexed:
            return
        if self._table.count_rows() >= self.index_threshold:
            self._ensure_indices()

    def _ensure_indices(self) -> None:
        have = self._index_columns()
        for column in ("vector", "user_id", "id"):
            if column not in have:
                self._create_index(column)
        self._indexed = True

    def _create_index(self, column: str, *, strict: bool = False) -> None:
        """Build (or rebuild) one index. Unless `strict`, a failure (e.g. another process building it at the
        same time) is logged and only costs speed."""
        try:
            if column == "vector":
                rows = self._table.count_rows()
                _retrying(lambda: self._table.create_index("vector", config=IvfFlat(distance_type="cosine"),
                                                           replace=True), "vector index")
                self._set_meta(self._meta, _INDEX_ROWS_KEY, str(rows))
            elif column == "text":
                _retrying(lambda: self._table.create_index("text", config=FTS(), replace=True), "text index")
            else:
                _retrying(lambda: self._table.create_index(column, config=BTree(), replace=True),
                          f"{column} index")
        except Exception as exc:
            if strict:
                raise
            log.warning("could not build the %s index of %s: %s", column, self.uri, exc)

    def _ensure_fts(self) -> None:
        if not self._has_fts:
            if "text" not in self._index_columns():
                self._create_index("text")
            self._has_fts = True

    def _rebuild_indices(self) -> None:
        for column in sorted(self._index_columns()):
            self._create_index(column, strict=True)  # an index left unrebuilt would keep erased data

    def version_count(self) -> int:
        """How many versions of the memories table are kept (each write adds one; `optimize` drops old ones)."""
        return len(self._table.list_versions())

    def optimize(self, *, older_than: timedelta = timedelta(minutes=1)) -> None:
        """Compact small files, fold new rows into the indices, and drop versions older than `older_than`.

        Every write makes a version; without this, 1,228 writes took 407 MB. Builds the indices if the
        table has reached `index_threshold`, and retrains the vector index once the table has grown
        `RETRAIN_GROWTH` times since it was trained. `older_than=timedelta(0)` keeps only the latest
        version: do that only when no other process is reading an older one.
        """
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*cleanup_older_than.*", category=UserWarning)
            _retrying(lambda: self._table.optimize(cleanup_older_than=older_than), "optimize")
            _retrying(lambda: self._meta.optimize(cleanup_older_than=older_than), "optimize meta")
        rows = self._table.count_rows()
        if "vector" in self._index_columns():
            trained = int(self._get_meta(_INDEX_ROWS_KEY) or 0)
            if rows >= RETRAIN_GROWTH * max(trained, 1):
                self._create_index("vector")
        if rows >= self.index_threshold:
            self._ensure_indices()

    # -- lifetime ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the tables; further use raises D2LMemoryError. Safe to call twice."""
        self._tbl = None
        self._meta = None

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MemoryStore({self.uri!r}, keep_text={self.keep_text})"

