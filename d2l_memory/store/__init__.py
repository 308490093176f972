"""The memory store: memories with their adapters in LanceDB (see `store.MemoryStore`)."""

from d2l_memory.errors import MemoryNotFoundError, SchemaVersionError
from d2l_memory.kinds import Kind
from d2l_memory.store.schema import SCHEMA_VERSION, MemoryInput, StoredMemory
from d2l_memory.store.store import MemoryStore

__all__ = [
    "SCHEMA_VERSION",
    "Kind",
    "MemoryInput",
    "MemoryNotFoundError",
    "MemoryStore",
    "SchemaVersionError",
    "StoredMemory",
]
