"""Where d2l-memory keeps its caches: `$D2L_MEMORY_HOME`, default `~/.cache/d2l-memory`."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def home() -> Path:
    """Return the cache root, creating it if needed."""
    root = Path(os.environ.get("D2L_MEMORY_HOME", Path.home() / ".cache" / "d2l-memory")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in blocks so large weights never sit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()
