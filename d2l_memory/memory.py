"""`D2LMemory`: the public API. It only orchestrates; each step is another module's one job.

    absorb: text -> validate -> DocToLoRA (chunk, encode, hypernetwork) -> LoRA -> MemoryStore (one commit)
    chat:   query -> MemoryStore.search (scoped) -> relevance gate -> compose -> Engine -> text
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from d2l_memory.chunking import validate_text
from d2l_memory.compose import ComposedCache, Recipe, cache_root_for, member_weight
from d2l_memory.d2l import DocToLoRA
from d2l_memory.engines import Engine, GenerationParams, make_engine
from d2l_memory.kinds import KINDS, MODES, Kind
from d2l_memory.models import DEFAULT_MODEL, load_model
from d2l_memory.prompts import QA_TEMPLATE
from d2l_memory.store import MemoryStore, StoredMemory
from d2l_memory.transcripts import render_tool_output, segment_turns, transcript_turns

log = logging.getLogger(__name__)


class MemoryConfig(BaseModel):
    """Settings of a `D2LMemory` (all have defaults that work on a laptop CPU)."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = DEFAULT_MODEL
    hypernet: str | None = Field(None, description="hypernetwork checkpoint dir; None = the shipped one")
    keep_text: bool = Field(True, description="store source text (needed for context/hybrid modes)")
    relevance_threshold: float = Field(0.2, ge=-1.0, le=1.0,
                                       description="memories less similar than this to the query are not used")
    k: int = Field(4, ge=1, description="memories recalled per chat turn")
    rank_budget: int = Field(64, ge=1, le=512, description="largest rank of a composed adapter (vLLM's "
                             "max_lora_rank must hold it)")
    composition: Literal["sum", "mean"] = Field(
        "mean", description="how recalled memories' adapters combine: `mean` (weight 1/k each: k memories move "
        "the model as far as one; the better of the two on conversations in docs/benchmarks.md) or `sum` "
        "(weight 1 each, the paper's concatenation)")
    segment_tokens: int = Field(256, ge=16, description="token budget of one chat memory (absorb_messages)")
    max_document_chars: int = Field(400_000, ge=1, description="absorb() refuses longer texts")
    max_context_tokens: int = Field(6000, ge=64, description="text budget of the prompt in context/hybrid modes")
    composed_cache_bytes: int = Field(2 * 2**30, ge=0)


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


class D2LMemory:
    """Long-term memory whose contents live in LoRA adapters.

    Args:
        path: the LanceDB store: a directory (created if missing), `s3://bucket/prefix` or `db://...`.
        engine: `"transformers"` (embedded, default), `"vllm"` (offline vLLM in this process),
            `"vllm-server"`, or an `Engine` instance.
        config: settings; keyword arguments override single fields (`D2LMemory(p, k=8)`).

    Raises:
        ValueError: an unknown engine name or bad config value.
    """

    def __init__(self, path: str | Path, engine: str | Engine = "transformers",
                 config: MemoryConfig | None = None, **overrides: Any) -> None:
        self.config = (config or MemoryConfig()).model_copy(update=overrides)
        MemoryConfig.model_validate(self.config.model_dump())
        base = load_model(self.config.base_model)
        self.d2l = DocToLoRA.from_pretrained(self.config.hypernet, base=base)
        self.store = MemoryStore(path, keep_text=self.config.keep_text)
        self.cache = ComposedCache(cache_root_for(path), max_bytes=self.config.composed_cache_bytes)
        if isinstance(engine, Engine):
            self.engine = engine
        elif engine == "transformers":
            self.engine = make_engine("transformers", self.config.base_model, loaded=base)
        elif engine in ("vllm", "vllm-server"):
            # vLLM serves from the same composed cache; wrapping only the hypernetwork's targets keeps
            # multi-adapter throughput up (all linears wrapped measured 0.32x of base at 16 users).
            target = self.d2l.config.target.rsplit(".", 1)[-1]
            self.engine = make_engine(engine, self.config.base_model, cache=self.cache,  # type: ignore[arg-type]
                                      lora_target_modules=(target,))
        else:
            raise ValueError(f"unknown engine {engine!r}; expected 'transformers', 'vllm' or 'vllm-server'")
        self.store.on_erase(self._erased)

    def _erased(self, memory_ids: list[str]) -> None:
        # Forgetting reaches every composed adapter that contains the memory, and the engine's copy.
        self.engine.evict(self.cache.erase(memory_ids))

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
            ValueError: empty/whitespace text, lone surrogates, a text over `max_document_chars`, an
                unknown kind, or an invalid id. Nothing stored changes.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
        if kind == "tool":
            text = render_tool_output(text)
        text = validate_text(text)
        if len(text) > self.config.max_document_chars:
            raise ValueError(f"text has {len(text):,} characters, over max_document_chars="
                             f"{self.config.max_document_chars:,}; split it or raise the cap")
        self.store.validate_scope(user_id=user_id, agent_id=agent_id, session_id=session_id)
        lora = self.d2l.internalize(text)
        n_tokens = self.count_tokens(text)
        stored = self.store.add(user_id, lora, text=text, kind=kind, agent_id=agent_id, session_id=session_id,
                                n_tokens=n_tokens, metadata=metadata)
        return MemoryRecord.from_stored(stored)

    def absorb_messages(self, messages: object, user_id: str, *, agent_id: str | None = None,
                        session_id: str | None = None, segment_tokens: int | None = None,
                        metadata: Mapping[str, Any] | None = None,
                        roles: Collection[str] | None = None) -> list[MemoryRecord]:
        """Absorb a conversation as `chat` memories, cut at turn boundaries into segments of at most
        `segment_tokens` tokens (default `config.segment_tokens`; a longer single turn is its own segment).

        Args:
            roles: absorb only the turns of these roles, e.g. `("user",)` to remember what the user said
                and not the assistant's replies (a reply that dodged a question would otherwise become the
                memory that best matches that question). None absorbs every turn.

        Raises:
            TypeError / ValueError: unreadable messages, no text in the kept turns, or a non-positive
                token budget.
        """
        budget = self.config.segment_tokens if segment_tokens is None else segment_tokens
        turns = transcript_turns(messages, roles)
        if not turns:
            raise ValueError("messages hold no text" if roles is None else
                             f"messages hold no text from the roles {sorted(roles)}")
        segments = segment_turns(turns, self.count_tokens, budget)
        return [self.absorb(seg, user_id, "chat", agent_id=agent_id, session_id=session_id,
                            metadata=metadata) for seg in segments]

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` in the base model's tokenizer, as plain text (no special tokens)."""
        return len(self.d2l.base.tokenizer(text, add_special_tokens=False)["input_ids"])

    def forget(self, memory_id: str | None = None, *, user_id: str | None = None) -> int:
        """Delete one memory, or all of a user's; composed adapters containing them are erased too.

        Returns:
            the number of memories removed.

        Raises:
            ValueError: neither or both arguments, or an invalid id.
        """
        if (memory_id is None) == (user_id is None):
            raise ValueError("pass exactly one of memory_id or user_id")
        if memory_id is not None:
            return self.store.delete(memory_id)
        return self.store.delete_user(user_id)  # type: ignore[arg-type]

    # -- reading -------------------------------------------------------------------------------
    def recall(self, query: str, user_id: str, k: int | None = None, *, agent_id: str | None = None,
               session_id: str | None = None, kind: str | None = None) -> list[MemoryRecord]:
        """The user's memories most similar to `query`, best first (no gating).

        Raises:
            TypeError / ValueError: an invalid query, id, kind or k.
        """
        validate_text(query, "query")
        k = self.config.k if k is None else k
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        hits = self.store.search(query, user_id, k=k, agent_id=agent_id, session_id=session_id,
                                 kind=kind)  # type: ignore[arg-type]
        return [MemoryRecord.from_stored(h) for h in hits]

    def relevant(self, query: str, user_id: str, k: int | None = None, **scope: Any) -> list[MemoryRecord]:
        """`recall`, keeping only memories at or above `config.relevance_threshold`."""
        return [h for h in self.recall(query, user_id, k, **scope)
                if h.score is not None and h.score >= self.config.relevance_threshold]

    def prepare(self, message: str, user_id: str, mode: str = "adapter", k: int | None = None,
                history: Sequence[Mapping[str, str]] = (), **scope: Any) -> tuple[list[dict[str, str]], Any]:
        """The engine request one chat turn becomes: `(messages, adapter or None)`.

        Raises:
            ValueError: an unknown mode, or what `recall` raises.
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        validate_text(message, "message")
        hits = [] if mode == "none" else self.relevant(message, user_id, k, **scope)
        adapter = None
        if mode in ("adapter", "hybrid") and hits:
            weight = member_weight(self.config.composition, len(hits))
            recipe = Recipe(members=tuple((h.id, weight) for h in hits), base_model=self.d2l.base.model_id,
                            hypernet=self.d2l.checksum, rank_budget=self.config.rank_budget)
            adapter = self.cache.get_or_compose(recipe, self.store)
        snippets = [h.text for h in hits if h.text] if mode == "context" else \
            [h.text for h in hits[:1] if h.text] if mode == "hybrid" else []
        content = message
        if snippets:
            content = QA_TEMPLATE.format(context=self._fit("\n\n".join(snippets)), question=message)
        return [*map(dict, history), {"role": "user", "content": content}], adapter

    def _fit(self, text: str) -> str:
        tok = self.d2l.base.tokenizer
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= self.config.max_context_tokens else tok.decode(ids[: self.config.max_context_tokens])

    def chat(self, message: str, user_id: str, mode: str = "adapter", max_new_tokens: int = 64, *,
             k: int | None = None, history: Sequence[Mapping[str, str]] = (), **scope: Any) -> str:
        """Answer `message` for `user_id` using their memories the way `mode` says.

        Modes (same retrieval for all, so they compare fairly): `adapter` composes the relevant
        memories' adapters and puts nothing about them in the prompt; `context` puts their text in the
        prompt (the classic baseline); `hybrid` does both with only the best snippet; `none` uses the
        base model alone. With no relevant memory, every mode is the untouched base model.
        """
        messages, adapter = self.prepare(message, user_id, mode, k, history, **scope)
        return self.engine.generate(messages, adapter, GenerationParams(max_new_tokens=max_new_tokens))

    def stream(self, message: str, user_id: str, mode: str = "adapter", max_new_tokens: int = 64, *,
               k: int | None = None, history: Sequence[Mapping[str, str]] = (), **scope: Any) -> Iterator[str]:
        """`chat`, yielding text pieces as they are generated.

        The generator may be stepped from any thread (a web server's pool) and several streams interleave:
        the embedded engine locks the model for one token at a time. Close it (or exhaust it) when the
        reader leaves; with vLLM an open stream holds that engine until then.
        """
        messages, adapter = self.prepare(message, user_id, mode, k, history, **scope)
        yield from self.engine.stream(messages, adapter, GenerationParams(max_new_tokens=max_new_tokens))

    def list(self, user_id: str, **scope: Any) -> list[MemoryRecord]:
        """All of a user's memories (optionally narrowed by agent_id, session_id, kind)."""
        return [MemoryRecord.from_stored(m) for m in self.store.list(user_id, **scope)]

    # -- async twins and lifecycle ---------------------------------------------------------------
    async def aabsorb(self, text: object, user_id: str, kind: str = "document", **kw: Any) -> MemoryRecord:
        """`absorb` without blocking the event loop."""
        return await asyncio.to_thread(self.absorb, text, user_id, kind, **kw)

    async def achat(self, message: str, user_id: str, mode: str = "adapter", max_new_tokens: int = 64,
                    **kw: Any) -> str:
        """`chat` without blocking the event loop."""
        return await asyncio.to_thread(self.chat, message, user_id, mode, max_new_tokens, **kw)

    def close(self) -> None:
        """Release the engine and the store."""
        self.engine.close()
        self.store.close()

    def __enter__(self) -> D2LMemory:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
