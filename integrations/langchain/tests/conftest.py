"""Shared fixtures: one real `D2LMemory` (SmolLM2-135M, the shipped hypernetwork, LanceDB in a temporary
directory) for the whole session; test modules keep apart by using their own user ids."""

from __future__ import annotations

import inspect
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # langchain-tests' async tests carry no marker (partner packages run pytest-asyncio in auto mode);
    # the root configuration is strict, so mark this package's coroutine tests here.
    for item in items:
        if str(item.path).startswith(os.path.dirname(__file__)) and inspect.iscoroutinefunction(
                getattr(item, "function", None)):
            item.add_marker(pytest.mark.asyncio)


@pytest.fixture(scope="session")
def memory(tmp_path_factory):
    from d2l_memory import D2LMemory

    with D2LMemory(tmp_path_factory.mktemp("langchain-d2l")) as mem:
        yield mem
