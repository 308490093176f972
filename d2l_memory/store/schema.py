"""The shape of a memory store: one pydantic class per LanceDB table, the records callers see, and the
schema version with its migrations.

Tables (both in one LanceDB database, i.e. one directory or one `s3://` / `db://` URI):

- `memories` (`MemoryRow`): one row per memory. The adapter's safetensors bytes live in the same row,
  in a Lance blob v2 column (`lancedb.blob`), so a row and its adapter are written by one commit.
- `meta` (`MetaRow`): key/value strings; `schema_version` is the one every open checks.

`SCHEMA_VERSION` changes whenever `MemoryRow` changes. Opening a store written with another version
raises `d2l_memory.errors.SchemaVersionError`; an older store opens with `migrate=True` when
`MIGRATIONS` holds a step from each version to the next.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import lancedb
import pyarrow as pa
from lancedb.pydantic import LanceModel, Vector
from pydantic import BaseModel, ConfigDict, Field

from d2l_memory.embedder import EMBEDDING_DIM
from d2l_memory.kinds import Kind
from d2l_memory.lora import LoRA

if TYPE_CHECKING:
    from lancedb.db import DBConnection

SCHEMA_VERSION = 1
MEMORIES_TABLE = "memories"
META_TABLE = "meta"
VERSION_KEY = "schema_version"



class MemoryRow(LanceModel):
    """One memory as stored: the `memories` table's schema.

    `adapter` is declared as bytes for pydantic and stored as a Lance blob v2 column (see
    `to_arrow_schema`): large values go to their own file and read back without copying the row.
    `created_at` is a UTC timestamp; `metadata` a JSON object serialised to text.
    """

    id: str
    user_id: str
    agent_id: str | None = None
    session_id: str | None = None
    kind: str
    text: str | None = None
    vector: Vector(EMBEDDING_DIM)  # type: ignore[valid-type]
    adapter: bytes
    adapter_sha256: str
    rank: int
    n_chunks: int
    base_model: str
    hypernet: str
    n_tokens: int
    created_at: datetime = Field(json_schema_extra={"tz": "UTC"})
    metadata: str = "{}"

    @classmethod
    def to_arrow_schema(cls) -> pa.Schema:
        """The Arrow schema LanceDB creates the table with: `adapter` becomes a blob v2 column."""
        schema = super().to_arrow_schema()
        return schema.set(schema.get_field_index("adapter"), lancedb.blob("adapter", nullable=False))


class MetaRow(LanceModel):
    """One key/value fact about the store (`schema_version`, ...): the `meta` table's schema."""

    key: str
    value: str


# Columns of `memories` that become a `StoredMemory` (everything but the vector and the adapter bytes).
RECORD_COLUMNS: list[str] = [
    "id", "user_id", "agent_id", "session_id", "kind", "text", "adapter_sha256", "rank", "n_chunks",
    "base_model", "hypernet", "n_tokens", "created_at", "metadata",
]


class StoredMemory(BaseModel):
    """A memory as the store returns it: the row without its vector and adapter bytes.

    `score` is set on search hits only: cosine similarity (`1 - cosine distance`, in [-1, 1]) for vector
    search, the reciprocal-rank-fusion score for hybrid search.
    """

    model_config = ConfigDict(frozen=True)

    id: str
    user_id: str
    agent_id: str | None = None
    session_id: str | None = None
    kind: Kind
    text: str | None = None
    adapter_sha256: str
    rank: int
    n_chunks: int
    base_model: str
    hypernet: str
    n_tokens: int
    created_at: datetime
    metadata: dict[str, Any] = Field(default_factory=dict)
    score: float | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any], score: float | None = None) -> StoredMemory:
        """Build a record from a `memories` row (a dict of `RECORD_COLUMNS`), normalising time to UTC."""
        fields = {name: row[name] for name in RECORD_COLUMNS}
        created = fields["created_at"]
        # LanceDB may hand back naive datetimes: they are UTC, as written
        utc = created.replace(tzinfo=UTC) if created.tzinfo is None else created.astimezone(UTC)
        fields["created_at"] = utc
        fields["metadata"] = json.loads(fields["metadata"] or "{}")
        return cls(**fields, score=score)


class MemoryInput(BaseModel):
    """What `MemoryStore.add_many` takes for one memory (`MemoryStore.add` takes the same as arguments).

    Give `text`, `vector` or both: without a vector the store embeds the text; a store opened with
    `keep_text=False` embeds it and then drops it. `n_tokens` is the source's length in base-model
    tokens, as the caller counted it.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    user_id: str
    adapter: LoRA
    text: str | None = None
    vector: Any = None
    kind: Kind = "document"
    agent_id: str | None = None
    session_id: str | None = None
    n_tokens: int = Field(default=0, ge=0)
    metadata: dict[str, Any] = Field(default_factory=dict)


# Migration steps: MIGRATIONS[v] rewrites a store at version v into version v + 1 (in place, through the
# connection) and must leave the store readable by version v + 1. None exist yet: version 1 is the first.
Migration = Callable[["DBConnection"], None]
MIGRATIONS: dict[int, Migration] = {}
