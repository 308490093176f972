"""`MemoryStore`: memories (row + embeddings + adapter) in LanceDB, scoped per user, shared by processes.

One memory is one row of the `memories` table (`schema.MemoryRow`: its scope, kind, source text
(optional), the embeddings of its whole text and of its sentences) and one row of the `adapters` table
(the adapter's safetensors bytes; their sha256 is in the memory's row). The adapter is written first and
the memory's row second, in one commit each; erasing goes the other way. The row is the commit point:
after a crash a memory is whole or absent, and an adapter left without its row is swept by `optimize`.

Where the store lives: `uri` is whatever `lancedb.connect` takes, a local directory by default. The
same code opens object storage (`s3://bucket/prefix`, `gs://`, `az://`, credentials from the usual
environment or `connect_options={"storage_options": {...}}`) and LanceDB Cloud (`db://name` with
`connect_options={"api_key": ..., "region": ...}`): that is how a store outgrows one machine.

Safety rules kept here:
- Every value that reaches a `where()` string is checked and quoted by `filters`.
- Every search is pre-filtered by scope, and every hit is checked against the scope before returning.
- Adapters are checked on read (`get_adapter`): sha256, safetensors parse, finite values, shapes, base
  model and hypernetwork; any mismatch raises `AdapterError`.
- Commit conflicts between processes are retried (`commits`), re-checking which rows already landed so
  that no add is duplicated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import lancedb
import numpy as np
from lancedb.index import FTS, BTree, IvfFlat
from lancedb.query import MatchQuery

from d2l_memory.embedder import EMBEDDING_DIM, Embedder
from d2l_memory.errors import AdapterError, D2LMemoryError, MemoryNotFoundError, SchemaVersionError, call_all
from d2l_memory.kinds import Kind
from d2l_memory.lora import LoRA
from d2l_memory.store.commits import CONFLICT_RETRIES, backoff, is_conflict, retrying
from d2l_memory.store.filters import check_id, check_kind, chunks, ids_filter, scope_filter, scope_name, sql
from d2l_memory.store.migrations import MIGRATIONS
from d2l_memory.store.schema import (
    ADAPTERS_TABLE,
    MEMORIES_TABLE,
    META_TABLE,
    RECIPES_TABLE,
    RECORD_COLUMNS,
    SCHEMA_VERSION,
    STABLE_ROW_IDS,
    VERSION_KEY,
    AdapterRow,
    MemoryInput,
    MemoryRow,
    MetaRow,
    RecipeRow,
    StoredMemory,
)
from d2l_memory.transcripts import retrieval_parts

log = logging.getLogger(__name__)

# Aliases for signatures inside MemoryStore, whose `list` method would shadow the builtin there.
_Ids = list[str]
_Rows = list[dict[str, Any]]
_Hits = list[tuple[dict[str, Any], float]]
_Memories = list[StoredMemory]
EraseCallback = Callable[[list[str]], None]


@dataclass
class _Files:
    """The data files (fragment ids) of each table that held erased memories, for a purge."""

    memories: set[int] = field(default_factory=set)
    adapters: set[int] = field(default_factory=set)

INDEX_THRESHOLD = 5_000  # rows before the ANN and scalar indices are built (IVF_FLAT works at any size)
# A scope (one user's memories, say) up to this size is searched exactly, bypassing the ANN index: a flat
# scan of a pre-filtered scope was as fast as the index there and found the true top 5, which IVF's
# partition probing did not (docs/benchmarks.md, memory store).
EXACT_SEARCH_ROWS = 10_000
# Counting a scope costs far more for a large scope than for a small one (docs/benchmarks.md), so a count is
# reused this long; a stale one can only pick the other plan, never widen the scope.
_SCOPE_COUNT_TTL_S = 60.0
_SCOPE_COUNTS_KEPT = 10_000
RETRAIN_GROWTH = 4  # optimize() retrains the vector index once the table is this many times larger
_INDEX_ROWS_KEY = "vector_index_rows"
_RRF_K = 60  # reciprocal rank fusion constant (the usual one)
# A question about the present ("where do I live now?") prefers the newest of near-equal memories: the one
# that states a knowledge update over the one it replaced.
_PRESENT = re.compile(r"\b(now|currently|current|these days|anymore|any more|latest|still|nowadays)\b",
                      re.IGNORECASE)
_RECENCY_MARGIN = 0.05  # cosine: memories this close to the best one count as near-equal


def _as_vector(value: Any) -> np.ndarray:
    vector = np.asarray(value, dtype=np.float32).reshape(-1)
    if vector.shape != (EMBEDDING_DIM,):
        raise ValueError(f"an embedding must have {EMBEDDING_DIM} values, got {vector.size}")
    if not np.isfinite(vector).all() or not np.any(vector):
        raise ValueError("an embedding must be finite and not all zeros")
    return vector


def _utc(value: datetime) -> datetime:
    # LanceDB may hand back naive datetimes: they are UTC, as written
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def part_vectors(embedder: Embedder | Callable[[], Embedder], texts: Sequence[str | None],
                 vectors: Sequence[Any]) -> list[np.ndarray]:
    """What a memory is searched by: its whole-text vector, then one vector per `transcripts.retrieval_parts`
    of its text (none without text), all embedded in one batch. Shapes: `[1 + n_parts_i, 384]`. `embedder`
    may be a function returning one, called only when there is something to embed."""
    pieces = [retrieval_parts(text) if text else [] for text in texts]
    if any(pieces):
        flat = (embedder if isinstance(embedder, Embedder) else embedder()).embed([p for ps in pieces for p in ps])
    else:
        flat = np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    out, start = [], 0
    for vector, ps in zip(vectors, pieces, strict=True):
        out.append(np.concatenate([_as_vector(vector)[None], flat[start : start + len(ps)]]).astype(np.float32))
        start += len(ps)
    return out


def relevance_scores(embedder: Embedder, query: str, texts: Sequence[str]) -> list[float]:
    """Each text's recall score for `query` as `MemoryStore.search` scores a stored memory of that text: the
    cosine of the query to the text's best-matching part (`part_vectors`). Meta-training weighs an
    example's memories by it, as `D2LMemory.prepare` weighs recalled ones."""
    vectors = embedder.embed([query, *texts])
    return [_best_part(parts, vectors[0]) for parts in part_vectors(embedder, texts, vectors[1:])]


def _best_part(parts: Sequence[Any], query: np.ndarray) -> float:
    """Cosine similarity of `query` (unit norm) to the nearest of a memory's unit-norm part vectors."""
    return float(np.max(np.asarray(parts, dtype=np.float32) @ query))


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
        migrate: migrate an older store in place when `migrations.MIGRATIONS` has the steps (back it up
            first; other processes must not use it meanwhile).
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
        self._tbl: Any = None
        self._adapters: Any = None
        self._recipes: Any = None
        self._meta = self._open_meta(migrate)
        self._tbl = self._open_table(MEMORIES_TABLE, MemoryRow)
        self._adapters = self._open_table(ADAPTERS_TABLE, AdapterRow)
        self._recipes = self._open_table(RECIPES_TABLE, RecipeRow)

    def _open_table(self, name: str, schema: type) -> Any:
        # an existing table is opened as it is: a migrated one holds the same columns in another order
        if name in self._table_names():
            return self._db.open_table(name)
        return retrying(lambda: self._db.create_table(name, schema=schema, exist_ok=True,
                                                      storage_options=dict(STABLE_ROW_IDS)),
                        f"opening the {name} table")

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
        meta = retrying(lambda: self._db.create_table(META_TABLE, data=first, schema=MetaRow, exist_ok=True),
                         "opening the meta table")
        found = self._read_version(meta)
        if found == SCHEMA_VERSION:
            return meta
        steps = list(range(found, SCHEMA_VERSION)) if found < SCHEMA_VERSION else []
        if steps and migrate and all(v in MIGRATIONS for v in steps):
            for version in steps:
                log.warning("migrating the store at %s from schema version %d to %d", self.uri, version,
                            version + 1)
                MIGRATIONS[version](self)
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
        rows = meta.search().where(f"key = {sql(VERSION_KEY)}").select(["value"]).to_arrow().to_pylist()
        values = {row["value"] for row in rows}
        if len(values) != 1 or not next(iter(values)).isdigit():
            raise SchemaVersionError(
                f"The store at {self.uri} records schema version {sorted(values) or 'nothing'}, which is not "
                f"one version number; this d2l-memory reads schema version {SCHEMA_VERSION}.",
                found=None, expected=SCHEMA_VERSION, uri=self.uri)
        return int(values.pop())

    def _get_meta(self, key: str) -> str | None:
        rows = self._meta.search().where(f"key = {sql(key)}").select(["value"]).to_arrow().to_pylist()
        return rows[-1]["value"] if rows else None

    @staticmethod
    def _set_meta(meta: Any, key: str, value: str) -> None:
        retrying(lambda: meta.merge_insert("key").when_matched_update_all().when_not_matched_insert_all()
                  .execute([{"key": key, "value": value}]), f"writing {key}")

    @staticmethod
    def validate_scope(*, user_id: str, agent_id: str | None = None, session_id: str | None = None,
                       kind: str | None = None) -> None:
        """Check scope values the way every store operation does, without touching the store (e.g. before
        spending seconds on an adapter that could then not be stored).

        Raises:
            ValueError: a user/agent/session id outside the allowed pattern, or an unknown kind.
        """
        scope_filter(user_id, agent_id, session_id, kind)

    @property
    def _table(self) -> Any:
        if self._tbl is None:
            raise D2LMemoryError("this MemoryStore is closed")
        return self._tbl

    @property
    def _adapter_table(self) -> Any:
        if self._adapters is None:
            raise D2LMemoryError("this MemoryStore is closed")
        return self._adapters

    @property
    def _recipe_table(self) -> Any:
        if self._recipes is None:
            raise D2LMemoryError("this MemoryStore is closed")
        return self._recipes

    @property
    def embedder(self) -> Embedder:
        """The embedder, loaded on first use."""
        if self._embedder is None:
            self._embedder = Embedder()
        return self._embedder

    def parts_vectors(self, texts: Sequence[str | None], vectors: Sequence[Any]) -> list[np.ndarray]:
        """Each memory's `parts` column (`part_vectors` with this store's embedder)."""
        return part_vectors(lambda: self.embedder, texts, vectors)

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
        """Store one memory: its adapter, then its row (the row's commit makes it whole and visible).

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
        """Store several memories: their adapters in one commit, then their rows in one (all or none: rows
        are what search and reads see). Same checks as `add`."""
        memories = list(memories)
        if not memories:
            return []
        vectors: list[np.ndarray | None] = []
        metadata: list[str] = []
        for memory in memories:
            scope_name(memory.user_id, "user_id")
            for name in ("agent_id", "session_id"):
                if getattr(memory, name) is not None:
                    scope_name(getattr(memory, name), name)
            check_kind(memory.kind)
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

        parts = self.parts_vectors([m.text for m in memories], vectors)
        now = datetime.now(UTC)
        rows, blobs = [], []
        for memory, vector, part, meta in zip(memories, vectors, parts, metadata, strict=True):
            blob = memory.adapter.to_bytes()
            rows.append({
                "id": uuid.uuid4().hex, "user_id": memory.user_id, "agent_id": memory.agent_id,
                "session_id": memory.session_id, "kind": memory.kind,
                "text": memory.text if self.keep_text else None, "vector": vector, "parts": list(part),
                "adapter_sha256": hashlib.sha256(blob).hexdigest(), "rank": memory.adapter.rank,
                "n_chunks": memory.adapter.n_chunks, "base_model": memory.adapter.base_model,
                "hypernet": memory.adapter.hypernet, "n_tokens": memory.n_tokens, "created_at": now,
                "metadata": meta,
            })
            blobs.append({"id": rows[-1]["id"], "adapter": blob, "created_at": now})
        self._commit(self._adapter_table, blobs)
        try:
            self._commit(self._table, rows)
        except BaseException:
            # the rows did not land: their adapters are orphans; drop them now rather than at optimize()
            self._drop_adapters([row["id"] for row in rows])
            raise
        self._maybe_index()
        return [StoredMemory.from_row(row) for row in rows]

    @staticmethod
    def _commit(table: Any, rows: _Rows) -> None:
        """Append rows to `table` in one commit; after an escaped conflict, re-add only the rows that did not
        land."""
        pending = rows
        for attempt in range(CONFLICT_RETRIES):
            try:
                table.add(pending)
                return
            except Exception as exc:
                if attempt == CONFLICT_RETRIES - 1 or not is_conflict(exc):
                    raise
                log.info("add hit a commit conflict (attempt %d), retrying: %s", attempt + 1, exc)
                backoff(attempt)
                landed = MemoryStore._ids_in(table, [row["id"] for row in pending])
                pending = [row for row in pending if row["id"] not in landed]
                if not pending:
                    return

    @staticmethod
    def _ids_in(table: Any, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in chunks([check_id(i) for i in ids]):
            found.update(table.search().where(ids_filter(chunk)).select(["id"]).to_arrow().column("id").to_pylist())
        return found

    def existing(self, memory_ids: Sequence[str]) -> set[str]:
        """Which of `memory_ids` are stored: one `id IN (...)` query per 1,000 ids (composed adapters are
        checked against it on every cache hit).

        Raises:
            ValueError: an id that is not a uuid hex string.
        """
        return self._ids_in(self._table, memory_ids)

    # -- recipes of composed adapters ----------------------------------------------------------------
    def put_recipe(self, name: str, recipe: str, members: Sequence[str]) -> None:
        """Record that the composed adapter `name` is made by `recipe` (`compose.Recipe` JSON) from the
        memories `members`, so that any server replica of this store can build it by name; idempotent.
        Erasing any member erases the recipe.

        Raises:
            ValueError: a member id that is not a uuid hex string, or no members.
        """
        if not members:
            raise ValueError("a recipe needs at least one member")
        row = {"name": name, "recipe": recipe, "members": [check_id(m) for m in members],
               "created_at": datetime.now(UTC)}
        retrying(lambda: self._recipe_table.merge_insert("name").when_not_matched_insert_all().execute([row]),
                 "writing a recipe")

    def get_recipe(self, name: str) -> str | None:
        """The recipe recorded under `name` by `put_recipe`, or None (never recorded, or erased)."""
        rows = self._recipe_table.search().where(f"name = {sql(name)}").select(["recipe"]).limit(1)
        found = rows.to_arrow().column("recipe").to_pylist()
        return found[0] if found else None

    def _drop_recipes(self, ids: _Ids) -> None:
        for chunk in chunks(ids):
            members = ", ".join(sql(i) for i in chunk)
            retrying(lambda members=members: self._recipe_table.delete(f"array_has_any(members, [{members}])"),
                     "delete recipes")

    # -- reading -------------------------------------------------------------------------------------
    def _rows(self, where: str, columns: Sequence[str]) -> _Rows:
        return self._table.search().where(where).select(list(columns)).to_arrow().to_pylist()

    def get(self, memory_id: str) -> StoredMemory | None:
        """The memory with this id, or None.

        Raises:
            ValueError: an id that is not a uuid hex string.
        """
        rows = self._rows(f"id = {sql(check_id(memory_id))}", RECORD_COLUMNS)
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
        rows = self._rows(scope_filter(user_id, agent_id, session_id, kind), RECORD_COLUMNS)
        rows.sort(key=lambda row: (row["created_at"], row["id"]), reverse=True)
        return [StoredMemory.from_row(row) for row in rows[:limit]]

    def count(self, user_id: str | None = None) -> int:
        """Number of memories, of one user or of the whole store."""
        where = None if user_id is None else scope_filter(user_id)
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
        parts: bool = True,
    ) -> _Memories:
        """The `k` memories nearest to a query, always pre-filtered to the scope.

        A memory's score is the cosine similarity of the query to its best-matching part: its whole text or
        one of its sentences (`parts=False`: its whole text only). With `hybrid`, the ranking fuses that
        dense ranking with full-text (BM25) ranking by reciprocal rank fusion, newer memories first among
        equal fusion scores; a question about the present ("now", "currently", ...) puts the newest of
        the memories within `_RECENCY_MARGIN` of the best score first. Either way `score` is the cosine, so
        a relevance threshold means the same thing whichever ranking found the memory.

        Args:
            query: text (embedded here) or a 384-d embedding.
            user_id: whose memories; with `agent_id`, `session_id` and `kind` the scope: only memories
                inside it are considered.
            k: how many to return.
            hybrid: fuse with full-text search; needs the query as text and a store that keeps text. The
                full-text index is built on first use.
            parts: score by the best part (default) or by the whole text alone.

        Returns:
            Records with `score` set, best first.

        Raises:
            ValueError: a scope id or kind that is not allowed, a bad k or vector, or hybrid without text.
        """
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        where = scope_filter(user_id, agent_id, session_id, kind)
        text = query if isinstance(query, str) else None
        if hybrid and text is None:
            raise ValueError("hybrid search needs the query as text")
        if hybrid and not self.keep_text:
            raise ValueError("hybrid search needs stored text, and this store was opened with keep_text=False")
        vector = _as_vector(self.embedder.embed([text])[0] if text is not None else query)
        column = "parts" if parts else "vector"
        if hybrid:
            hits = self._hybrid_rows(text or "", vector, where, k, column)
        else:
            hits = [(row, 1.0 - row["_distance"]) for row in self._vector_rows(vector, where, k, column)]
        for row, _ in hits:  # the pre-filter is the rule; this makes a breach loud instead of silent
            if row["user_id"] != user_id or (agent_id is not None and row["agent_id"] != agent_id) or (
                    session_id is not None and row["session_id"] != session_id) or (
                    kind is not None and row["kind"] != kind):
                raise D2LMemoryError(f"search returned memory {row['id']} outside the requested scope")
        return [StoredMemory.from_row(row, score=float(score)) for row, score in hits]

    def _vector_query(self, vector: np.ndarray, where: str, column: str) -> Any:
        query = self._table.search(vector, vector_column_name=column).distance_type("cosine")
        if column != "parts" or self._table.count_rows() <= EXACT_SEARCH_ROWS or \
                self._scope_count(where) <= EXACT_SEARCH_ROWS:
            query = query.bypass_vector_index()  # only `parts` is indexed
        return query.where(where, prefilter=True)

    def _scope_count(self, where: str) -> int:
        now = time.monotonic()
        cached = self._scope_counts.get(where)
        if cached is None or now - cached[0] > _SCOPE_COUNT_TTL_S:
            if len(self._scope_counts) >= _SCOPE_COUNTS_KEPT:
                self._scope_counts.clear()
            cached = self._scope_counts[where] = (now, self._table.count_rows(where))
        return cached[1]

    def _vector_rows(self, vector: np.ndarray, where: str, limit: int, column: str) -> _Rows:
        return (self._vector_query(vector, where, column).limit(limit).select([*RECORD_COLUMNS, "_distance"])
                .to_arrow().to_pylist())

    def _hybrid_rows(self, text: str, vector: np.ndarray, where: str, k: int, column: str) -> _Hits:
        self._ensure_fts()
        depth = max(2 * k, 20)
        by_vector = self._vector_rows(vector, where, depth, column)
        by_text = (self._table.search(MatchQuery(text, "text"), query_type="fts").where(where, prefilter=True)
                   .limit(depth).select([*RECORD_COLUMNS, column, "_score"]).to_arrow().to_pylist())
        cosine = {row["id"]: 1.0 - row["_distance"] for row in by_vector}
        for row in by_text:
            if row["id"] not in cosine:
                cosine[row["id"]] = _best_part(row[column], vector) if column == "parts" else \
                    float(np.dot(np.asarray(row[column], dtype=np.float32), vector))
        fused: dict[str, float] = {}
        rows: dict[str, dict[str, Any]] = {}
        for ranked in (by_vector, by_text):
            for rank, row in enumerate(ranked):
                fused[row["id"]] = fused.get(row["id"], 0.0) + 1.0 / (_RRF_K + rank + 1)
                rows.setdefault(row["id"], row)
        best = sorted(fused, key=lambda i: (fused[i], rows[i]["created_at"]), reverse=True)[:k]
        if best and _PRESENT.search(text):
            top = max(cosine[i] for i in best)
            near = [i for i in best if cosine[i] >= top - _RECENCY_MARGIN]
            near.sort(key=lambda i: rows[i]["created_at"], reverse=True)
            best = near + [i for i in best if i not in near]
        return [(rows[i], cosine[i]) for i in best]

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
        ids = [check_id(i) for i in memory_ids]
        rows: dict[str, dict[str, Any]] = {}
        blobs: dict[str, bytes] = {}
        for chunk in chunks(ids):
            rows.update((row["id"], row) for row in self._rows(ids_filter(chunk), ["id", "adapter_sha256", "rank"]))
            table = self._adapter_table.search().where(ids_filter(chunk)).with_row_id(True).select(
                ["id", "_rowid"]).to_arrow()
            fetched = self._adapter_table.fetch_blobs("adapter", table.column("_rowid").to_pylist()).to_pylist()
            blobs.update(zip(table.column("id").to_pylist(), fetched, strict=True))
        out: dict[str, LoRA] = {}
        for memory_id in ids:
            if memory_id not in rows:
                raise MemoryNotFoundError(f"no memory {memory_id} in the store at {self.uri}")
            row = rows[memory_id]
            blob = blobs.get(memory_id)
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
        ids = list(dict.fromkeys(check_id(i) for i in memory_ids))
        scope = "" if user_id is None else f" AND {scope_filter(user_id)}"
        rows: _Rows = []
        for chunk in chunks(ids):
            rows += self._rows(ids_filter(chunk) + scope, ["id"])
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
        where = scope_filter(user_id)
        erased: list[str] = []
        files = _Files()
        total = 0
        try:
            for _ in range(10):  # rows another process adds meanwhile are caught by the next round
                ids = [row["id"] for row in self._rows(where, ["id"])]
                if not ids:
                    break
                total += self._erase_ids(ids, files if purge else None)
                erased += ids
            if purge and erased:
                self._purge(files)
        finally:
            self._notify(erased)
        return total

    def _erase(self, rows: _Rows, *, purge: bool) -> int:
        if not rows:
            return 0
        ids = [row["id"] for row in rows]
        files = _Files()
        try:
            deleted = self._erase_ids(ids, files if purge else None)
            if purge:
                self._purge(files)
        finally:
            self._notify(ids)
        return deleted

    def _erase_ids(self, ids: _Ids, files: _Files | None) -> int:
        """Delete the memories' rows (the commit point: they are gone from every read), then their adapters;
        with `files`, first note the data files that hold them, for `_purge`. A crash in between leaves
        adapters without rows, which `optimize` sweeps."""
        if files is not None:
            files.memories |= self._fragments(self._table, ids)
            files.adapters |= self._fragments(self._adapter_table, ids)
        deleted = self._delete_where(self._table, ids)
        self._delete_where(self._adapter_table, ids)
        self._drop_recipes(ids)
        return deleted

    @staticmethod
    def _delete_where(table: Any, ids: _Ids) -> int:
        deleted = 0
        for chunk in chunks(ids):
            # the predicate names only random ids: no user id is written into the transaction log
            result = retrying(lambda chunk=chunk: table.delete(ids_filter(chunk)), "delete")
            deleted += int(getattr(result, "num_deleted_rows", len(chunk)) or 0)
        return deleted

    def _drop_adapters(self, ids: _Ids) -> None:
        try:
            self._delete_where(self._adapter_table, ids)
        except Exception as exc:  # optimize() sweeps what is left
            log.warning("could not drop %d orphaned adapters of %s: %s", len(ids), self.uri, exc)

    def _notify(self, ids: _Ids) -> None:
        call_all(self._erase_callbacks, ids)

    @staticmethod
    def _fragments(table: Any, ids: _Ids) -> set[int]:
        """The data files (fragment ids) that hold these ids' rows."""
        fragments: set[int] = set()
        for chunk in chunks(ids):
            query = table.search().where(ids_filter(chunk)).with_row_address(True).select(["id", "_rowaddr"])
            # a row address is fragment << 32 | offset
            fragments.update(row["_rowaddr"] >> 32 for row in query.to_arrow().to_pylist())
        return fragments

    def _purge(self, files: _Files) -> None:
        """Make erased memories physically gone from both tables: move the survivors out of the files that
        held them (an identity update rewrites rows into new files, leaving the old files fully deleted),
        compact, rebuild every index (indices keep copies of vectors, text tokens and ids), drop all older
        versions."""
        for table, fragments, identity in ((self._table, files.memories, "n_tokens"),
                                           (self._adapter_table, files.adapters, "created_at")):
            if fragments:
                where = " OR ".join(f"(_rowaddr >= {f << 32} AND _rowaddr < {(f + 1) << 32})"
                                    for f in sorted(fragments))
                retrying(lambda table=table, where=where, identity=identity: table.update(
                    where=where, values_sql={identity: identity}), "purge rewrite")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*cleanup_older_than.*", category=UserWarning)
            for table in (self._table, self._adapter_table):
                retrying(lambda table=table: table.optimize(cleanup_older_than=timedelta(0)), "purge compaction")
            self._rebuild_indices()
            for table in (self._table, self._adapter_table):
                retrying(lambda table=table: table.optimize(cleanup_older_than=timedelta(0)), "purge cleanup")

    # -- indices and maintenance ---------------------------------------------------------------------
    @staticmethod
    def _index_columns(table: Any) -> set[str]:
        return {ix.columns[0] for ix in table.list_indices() if len(ix.columns) == 1}

    def _maybe_index(self) -> None:
        if self._indexed:
            return
        if self._table.count_rows() >= self.index_threshold:
            self._ensure_indices()

    def _ensure_indices(self) -> None:
        have = self._index_columns(self._table)
        for column in ("parts", "user_id", "id"):
            if column not in have:
                self._create_index(self._table, column)
        if "id" not in self._index_columns(self._adapter_table):
            self._create_index(self._adapter_table, "id")
        self._indexed = True

    def _create_index(self, table: Any, column: str, *, strict: bool = False) -> None:
        """Build (or rebuild) one index. Unless `strict`, a failure (e.g. another process building it at the
        same time) is logged and only costs speed."""
        try:
            if column == "parts":
                rows = table.count_rows()
                retrying(lambda: table.create_index("parts", config=IvfFlat(distance_type="cosine"),
                                                    replace=True), "vector index")
                self._set_meta(self._meta, _INDEX_ROWS_KEY, str(rows))
            elif column == "text":
                retrying(lambda: table.create_index("text", config=FTS(), replace=True), "text index")
            else:
                retrying(lambda: table.create_index(column, config=BTree(), replace=True), f"{column} index")
        except Exception as exc:
            if strict:
                raise
            log.warning("could not build the %s index of %s: %s", column, self.uri, exc)

    def _ensure_fts(self) -> None:
        if not self._has_fts:
            if "text" not in self._index_columns(self._table):
                self._create_index(self._table, "text")
            self._has_fts = True

    def _rebuild_indices(self) -> None:
        for table in (self._table, self._adapter_table):
            for column in sorted(self._index_columns(table)):
                self._create_index(table, column, strict=True)  # an index left unrebuilt would keep erased data

    def version_count(self) -> int:
        """How many versions of the memories table are kept (each write adds one; `optimize` drops old ones)."""
        return len(self._table.list_versions())

    def sweep_orphans(self, *, older_than: timedelta = timedelta(minutes=1)) -> int:
        """Drop adapters whose memory row does not exist (an add or erase killed between its two commits)
        and that are older than `older_than` (younger ones may belong to an add still in flight), and
        recipes with a member that does not exist (recorded while it was being erased); returns how many
        adapters went."""
        # recipes read first: one recorded after this read has members that exist in the next one
        recipes = self._recipe_table.search().select(["members"]).to_arrow().to_pylist()
        have = set(self._table.search().select(["id"]).to_arrow().column("id").to_pylist())
        cutoff = datetime.now(UTC) - older_than
        orphans = [row["id"] for row in
                   self._adapter_table.search().select(["id", "created_at"]).to_arrow().to_pylist()
                   if row["id"] not in have and _utc(row["created_at"]) <= cutoff]
        if orphans:
            log.warning("dropping %d adapters without a memory in %s (a write or erase was interrupted)",
                        len(orphans), self.uri)
            self._delete_where(self._adapter_table, orphans)
        gone = {m for row in recipes for m in row["members"] if m not in have}
        if gone:
            self._drop_recipes(sorted(gone))
        return len(orphans)

    def optimize(self, *, older_than: timedelta = timedelta(minutes=1)) -> None:
        """Sweep orphaned adapters, compact small files, fold new rows into the indices, and drop versions
        older than `older_than`.

        Every write makes a version; without this they pile up on disk. Builds the indices if the table has
        reached `index_threshold`, and retrains the vector index once the table has grown `RETRAIN_GROWTH`
        times since it was trained. `older_than=timedelta(0)` keeps only the latest version: do that only
        when no other process is reading an older one.
        """
        self.sweep_orphans(older_than=older_than)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*cleanup_older_than.*", category=UserWarning)
            for table, what in ((self._table, "optimize"), (self._adapter_table, "optimize adapters"),
                                (self._recipe_table, "optimize recipes"), (self._meta, "optimize meta")):
                retrying(lambda table=table: table.optimize(cleanup_older_than=older_than), what)
        rows = self._table.count_rows()
        if "parts" in self._index_columns(self._table):
            trained = int(self._get_meta(_INDEX_ROWS_KEY) or 0)
            if rows >= RETRAIN_GROWTH * max(trained, 1):
                self._create_index(self._table, "parts")
        if rows >= self.index_threshold:
            self._ensure_indices()

    # -- lifetime ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the tables; further use raises D2LMemoryError. Safe to call twice."""
        self._tbl = None
        self._adapters = None
        self._recipes = None
        self._meta = None

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MemoryStore({self.uri!r}, keep_text={self.keep_text})"

