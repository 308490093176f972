"""Schema migrations: `MIGRATIONS[v]` rewrites a store at schema version v into version v + 1 in place.

A step runs inside `MemoryStore(uri, migrate=True)` before the store opens its tables, and is idempotent:
a migration killed midway leaves the store at version v, and opening it again with `migrate=True` finishes
it. The version number moves only after a step has completed.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING

import pyarrow as pa

from d2l_memory.embedder import EMBEDDING_DIM
from d2l_memory.store.commits import retrying
from d2l_memory.store.filters import chunks
from d2l_memory.store.schema import ADAPTERS_TABLE, MEMORIES_TABLE, STABLE_ROW_IDS, AdapterRow

if TYPE_CHECKING:
    from d2l_memory.store.store import MemoryStore

log = logging.getLogger(__name__)

_BATCH = 256  # rows per commit while migrating: a batch of adapters is held in memory (~1 MB each)


def _v1_to_v2(store: MemoryStore) -> None:
    """Version 1 kept each adapter's bytes in its `memories` row and scored a memory by one embedding.
    Version 2 moves the bytes to the `adapters` table and adds the `parts` embeddings: copy the bytes
    (ids not copied yet), add and fill `parts` (rows where it is still null), then drop the old column."""
    db = store._db
    memories = db.open_table(MEMORIES_TABLE)
    adapters = retrying(lambda: db.create_table(ADAPTERS_TABLE, schema=AdapterRow, exist_ok=True,
                                                storage_options=dict(STABLE_ROW_IDS)), "adapters table")
    if "adapter" in memories.schema.names:
        copied = set(adapters.search().select(["id"]).to_arrow().column("id").to_pylist())
        rows = memories.search().with_row_id(True).select(["id", "created_at", "_rowid"]).to_arrow().to_pylist()
        todo = [row for row in rows if row["id"] not in copied]
        for batch in chunks(todo, _BATCH):
            blobs = memories.fetch_blobs("adapter", [row["_rowid"] for row in batch]).to_pylist()
            retrying(lambda batch=batch, blobs=blobs: adapters.add(
                [{"id": row["id"], "adapter": blob, "created_at": row["created_at"]}
                 for row, blob in zip(batch, blobs, strict=True)]), "copying adapters")
        log.warning("migration: %d adapters moved to the %s table", len(todo), ADAPTERS_TABLE)
    parts_type = pa.list_(pa.list_(pa.float32(), EMBEDDING_DIM))
    if "parts" not in memories.schema.names:
        retrying(lambda: memories.add_columns(pa.schema([pa.field("parts", parts_type)])), "adding parts")
    todo = memories.search().where("parts IS NULL").select(["id", "text", "vector"]).to_arrow().to_pylist()
    for batch in chunks(todo, _BATCH):
        parts = store.parts_vectors([row["text"] for row in batch], [row["vector"] for row in batch])
        update = pa.table({"id": [row["id"] for row in batch],
                           "parts": pa.array([p.tolist() for p in parts], type=parts_type)})
        retrying(lambda update=update: memories.merge_insert("id").when_matched_update_all().execute(update),
                 "filling parts")
    if "adapter" in memories.schema.names:
        retrying(lambda: memories.drop_columns(["adapter"]), "dropping the adapter column")
    # Dropping a column only hides it: rewrite every row and drop old versions, so the bytes are on disk
    # once (in `adapters`) and forgetting a memory later erases its only copy.
    retrying(lambda: memories.update(values_sql={"n_tokens": "n_tokens"}), "rewriting memories")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*cleanup_older_than.*", category=UserWarning)
        retrying(lambda: memories.optimize(cleanup_older_than=timedelta(0)), "compacting memories")


Migration = Callable[["MemoryStore"], None]
MIGRATIONS: dict[int, Migration] = {1: _v1_to_v2}
