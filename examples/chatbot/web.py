"""The chatbot's web face: a FastAPI app serving one static page and a small JSON API over `D2LMemory`.

    python -m examples.chatbot.web --store DIR [--port 8000] [--max-new-tokens 128]

A local demo, not a service: it has no accounts, and the user is whoever the `user` query parameter names,
so anyone who can reach it can read and forget every user's memories. It therefore listens on loopback
(another host needs `--allow-remote`), answers only requests whose Host is one it serves (no DNS
rebinding) and whose Origin, when a browser sends one, is its own page (no other site can post to it; the
JSON bodies need `Content-Type: application/json`, which FastAPI >= 0.132 enforces and no plain HTML form
can send), refuses bodies over `MAX_BODY_BYTES` and conversations over `MAX_CONVERSATION_CHARS`, and keeps
internal error details in its log, out of responses.

The server keeps no conversation state: the page holds each user's conversation and sends it along with
every message, and sends it whole to `POST /api/conversations` when the user ends it (it is absorbed
then). Every endpoint takes the user in the `user` query parameter and scopes every memory call by it;
ids the store refuses come back as HTTP 400 with the store's message, another user's memory id as 404.

    GET    /                          the page
    GET    /api/modes                 {"modes": [...], "default": "hybrid"}
    GET    /api/memories?user=U       U's memories, newest first
    DELETE /api/memories?user=U       forget all of U's memories -> {"forgotten": n}
    DELETE /api/memories/ID?user=U    forget one of U's memories -> {"forgotten": 1}
    POST   /api/chat?user=U           {"message", "mode", "history"} -> the answer, streamed as plain text
    POST   /api/conversations?user=U  {"messages"} -> the memories the conversation became
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import iterate_in_threadpool, run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as ASGIMessage

from d2l_memory import MODES, D2LMemory, D2LMemoryError, MemoryNotFoundError, MemoryRecord, validate_text
from d2l_memory.engines.vllm_server import is_loopback
from examples.chatbot.conversation import DEFAULT_MODE, Conversation, check_mode, check_user, forget, memories

log = logging.getLogger(__name__)
T = TypeVar("T")

PAGE = Path(__file__).with_name("static") / "index.html"
MAX_MESSAGE_CHARS = 8_000  # one message; the model's context is a few thousand tokens anyway
MAX_MESSAGES = 200  # one conversation
# What one ended conversation may hold: about 30 memories of 256 tokens, each a forward pass and ~2 MB of
# adapter (the library's own cap, `MemoryConfig.max_segments`, is 64).
MAX_CONVERSATION_CHARS = 32_000
MAX_BODY_BYTES = 1 << 20  # a whole conversation at the caps above, JSON-escaped, fits
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")


class Message(BaseModel):
    """One turn of a conversation, as the page keeps it."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: str = Field(max_length=MAX_MESSAGE_CHARS)


class ChatRequest(BaseModel):
    """A new message, with the conversation so far."""

    model_config = ConfigDict(extra="forbid")

    message: str = Field(max_length=MAX_MESSAGE_CHARS)
    mode: str = DEFAULT_MODE
    history: list[Message] = Field(default_factory=list, max_length=MAX_MESSAGES)


class Finished(BaseModel):
    """A conversation the user has ended, to be absorbed."""

    model_config = ConfigDict(extra="forbid")

    messages: list[Message] = Field(max_length=MAX_MESSAGES)


def _refusal(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


class SameOrigin:
    """ASGI middleware: refuse what a browser sends from another site, and bodies over `max_body` bytes.

    A request whose `Origin` is not this server's own (scheme http(s), and exactly the host and port its
    `Host` header names) is a 403, and so is one a browser marks `Sec-Fetch-Site: cross-site`; requests
    without either (curl, scripts) pass. The body is read here, up to `max_body` bytes (413 beyond), and
    handed on whole.
    """

    def __init__(self, app: ASGIApp, max_body: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin, host = headers.get("origin"), headers.get("host", "")
        if headers.get("sec-fetch-site") == "cross-site" or (origin is not None and not _own(origin, host)):
            await _refusal(403, "requests from other sites are refused: this local demo has no accounts")(
                scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                await _refusal(413, f"request bodies are limited to {self.max_body:,} bytes")(scope, receive, send)
                return
        replayed = False

        async def replay() -> ASGIMessage:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body, the client's disconnect (a stream stops on it)
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _own(origin: str, host: str) -> bool:
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and bool(host) and parts.netloc.lower() == host.lower()


def _checked(check: Callable[[Any], T], value: Any) -> T:
    """`check(value)`; its ValueError (a message about the client's own input) as a 400."""
    try:
        return check(value)
    except (TypeError, ValueError) as exc:
        raise HTTPException(400, str(exc)) from None


def _user(user: Annotated[str, Query(description="whose memories: 1-256 letters, digits and _ . : @ + / = -")]) -> str:
    return _checked(check_user, user)


User = Annotated[str, Depends(_user)]


async def _answer(first: str | None, pieces: Generator[str, None, None]) -> AsyncIterator[str]:
    """`first`, then the rest of the answer, each piece generated on a pool thread (the engine allows any
    thread); a client that leaves closes the generator, which stops the generation."""
    try:
        if first is not None:
            yield first
            async for piece in iterate_in_threadpool(pieces):
                yield piece
    finally:
        await run_in_threadpool(pieces.close)


def _records(records: list[MemoryRecord]) -> list[dict[str, Any]]:
    return [r.model_dump(mode="json") for r in records]


def create_app(memory: D2LMemory, max_new_tokens: int = 128, hosts: Sequence[str] = LOCAL_HOSTS) -> FastAPI:
    """The chatbot app over `memory` (which the caller opens and closes): a local demo (module docstring).

    Args:
        memory: the long-term memory every user's answers and memories come from.
        max_new_tokens: longest answer, in tokens.
        hosts: the host names requests may address (their `Host` header, any port); others get a 400.
    """
    app = FastAPI(title="d2l-memory chatbot (local demo)", docs_url="/api/docs", redoc_url=None)
    app.add_middleware(SameOrigin)
    # added last, so it runs first: a request for a foreign Host is refused before anything reads its body
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(hosts))

    # The client's own input errors are 400s with their message (`_checked`). Whatever else the library
    # raises is logged here and answered without its details (paths, ids, internals); any other exception
    # gets Starlette's bare 500.
    @app.exception_handler(ValueError)
    @app.exception_handler(TypeError)
    @app.exception_handler(D2LMemoryError)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        if isinstance(exc, MemoryNotFoundError):
            return _refusal(404, "not found")
        if isinstance(exc, D2LMemoryError):
            return _refusal(500, "internal error")
        return _refusal(400, "the request was refused")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/api/modes")
    def modes() -> dict[str, Any]:
        return {"modes": list(MODES), "default": DEFAULT_MODE}

    @app.get("/api/memories")
    def list_memories(user: User) -> list[dict[str, Any]]:
        return _records(memories(memory, user))

    @app.delete("/api/memories")
    def forget_all(user: User) -> dict[str, int]:
        return {"forgotten": forget(memory, user)}

    @app.delete("/api/memories/{memory_id}")
    def forget_one(memory_id: str, user: User) -> dict[str, int]:
        try:
            return {"forgotten": _checked(lambda i: forget(memory, user, i), memory_id)}
        except MemoryNotFoundError:
            raise HTTPException(404, f"{user} has no memory {memory_id}") from None

    @app.post("/api/chat")
    async def chat(body: ChatRequest, user: User) -> StreamingResponse:
        _checked(check_mode, body.mode)
        _checked(lambda text: validate_text(text, "message"), body.message)
        conversation = Conversation(memory, user, body.mode, max_new_tokens,
                                    messages=[m.model_dump() for m in body.history])
        pieces = conversation.reply(body.message)
        # The first piece is awaited here, so a failure before the answer is an error status, not a broken stream.
        first = await run_in_threadpool(next, pieces, None)
        return StreamingResponse(_answer(first, pieces), media_type="text/plain; charset=utf-8")

    @app.post("/api/conversations")
    def end_conversation(body: Finished, user: User) -> list[dict[str, Any]]:
        size = sum(len(m.content) for m in body.messages)
        if size > MAX_CONVERSATION_CHARS:
            raise HTTPException(413, f"this conversation has {size:,} characters, more than the "
                                f"{MAX_CONVERSATION_CHARS:,} one conversation may hold: start a new one sooner")
        conversation = Conversation(memory, user, messages=[m.model_dump() for m in body.messages])
        return _records(conversation.end())

    return app


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, load the memory, and serve the app until Ctrl-C."""
    import uvicorn

    from d2l_memory.cli import open_memory

    parser = argparse.ArgumentParser(prog="python -m examples.chatbot.web", description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="./chatbot-memories", help="memory store directory or LanceDB URI")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (loopback by default)")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow a --host other than loopback: then anyone who reaches it can read and forget "
                             "every user's memories, as the demo has no accounts")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest answer, in tokens")
    args = parser.parse_args(argv)
    hosts = LOCAL_HOSTS
    if not is_loopback(args.host):
        if not args.allow_remote:
            parser.error(f"--host {args.host} is not loopback: this local demo has no accounts, so anyone who "
                         "reaches it could act as any user; pass --allow-remote to do it anyway")
        hosts = (*LOCAL_HOSTS, args.host)
    with open_memory(args.store) as memory:
        print(f"The chatbot (a local demo) is at http://{args.host}:{args.port}/ (Ctrl-C to stop)")
        uvicorn.run(create_app(memory, args.max_new_tokens, hosts), host=args.host, port=args.port,
                    log_level="warning")


if __name__ == "__main__":
    main()
