"""`D2LMemory`: the public API. It only orchestrates; each step is another module's one job.

    absorb: text -> validate -> DocToLoRA (chunk, encode, hypernetwork) -> LoRA -> MemoryStore (one commit)
    chat:   query -> MemoryStore.search (scoped) -> relevance gate -> compose -> Engine -> text

It is also the one door of everything built on the library (the CLI, the LangChain integration, the
examples): what they need of the store, the engine or the tokenizer is a method here, so none of them
reaches into `store`, `engine`, `d2l` or `cache`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from d2l_memory.chunking import plain_ids, validate_text
from d2l_memory.compose import (
    DEFAULT_WEIGHTING,
    RELEVANCE_TEMPERATURE,
    Composed,
    ComposedCache,
    Recipe,
    cache_root_for,
    member_weights,
)
from d2l_memory.d2l import DocToLoRA
from d2l_memory.engines import Adapter, Engine, EngineKind, GenerationParams, Message, make_engine
from d2l_memory.engines.base import render_chat
from d2l_memory.engines.vllm_server import evict_from_servers
from d2l_memory.errors import D2LMemoryError, MemoryNotFoundError
from d2l_memory.kinds import KINDS, MODES, Kind, Weighting
from d2l_memory.models import DEFAULT_MODEL, load_model
from d2l_memory.prompts import QA_TEMPLATE
from d2l_memory.store import MemoryInput, MemoryStore, StoredMemory
from d2l_memory.store.schema import MEMORIES_TABLE
from d2l_memory.transcripts import refers_to_user, render_tool_output, segment_turns, transcript_turns

log = logging.getLogger(__name__)

PUBLISHED_NAMES = 10_000  # recipe names a process remembers having recorded in the store


class MemoryConfig(BaseModel):
    """Settings of a `D2LMemory` (all have defaults that work on a laptop CPU).

    The `max_*` fields are resource caps: each bounds what one call may cost, and each may be raised.

    Raises:
        ValueError: (pydantic's `ValidationError`) an unknown field, a value of the wrong type or out of
            range, or `k` above `max_k`.
    """

    model_config = ConfigDict(extra="forbid")

    base_model: str = DEFAULT_MODEL
    hypernet: str | None = Field(None, description="hypernetwork checkpoint dir; None = the shipped one")
    keep_text: bool = Field(True, description="store source text (needed for context/hybrid modes)")
    relevance_threshold: float = Field(0.35, ge=-1.0, le=1.0,
                                       description="memories whose best-matching part is less similar (MiniLM "
                                       "cosine) than this to the query are not used")
    personal_relevance_threshold: float = Field(
        0.25, ge=-1.0, le=1.0, description="the relevance threshold for a message that speaks of the user in the "
        "first person ('Where do I live?', `transcripts.refers_to_user`): it asks about their own life, and its "
        "memory is worded farther from it than a general question's document is")
    k: int = Field(4, ge=1, description="memories recalled per chat turn")
    max_k: int = Field(16, ge=1, description="largest k a chat turn may ask for (each recalled memory's adapter "
                       "is read and composed)")
    rank_budget: int = Field(64, ge=1, le=512, description="largest rank of a composed adapter (vLLM's "
                             "max_lora_rank must hold it)")
    composition: Weighting = Field(
        DEFAULT_WEIGHTING, description="how recalled memories' adapters combine: `relevance` (weights summing to "
        "1, shared by the recall scores: `compose.member_weights`), `mean` (weight 1/k each: k memories move "
        "the model as far as one) or `sum` (weight 1 each, the paper's concatenation); measured side by side "
        "in docs/benchmarks.md")
    relevance_temperature: float = Field(
        RELEVANCE_TEMPERATURE, gt=0.0, description="softmax temperature over recall scores (MiniLM cosines) "
        "for `composition='relevance'`: lower gives the best match more")
    segment_tokens: int = Field(256, ge=16, description="token budget of one chat memory (absorb_messages)")
    max_segments: int = Field(64, ge=1, description="absorb_messages refuses conversations of more segments "
                              "(their adapters are held in memory until the one commit: ~2 MB each)")
    max_document_chars: int = Field(64_000, ge=1, description="absorb() refuses longer texts")
    max_chunks: int = Field(32, ge=1, description="absorb() refuses texts of more chunks: an adapter grows by "
                            "about 1 MB per chunk of 512 tokens")
    max_answer_tokens: int = Field(1024, ge=1, description="largest max_new_tokens chat and stream accept")
    max_context_tokens: int = Field(6000, ge=64, description="text budget of the prompt in context/hybrid modes")
    composed_cache_bytes: int = Field(2 * 2**30, ge=0)
    storage_options: dict[str, SecretStr] = Field(
        default_factory=dict, repr=False,
        description="object-store settings for an `s3://`, `gs://` or `az://` store, as LanceDB names them, e.g. "
        "`{\"endpoint\": \"http://127.0.0.1:8333\", \"region\": \"us-east-1\", \"allow_http\": \"true\", "
        "\"aws_access_key_id\": ..., \"aws_secret_access_key\": ...}`; without them LanceDB reads the environment "
        "(`AWS_ENDPOINT`, `AWS_ACCESS_KEY_ID`, ...). Values are strings, kept as secrets: never in repr or JSON")

    @model_validator(mode="after")
    def _k_within_cap(self) -> MemoryConfig:
        if self.k > self.max_k:
            raise ValueError(f"k={self.k} exceeds max_k={self.max_k}")
        return self


class MemoryRecord(BaseModel):
    """One memory as users see it; `score` is the similarity to the query on recall hits."""

    model_config = ConfigDict(frozen=True)

    id: str
    user_id: str
    kind: Kind
    text: str | None
    created_at: datetime
    n_tokens: int
    n_chunks: int
    rank: int
    metadata: dict[str, Any] = Field(default_factory=dict)
    agent_id: str | None = None
    session_id: str | None = None
    score: float | None = None

    @classmethod
    def from_stored(cls, stored: StoredMemory) -> MemoryRecord:
        return cls(**stored.model_dump(include=set(cls.model_fields)))


class OptimizeReport(BaseModel):
    """What `D2LMemory.optimize` did to the store and its composed-adapter cache."""

    model_config = ConfigDict(frozen=True)

    memories: int = Field(description="memories in the store, of every user")
    versions_before: int = Field(description="table versions kept before")
    versions_after: int = Field(description="table versions kept after")
    composed_swept: int = Field(description="stale composed adapters removed since the memory was opened (opening "
                                "sweeps too) or last optimized")


class D2LMemory:
    """Long-term memory whose contents live in LoRA adapters.

    Opening is cheap: the store and its composed-adapter cache open at once (and the cache is swept of what
    a killed forget left), while the base model, the hypernetwork and the engine load on the first call
    that needs them, or on `load()`. Calls that only read or erase the store (`list`, `get`, `count`,
    `recall`, `relevant`, `embed`, `forget`, `optimize`) never load them.

    Args:
        path: the LanceDB store: a directory (created if missing), `s3://bucket/prefix` or `db://...`.
            Object storage is reached with `config.storage_options` (endpoint, credentials) or LanceDB's
            environment variables; the composed-adapter cache stays local whatever the store
            (`compose.cache_root_for`: a directory under `$D2L_MEMORY_HOME/composed` named by the URI).
        engine: `"transformers"` (embedded, default), `"vllm"` (offline vLLM in this process),
            `"vllm-server"`, or an `Engine` instance.
        config: settings; keyword arguments override single fields (`D2LMemory(p, k=8)`). The merged
            settings are validated before anything opens, and `self.config` is the validated result.

    Raises:
        ValueError: an unknown engine name, or (pydantic's `ValidationError`) an unknown setting or a bad
            value, e.g. `keep_txt=False` or `k="many"` (`k="4"` is taken as 4).
    """

    def __init__(self, path: str | Path, engine: EngineKind | Engine = "transformers",
                 config: MemoryConfig | None = None, **overrides: Any) -> None:
        self.config = MemoryConfig.model_validate({**(config or MemoryConfig()).model_dump(), **overrides})
        if not isinstance(engine, Engine) and engine not in get_args(EngineKind):
            raise ValueError(f"unknown engine {engine!r}; expected 'transformers', 'vllm' or 'vllm-server'")
        self._engine_kind = engine
        self._engine: Engine | None = engine if isinstance(engine, Engine) else None
        self._d2l: DocToLoRA | None = None
        self._closed = False
        self._published: set[str] = set()
        # Loading takes seconds and a model's worth of memory: one thread loads, the others wait for it.
        self._loading = threading.Lock()
        storage = {key: value.get_secret_value() for key, value in self.config.storage_options.items()}
        self.store = MemoryStore(path, keep_text=self.config.keep_text,
                                 connect_options={"storage_options": storage} if storage else None)
        self.cache = ComposedCache(cache_root_for(path), max_bytes=self.config.composed_cache_bytes)
        # Forgetting reaches every composed adapter that contains the memory, the engine's copy, and every
        # server that serves from this store's cache (two callbacks: a failed engine unload still unloads
        # from the servers); the sweep catches what a killed forget left behind.
        self.store.on_erase(self.cache.erase)
        self.cache.on_erase(self._evict_from_engine)
        self.cache.on_erase(self._evict_from_servers)
        self._swept = len(self.cache.sweep(self.store))

    # -- what loads on first use ---------------------------------------------------------------
    @property
    def d2l(self) -> DocToLoRA:
        """The base model and the hypernetwork, loaded on first use."""
        return self._d2l if self._d2l is not None else self._load_d2l()

    @property
    def engine(self) -> Engine:
        """The engine that generates answers, built on first use."""
        return self._engine if self._engine is not None else self._load_engine()

    def load(self) -> None:
        """Load the base model, the hypernetwork and the engine now instead of on first use (e.g. before a
        server takes requests, so that the first one does not wait seconds for them).

        Raises:
            D2LMemoryError: the memory is closed.
        """
        self._load_engine()

    def _load_d2l(self) -> DocToLoRA:
        with self._loading:
            if self._d2l is None:
                self._check_open()
                self._d2l = DocToLoRA.from_pretrained(self.config.hypernet, base=load_model(self.config.base_model))
            return self._d2l

    def _load_engine(self) -> Engine:
        d2l = self.d2l  # every engine built here shares the base model or reads the hypernetwork's targets
        with self._loading:
            if self._engine is None:
                self._check_open()
                self._engine = self._build_engine(d2l)
            return self._engine

    def _build_engine(self, d2l: DocToLoRA) -> Engine:
        if self._engine_kind == "transformers":
            return make_engine("transformers", self.config.base_model, loaded=d2l.base)
        # vLLM serves from the same composed cache; wrapping only the hypernetwork's targets keeps
        # multi-adapter throughput up (all linears wrapped measured 0.32x of base at 16 users).
        target = d2l.config.target.rsplit(".", 1)[-1]
        return make_engine(self._engine_kind, self.config.base_model, cache=self.cache,  # type: ignore[arg-type]
                           lora_target_modules=(target,))

    def _check_open(self) -> None:
        if self._closed:
            raise D2LMemoryError("this D2LMemory is closed: open a new one")

    def _evict_from_engine(self, names: list[str]) -> None:
        if self._engine is not None:  # an engine never built has no adapter loaded
            self._engine.evict(names)

    def _evict_from_servers(self, names: list[str]) -> None:
        evict_from_servers(self.cache, names)

    # -- writing -------------------------------------------------------------------------------
    def absorb(self, text: object, user_id: str, kind: str = "document", *, agent_id: str | None = None,
               session_id: str | None = None, metadata: Mapping[str, Any] | None = None) -> MemoryRecord:
        """Internalize `text` into an adapter and store it; returns once the memory is durable.

        Args:
            text: the document, chat transcript, or tool output (for `kind="tool"` a dict/list or JSON
                text is rendered into `key: value` lines first).
            user_id: whose memory it is; memories never reach another user's answers.
            kind: `document`, `chat` or `tool`.

        Raises:
            TypeError: text that is not str (bytes included), or a tool output that is not JSON.
            ValueError: empty/whitespace text, lone surrogates, a text over `max_document_chars` or
                `max_chunks`, an unknown kind, or an invalid id. Nothing stored changes.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
        if kind == "tool":
            text = render_tool_output(text)
        return self._absorb([text], user_id, kind, agent_id, session_id, metadata)[0]

    def absorb_messages(self, messages: object, user_id: str, *, agent_id: str | None = None,
                        session_id: str | None = None, segment_tokens: int | None = None,
                        metadata: Mapping[str, Any] | None = None,
                        roles: Collection[str] | None = None) -> list[MemoryRecord]:
        """Absorb a conversation as `chat` memories, cut at turn boundaries into segments of at most
        `segment_tokens` tokens (default `config.segment_tokens`; a longer single turn is its own segment).
        All segments are stored in one commit: after a failure none is, so a retry stores each once.

        Args:
            roles: absorb only the turns of these roles, e.g. `("user",)` to remember what the user said
                and not the assistant's replies (a reply that dodged a question would otherwise become the
                memory that best matches that question). None absorbs every turn.

        Raises:
            TypeError / ValueError: unreadable messages, no text in the kept turns, a non-positive token
                budget, more than `max_segments` segments, or what `absorb` raises for a segment.
        """
        budget = self.config.segment_tokens if segment_tokens is None else segment_tokens
        turns = transcript_turns(messages, roles)
        if not turns:
            raise ValueError("messages hold no text" if roles is None else
                             f"messages hold no text from the roles {sorted(roles)}")
        segments = segment_turns(turns, self.count_tokens, budget)
        if len(segments) > self.config.max_segments:
            raise ValueError(f"the conversation makes {len(segments)} segments, over max_segments="
                             f"{self.config.max_segments}; absorb it in parts or raise the cap")
        return self._absorb(segments, user_id, "chat", agent_id, session_id, metadata)

    def _absorb(self, texts: Sequence[object], user_id: str, kind: str, agent_id: str | None,
                session_id: str | None, metadata: Mapping[str, Any] | None) -> list[MemoryRecord]:
        """Check every text, internalize them all, then store them all in one commit."""
        self.store.validate_scope(user_id=user_id, agent_id=agent_id, session_id=session_id)
        checked = [validate_text(text) for text in texts]
        counts = []
        for text in checked:
            if len(text) > self.config.max_document_chars:
                raise ValueError(f"text has {len(text):,} characters, over max_document_chars="
                                 f"{self.config.max_document_chars:,}; split it or raise the cap")
            n_tokens = self.count_tokens(text)
            n_chunks = math.ceil(n_tokens / self.d2l.config.chunk_tokens)
            if n_chunks > self.config.max_chunks:
                raise ValueError(f"text has {n_tokens:,} tokens, {n_chunks} chunks of "
                                 f"{self.d2l.config.chunk_tokens}: over max_chunks={self.config.max_chunks}; "
                                 "split it or raise the cap")
            counts.append(n_tokens)
        loras = self.d2l.internalize_batch(checked)
        stored = self.store.add_many([
            MemoryInput(user_id=user_id, adapter=lora, text=text, kind=kind, agent_id=agent_id,
                        session_id=session_id, n_tokens=n_tokens, metadata=dict(metadata or {}))
            for text, lora, n_tokens in zip(checked, loras, counts, strict=True)])
        return [MemoryRecord.from_stored(m) for m in stored]

    def forget(self, memory_id: str | Collection[str] | None = None, *, user_id: str | None = None) -> int:
        """Forget memories of `user_id`: one (`memory_id`), several (a list of ids), or all of them (no id).

        Forgetting is exact: the rows go, the store's files are rewritten without them and older table
        versions dropped (one rewrite per call, however many ids), every composed adapter containing one
        is erased and unloaded from the engine and from every server serving this store's cache.
        An id that is not the user's counts as not found: no caller can forget, or learn of, another
        user's memory. A caller without a user id (an operator tool) uses `store.delete(memory_id,
        purge=True)`. Loads no model: an engine never built has no adapter to unload.

        Returns:
            the number of memories removed (0 for ids already gone or not the user's).

        Raises:
            ValueError: no `user_id` (the message says how to pass it), or an invalid id.
        """
        if user_id is None:
            raise ValueError("forget needs the memories' user_id: forget(memory_id, user_id=...) forgets one "
                             "memory of that user, forget(user_id=...) all of them")
        if memory_id is None:
            return self.store.delete_user(user_id)
        ids = [memory_id] if isinstance(memory_id, str) else list(memory_id)
        return self.store.delete_many(ids, user_id=user_id, purge=True) if ids else 0

    # -- reading -------------------------------------------------------------------------------
    def recall(self, query: str, user_id: str, k: int | None = None, *, agent_id: str | None = None,
               session_id: str | None = None, kind: str | None = None) -> list[MemoryRecord]:
        """The user's memories most similar to `query`, best first (no gating): each scored by its best-matching
        part (whole text or sentence), ranked with full-text search fused in when the store keeps text
        (`MemoryStore.search`).

        Raises:
            TypeError / ValueError: an invalid query, id, kind or k.
        """
        validate_text(query, "query")
        k = self.config.k if k is None else k
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        hits = self.store.search(query, user_id, k=k, agent_id=agent_id, session_id=session_id,
                                 kind=kind, hybrid=self.store.keep_text)  # type: ignore[arg-type]
        return [MemoryRecord.from_stored(h) for h in hits]

    def relevant(self, query: str, user_id: str, k: int | None = None, **scope: Any) -> list[MemoryRecord]:
        """`recall`, keeping only memories at or above the relevance threshold: `config.relevance_threshold`,
        or `config.personal_relevance_threshold` for a query that speaks of the user (`refers_to_user`)."""
        threshold = self.config.personal_relevance_threshold if refers_to_user(query) \
            else self.config.relevance_threshold
        return [h for h in self.recall(query, user_id, k, **scope) if h.score is not None and h.score >= threshold]

    def get(self, memory_id: str, *, user_id: str) -> MemoryRecord | None:
        """The user's memory with this id; None when there is none or it is another user's (a caller
        cannot tell the two apart, so an id never reveals another user's memory).

        Raises:
            ValueError: an invalid memory or user id.
        """
        self.store.validate_scope(user_id=user_id)
        found = self.store.get(memory_id)
        return MemoryRecord.from_stored(found) if found is not None and found.user_id == user_id else None

    def count(self, user_id: str) -> int:
        """How many memories `user_id` has.

        Raises:
            ValueError: an invalid user id.
        """
        return self.store.count(user_id)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of `texts` as recall computes them: float32 `[len(texts), 384]`, unit-norm rows, so a
        dot product is the cosine similarity that `recall` scores by.

        Raises:
            TypeError: one string instead of a sequence of them.
        """
        return self.store.embedder.embed(texts)

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` in the base model's tokenizer, as plain text (special-token strings included)."""
        return len(plain_ids(self.d2l.base.tokenizer, text))

    def prepare(self, message: str, user_id: str, mode: str = "adapter", k: int | None = None,
                history: Sequence[Mapping[str, str]] = (),
                **scope: Any) -> tuple[list[dict[str, str]], Composed | None]:
        """The engine request one chat turn becomes: `(messages, adapter or None)`, for `generate` or
        `generate_stream` (or another model: the adapter's serving name is `adapter_name(adapter)`).

        Raises:
            ValueError: an unknown mode, a `k` above `config.max_k`, or what `recall` raises.
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        validate_text(message, "message")
        if isinstance(k, int) and k > self.config.max_k:
            raise ValueError(f"k={k} exceeds max_k={self.config.max_k}")
        for attempt in range(2):
            hits = [] if mode == "none" else self.relevant(message, user_id, k, **scope)
            adapter = None
            if mode in ("adapter", "hybrid") and hits:
                recipe = Recipe(members=self._weighted(hits), base_model=self.d2l.base.model_id,
                                hypernet=self.d2l.checksum, rank_budget=self.config.rank_budget)
                try:
                    adapter = self.cache.get_or_compose(recipe, self.store)
                    self._publish(recipe)
                except MemoryNotFoundError:
                    if attempt:
                        raise
                    continue  # a recalled memory was forgotten meanwhile: recall again, without it
            break
        snippets = [h.text for h in hits if h.text] if mode == "context" else \
            [h.text for h in hits[:1] if h.text] if mode == "hybrid" else []
        content = message
        if snippets:
            content = QA_TEMPLATE.format(context=self._fit("\n\n".join(snippets)), question=message)
        return [*map(dict, history), {"role": "user", "content": content}], adapter

    def _weighted(self, hits: Sequence[MemoryRecord]) -> tuple[tuple[str, float], ...]:
        weights = member_weights(self.config.composition, [h.score or 0.0 for h in hits],
                                 self.config.relevance_temperature)
        return tuple((h.id, w) for h, w in zip(hits, weights, strict=True) if w > 0)

    def _publish(self, recipe: Recipe) -> None:
        # Recorded in the store so that a server replica with a cache of its own (no shared folder) builds
        # the adapter by name; once per name and process, as the store keeps it until a member is erased.
        if recipe.name in self._published:
            return
        self.store.put_recipe(recipe.name, recipe.model_dump_json(), recipe.memory_ids)
        if len(self._published) >= PUBLISHED_NAMES:
            self._published.clear()
        self._published.add(recipe.name)

    def _fit(self, text: str) -> str:
        ids = plain_ids(self.d2l.base.tokenizer, text)
        if len(ids) <= self.config.max_context_tokens:
            return text
        return self.d2l.base.tokenizer.decode(ids[: self.config.max_context_tokens])

    def chat(self, message: str, user_id: str, mode: str = "adapter", max_new_tokens: int = 64, *,
             k: int | None = None, history: Sequence[Mapping[str, str]] = (), **scope: Any) -> str:
        """Answer `message` for `user_id` using their memories the way `mode` says.

        Modes (same retrieval for all, so they compare fairly): `adapter` composes the relevant
        memories' adapters and puts nothing about them in the prompt; `context` puts their text in the
        prompt (the classic baseline); `hybrid` does both with only the best snippet; `none` uses the
        base model alone. With no relevant memory, every mode is the untouched base model.

        Raises:
            ValueError: what `prepare` raises, or `max_new_tokens` above `config.max_answer_tokens`.
        """
        params = self._capped(GenerationParams(max_new_tokens=max_new_tokens))
        messages, adapter = self.prepare(message, user_id, mode, k, history, **scope)
        return self.engine.generate(messages, adapter, params)

    def stream(self, message: str, user_id: str, mode: str = "adapter", max_new_tokens: int = 64, *,
               k: int | None = None, history: Sequence[Mapping[str, str]] = (), **scope: Any) -> Iterator[str]:
        """`chat`, yielding text pieces as they are generated.

        The generator may be stepped from any thread (a web server's pool) and several streams interleave:
        the embedded engine locks the model for one token at a time. Close it (or exhaust it) when the
        reader leaves; with vLLM an open stream holds that engine until then.
        """
        params = self._capped(GenerationParams(max_new_tokens=max_new_tokens))
        messages, adapter = self.prepare(message, user_id, mode, k, history, **scope)
        yield from self.engine.stream(messages, adapter, params)

    def list(self, user_id: str, **scope: Any) -> list[MemoryRecord]:
        """All of a user's memories (optionally narrowed by agent_id, session_id, kind)."""
        return [MemoryRecord.from_stored(m) for m in self.store.list(user_id, **scope)]

    # -- a prepared request (`prepare`'s, or one of a chat model built on this memory) ------------
    def generate(self, messages: Sequence[Message], adapter: Adapter | None = None,
                 params: GenerationParams | None = None) -> str:
        """The engine's answer to `messages` with `adapter` applied (None: the base model), decoded as
        `params` says (None: greedy, 64 tokens).

        Raises:
            ValueError: `params.max_new_tokens` above `config.max_answer_tokens`, or what the engine
                raises for the messages (an unknown role, an empty chat).
        """
        return self.engine.generate(messages, adapter, self._capped(params))

    def generate_stream(self, messages: Sequence[Message], adapter: Adapter | None = None,
                        params: GenerationParams | None = None) -> Iterator[str]:
        """`generate`, as text pieces while they are produced (close the iterator when the reader leaves).

        Raises:
            ValueError: what `generate` raises; the cap is checked at the call, before any piece.
        """
        return self.engine.stream(messages, adapter, self._capped(params))

    def _capped(self, params: GenerationParams | None) -> GenerationParams:
        params = params or GenerationParams()
        if params.max_new_tokens > self.config.max_answer_tokens:
            raise ValueError(f"max_new_tokens={params.max_new_tokens} exceeds max_answer_tokens="
                             f"{self.config.max_answer_tokens}")
        return params

    def count_prompt_tokens(self, messages: Sequence[Message], params: GenerationParams | None = None) -> int:
        """Tokens of the prompt every engine renders for `messages`: the chat template, and the tools that
        `params` states (`engines.base.render_chat`; the prompt is not cut to the model's window).

        Raises:
            TypeError / ValueError: messages that are not a non-empty chat of known roles.
        """
        tools = params.stated_tools if params is not None else ()
        return len(render_chat(self.d2l.base.tokenizer, messages, tools=tools))

    def adapter_name(self, adapter: Adapter | None) -> str:
        """The model name a request with `adapter` goes to on an OpenAI-compatible server that serves this
        store's composed cache (`d2l-memory serve --store`): the base model's id for None.

        Raises:
            TypeError: a bare `LoRA` for an engine that keeps no cache to write it to.
        """
        return self.engine.adapter_name(adapter)

    @property
    def model_name(self) -> str:
        """The id of the base model that answers (the engine's `model_id`), known without loading it."""
        # An engine built from a name serves `config.base_model` under that very id.
        return self._engine.model_id if self._engine is not None else self.config.base_model

    # -- the store -------------------------------------------------------------------------------
    @property
    def uri(self) -> str:
        """Where the store lives: the directory or URI it was opened with."""
        return self.store.uri

    @property
    def keep_text(self) -> bool:
        """Whether memories keep their source text (`config.keep_text`)."""
        return self.store.keep_text

    def optimize(self, older_than: timedelta = timedelta(minutes=1)) -> OptimizeReport:
        """Compact the store, fold new memories into its indices, drop table versions older than
        `older_than`, and sweep the composed-adapter cache; loads no model. Run it periodically (cron, or
        after a bulk import): every write adds a version, and memories added since the index was built are
        scanned without it. `older_than=timedelta(0)` keeps only the latest version: only when nothing
        else reads the store.
        """
        before = self.store.version_count()
        self.store.optimize(older_than=older_than)
        swept, self._swept = self._swept + len(self.cache.sweep(self.store)), 0
        return OptimizeReport(memories=self.store.count(), versions_before=before,
                              versions_after=self.store.version_count(), composed_swept=swept)

    @staticmethod
    def validate_scope(*, user_id: str, agent_id: str | None = None, session_id: str | None = None,
                       kind: str | None = None) -> None:
        """Check ids and a kind as every call does, without a store (e.g. a user id from a form, before
        anything is spent on it).

        Raises:
            ValueError: an id outside 1-256 letters, digits and `_ . : @ + / = -`, or an unknown kind.
        """
        MemoryStore.validate_scope(user_id=user_id, agent_id=agent_id, session_id=session_id, kind=kind)

    @staticmethod
    def store_exists(path: str | Path) -> bool:
        """Whether `path` holds a memory store, checked without opening one (opening creates it). A URI
        (`s3://`, `db://`) is taken to hold one: only connecting could tell."""
        return "://" in str(path) or (Path(path) / f"{MEMORIES_TABLE}.lance").is_dir()

    # -- async twins and lifecycle ---------------------------------------------------------------
    async def aabsorb(self, text: object, user_id: str, kind: str = "document", **kw: Any) -> MemoryRecord:
        """`absorb` without blocking the event loop."""
        return await asyncio.to_thread(self.absorb, text, user_id, kind, **kw)

    async def achat(self, message: str, user_id: str, mode: str = "adapter", max_new_tokens: int = 64,
                    **kw: Any) -> str:
        """`chat` without blocking the event loop."""
        return await asyncio.to_thread(self.chat, message, user_id, mode, max_new_tokens, **kw)

    def close(self) -> None:
        """Release the engine (when one was built or given) and the store; a closed memory loads nothing."""
        with self._loading:
            self._closed = True
        if self._engine is not None:
            self._engine.close()
        self.store.close()

    def __enter__(self) -> D2LMemory:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
