"""The chatbot's terminal face: its REPL loop fed scripted lines, over a real `D2LMemory` (model, hypernetwork,
LanceDB). Answers are kept to a few tokens; what is checked is the commands and what gets absorbed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from d2l_memory import D2LMemory
from examples.chatbot.conversation import Conversation
from examples.chatbot.terminal import repl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def memory(tmp_path_factory) -> Iterator[D2LMemory]:
    with D2LMemory(tmp_path_factory.mktemp("chatbot-terminal")) as mem:
        yield mem


def test_repl_absorbs_lists_scopes_and_forgets(memory, capsys):
    conversation = Conversation(memory, "alice", mode="none", max_new_tokens=4)
    repl(conversation, ["Hi, I'm Alice and I keep bees.", "/new", "/memories", "/quit", "never read"])
    [record] = memory.list("alice")
    assert record.kind == "chat" and record.metadata == {"source": "chatbot"}
    assert record.text == "User: Hi, I'm Alice and I keep bees."  # the bot's reply is not remembered
    out = capsys.readouterr().out
    assert record.id in out and "User: Hi, I'm Alice" in out and "never read" not in out
    assert conversation.messages == []  # /new absorbed it; /quit had nothing left to absorb
    assert len(memory.list("alice")) == 1

    repl(conversation, [
        "/user bob", "/memories", f"/forget {record.id}",  # Bob cannot reach Alice's memory
        "/user x' OR '1'='1",  # refused by the store; still Bob
        "/mode telepathy", "/mode context", "/frobnicate", "/forget",
        "/user alice", f"/forget {record.id}", "/memories",
        "Please remember that I like jazz.", "/forget all",  # forgetting all drops the open conversation too
    ])
    captured = capsys.readouterr()
    assert "bob has no memories." in captured.out and "alice has no memories." in captured.out
    assert f"bob has no memory {record.id}" in captured.err
    assert "not allowed" in captured.err and "unknown mode 'telepathy'" in captured.err
    assert "unknown command /frobnicate" in captured.err and "say what to forget" in captured.err
    assert "Mode: context" in captured.out and "Forgot 1 memory of alice." in captured.out
    assert "Forgot 0 memories of alice." in captured.out
    assert conversation.user_id == "alice" and conversation.mode == "context"
    assert memory.list("alice") == [] and memory.list("bob") == []
