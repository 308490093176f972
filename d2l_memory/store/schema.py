"""The shape of a memory store: one pydantic class per LanceDB table, the records callers see, and the
schema version with its migrations.

Tables (all in one LanceDB database, i.e. one directory or one `s3://` / `db://` URI):

- `memories` (`MemoryRow`): one row per memory, everything search reads: scope, kind, text, the whole
  text's embedding and its parts' embeddings (`parts`, a multivector column: a memory scores by its
  best-matching sentence), the adapter's checksum and shape. No adapter bytes: search reads small files.
- `adapters` (`AdapterRow`): the adapter's safetensors bytes per memory id, in a Lance blob v2 column.
- `recipes` (`RecipeRow`): what each composed adapter served by name is made of (member ids and
  weights, no text), so that a server replica that never composed it builds it from `adapters`; erased
  with any of its members.
- `meta` (`MetaRow`): key/value strings; `schema_version` is the one every open checks.

A memory is written adapter first, row second, and erased row first, adapter second: the `memories` row
is the commit point, so after a crash a memory is whole or absent. An adapter left without a row (a crash
between the two writes or erases) is invisible and is swept by `MemoryStore.optimize`.

`SCHEMA_VERSION` changes whenever a table's schema changes (a new table is created on open and is no
change: older releases ignore it). Opening a store written with another version
raises `d2l_memory.errors.SchemaVersionError`; an older store opens with `migrate=True` when
`store.migrations.MIGRATIONS` holds a step from each version to the next.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import lancedb
import pyarrow as pa
from lancedb.pydantic import LanceModel, Vector
from pydantic import BaseModel, ConfigDict, Field

from d2l_memory.embedder import EMBEDDING_DIM
from d2l_memory.kinds import Kind
from d2l_memory.lora import LoRA

SCHEMA_VERSION = 2
MEMORIES_TABLE = "memories"
ADAPTERS_TABLE = "adapters"
RECIPES_TABLE = "recipes"
META_TABLE = "meta"
VERSION_KEY = "schema_version"
STABLE_ROW_IDS = {"new_table_enable_stable_row_ids": "true"}  # blob fetches by row id survive compaction


class MemoryRow(LanceModel):
    """One memory as stored: the `memories` table's schema.

    `vector` embeds the whole text; `parts` holds it again followed by the embeddings of the text's
    `transcripts.retrieval_parts`, so a multivector search scores each memory by its best part.
    `created_at` is a UTC timestamp; `metadata` a JSON object serialised to text.
    """

    id: str
    user_id: str
    agent_id: str | None = None
    session_id: str | None = None
    kind: str
    text: str | None = None
    vector: Vector(EMBEDDING_DIM)  # type: ignore[valid-type]
    parts: list[Vector(EMBEDDING_DIM)]  # type: ignore[valid-type]
    adapter_sha256: str
    rank: int
    n_chunks: int
    base_model: str
    hypernet: str
    n_tokens: int
    created_at: datetime = Field(json_schema_extra={"tz": "UTC"})
    metadata: str = "{}"


class AdapterRow(LanceModel):
    """One memory's adapter bytes: the `adapters` table's schema, keyed by the memory's id.

    `adapter` is declared as bytes for pydantic and stored as a Lance blob v2 column (see
    `to_arrow_schema`): large values go to their own file and read back without copying the row.
    `created_at` lets `optimize` tell an adapter whose row is still being written from one a crash left.
    """

    id: str
    adapter: bytes
    created_at: datetime = Field(json_schema_extra={"tz": "UTC"})

    @classmethod
    def to_arrow_schema(cls) -> pa.Schema:
        """The Arrow schema LanceDB creates the table with: `adapter` becomes a blob v2 column."""
        schema = super().to_arrow_schema()
        return schema.set(schema.get_field_index("adapter"), lancedb.blob("adapter", nullable=False))


class RecipeRow(LanceModel):
    """A composed adapter's recipe: the `recipes` table's schema, keyed by the adapter's name.

    `recipe` is the `compose.Recipe` as JSON (the store does not read it); `members` lists its memory ids,
    so that erasing a memory erases every recipe that holds it.
    """

    name: str
    recipe: str
    members: list[str]
    created_at: datetime = Field(json_schema_extra={"tz": "UTC"})


class MetaRow(LanceModel):
    """One key/value fact about the store (`schema_version`, ...): the `meta` table's schema."""

    key: str
    value: str


class StoredMemory(BaseModel):
    """A memory as the store returns it: the row without its vector and adapter bytes.

    `score` is set on search hits only: the cosine similarity (in [-1, 1]) of the query to the memory's
    best-matching part (its whole text with `parts=False`), whichever ranking found it.
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


# Columns of `memories` that become a `StoredMemory`: its fields but the search score.
RECORD_COLUMNS: list[str] = [name for name in StoredMemory.model_fields if name != "score"]


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
