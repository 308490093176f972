"""Shared fixtures: the real base model and embedder, loaded once per test session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def base():
    from d2l_memory.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def embedder():
    from d2l_memory.embedder import Embedder

    return Embedder()
