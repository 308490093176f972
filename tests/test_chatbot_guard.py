"""The web chatbot is a local demo that lets no other site, host or oversized request in and tells no
internals: its guards, over a stand-in memory (no model)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from d2l_memory.errors import D2LMemoryError
from examples.chatbot import web
from examples.chatbot.web import MAX_BODY_BYTES, MAX_CONVERSATION_CHARS, create_app

URL = "http://127.0.0.1:8000"
HI = {"message": "hi", "mode": "none"}


class StandIn:
    """What the app calls on a `D2LMemory`, recording the calls; `fail` makes `list` raise it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail: Exception | None = None

    def list(self, user_id: str, **scope: Any) -> list:
        self.calls.append("list")
        if self.fail is not None:
            raise self.fail
        return []

    def stream(self, message: str, user_id: str, *args: Any, **kwargs: Any) -> Iterator[str]:
        self.calls.append("stream")
        yield "hello"

    def absorb_messages(self, messages: Any, user_id: str, **kwargs: Any) -> list:
        self.calls.append("absorb_messages")
        return []


@pytest.fixture
def memory() -> StandIn:
    return StandIn()


@pytest.fixture
def client(memory) -> Iterator[TestClient]:
    with TestClient(create_app(memory), base_url=URL, raise_server_exceptions=False) as test_client:
        yield test_client


def test_the_page_says_it_is_a_local_demo(client) -> None:
    assert "A local demo" in client.get("/").text


def test_only_the_hosts_it_serves_are_answered(client) -> None:
    assert client.get("/api/modes").status_code == 200
    assert client.get("/api/modes", headers={"Host": "localhost:9999"}).status_code == 200
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.nip.io:8000"):  # DNS rebinding's Host
        assert client.get("/api/modes", headers={"Host": host}).status_code == 400


def test_other_sites_cannot_post_or_read(client, memory) -> None:
    assert client.post("/api/chat?user=alice", json=HI, headers={"Origin": URL}).text == "hello"
    for origin in ("https://evil.example", "http://127.0.0.1:8001", "null", "http://localhost:8000"):
        reply = client.post("/api/chat?user=alice", json=HI, headers={"Origin": origin})
        assert reply.status_code == 403 and "other sites" in reply.json()["detail"]
    assert client.delete("/api/memories?user=alice", headers={"Origin": "https://evil.example"}).status_code == 403
    assert client.get("/api/memories?user=alice", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert memory.calls == ["stream"]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_a_body_a_plain_form_can_send_is_not_read_as_json(client, memory, content_type) -> None:
    # What a cross-site <form> or a no-cors fetch can post without a preflight (FastAPI >= 0.132).
    headers = {} if content_type is None else {"Content-Type": content_type}
    reply = client.post("/api/chat?user=alice", content=json.dumps(HI), headers=headers)
    assert reply.status_code == 422 and memory.calls == []


def test_bodies_and_conversations_are_capped(client, memory) -> None:
    big = json.dumps({**HI, "history": [{"role": "user", "content": "x" * 8000}] * 140})
    assert len(big) > MAX_BODY_BYTES
    reply = client.post("/api/chat?user=alice", content=big, headers={"Content-Type": "application/json"})
    assert reply.status_code == 413

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536].encode()

    reply = client.post("/api/chat?user=alice", content=chunked(), headers={"Content-Type": "application/json"})
    assert reply.status_code == 413
    turns = [{"role": "user", "content": "y" * 8000}] * (MAX_CONVERSATION_CHARS // 8000 + 1)
    reply = client.post("/api/conversations?user=alice", json={"messages": turns})
    assert reply.status_code == 413 and "start a new one" in reply.json()["detail"]
    assert memory.calls == []
    assert client.post("/api/conversations?user=alice", json={"messages": turns[:1]}).status_code == 200


def test_errors_keep_internals_out_of_responses(client, memory) -> None:
    reply = client.get("/api/memories?user=x'%20OR%20'1'='1")
    assert reply.status_code == 400 and "not allowed" in reply.json()["detail"]  # about the client's own input
    for error, status in [(D2LMemoryError("store at /srv/secret/db is corrupt"), 500),
                          (ValueError("lance: /srv/secret/db/memories.lance: bad file"), 400),
                          (RuntimeError("/srv/secret/db exploded"), 500)]:
        memory.fail = error
        reply = client.get("/api/memories?user=alice")
        assert reply.status_code == status and "secret" not in reply.text, reply.text


def test_it_listens_on_loopback_unless_told_otherwise(monkeypatch) -> None:
    opened: list[str] = []
    monkeypatch.setattr("d2l_memory.cli.open_memory", lambda store: opened.append(store))
    with pytest.raises(SystemExit):
        web.main(["--host", "0.0.0.0"])
    assert opened == []
