"""Shared fixtures: one real `D2LMemory` (SmolLM2-135M, the shipped hypernetwork, LanceDB in a temporary
directory) for the whole session; test modules keep apart by using their own user ids."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def memory(tmp_path_factory):
    from d2l_memory import D2LMemory

    with D2LMemory(tmp_path_factory.mktemp("langchain-d2l")) as mem:
        yield mem
