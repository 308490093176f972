"""The chatbot's web face: a FastAPI app serving one static page and a small JSON API over `D2LMemory`.

    python -m examples.chatbot.web --store DIR [--port 8000] [--max-new-tokens 128]

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
from collections.abc import AsyncIterator, Generator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import iterate_in_threadpool, run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from d2l_memory import MODES, D2LMemory, MemoryRecord
from d2l_memory.errors import D2LMemoryError, MemoryNotFoundError
from examples.chatbot.conversation import DEFAULT_MODE, Conversation, forget, memories

PAGE = Path(__file__).with_name("static") / "index.html"
MAX_MESSAGE_CHARS = 8_000  # one message; the model's context is a few thousand tokens anyway
MAX_MESSAGES = 200  # one conversation

User = Annotated[str, Query(description="whose memories: 1-256 letters, digits and _ . : @ + / = -")]


class Message(BaseModel):
    """One turn of a conversation, as the page keeps it."""

    role: Literal["user", "assistant"]
    content: str = Field(max_length=MAX_MESSAGE_CHARS)


class ChatRequest(BaseModel):
    """A new message, with the conversation so far."""

    message: str = Field(max_length=MAX_MESSAGE_CHARS)
    mode: str = DEFAULT_MODE
    history: list[Message] = Field(default_factory=list, max_length=MAX_MESSAGES)


class Finished(BaseModel):
    """A conversation the user has ended, to be absorbed."""

    messages: list[Message] = Field(max_length=MAX_MESSAGES)


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


def create_app(memory: D2LMemory, max_new_tokens: int = 128) -> FastAPI:
    """The chatbot app over `memory` (which the caller opens and closes).

    Args:
        memory: the long-term memory every user's answers and memories come from.
        max_new_tokens: longest answer, in tokens.
    """
    app = FastAPI(title="d2l-memory chatbot", docs_url="/api/docs", redoc_url=None)

    @app.exception_handler(ValueError)
    @app.exception_handler(TypeError)
    async def bad_input(request: Request, exc: Exception) -> JSONResponse:
        # The library's and the store's user errors (an id that is not allowed, an empty message, an
        # unknown mode) carry a message meant for people.
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(MemoryNotFoundError)
    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(D2LMemoryError)
    async def memory_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=500)

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
        return {"forgotten": forget(memory, user, memory_id)}

    @app.post("/api/chat")
    async def chat(body: ChatRequest, user: User) -> StreamingResponse:
        conversation = Conversation(memory, user, body.mode, max_new_tokens,
                                    messages=[m.model_dump() for m in body.history])
        pieces = conversation.reply(body.message)
        # The first piece is awaited here, so a bad id or an empty message is a 400, not a broken stream.
        first = await run_in_threadpool(next, pieces, None)
        return StreamingResponse(_answer(first, pieces), media_type="text/plain; charset=utf-8")

    @app.post("/api/conversations")
    def end_conversation(body: Finished, user: User) -> list[dict[str, Any]]:
        conversation = Conversation(memory, user, messages=[m.model_dump() for m in body.messages])
        return _records(conversation.end())

    return app


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, load the memory, and serve the app until Ctrl-C."""
    import uvicorn

    from d2l_memory.cli import open_memory

    parser = argparse.ArgumentParser(prog="python -m examples.chatbot.web", description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="./chatbot-memories", help="memory store directory or LanceDB URI")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest answer, in tokens")
    args = parser.parse_args(argv)
    with open_memory(args.store) as memory:
        print(f"The chatbot is at http://{args.host}:{args.port}/ (Ctrl-C to stop)")
        uvicorn.run(create_app(memory, args.max_new_tokens), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
