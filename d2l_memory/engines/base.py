"""The one interface every generation engine implements, the generation parameters they share, and the
one function that renders a chat into prompt tokens."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import PreTrainedTokenizerBase

from d2l_memory.chunking import MARK, plain_ids
from d2l_memory.compose import Composed
from d2l_memory.lora import LoRA
from d2l_memory.tool_calls import check_tool_choice, json_grammar, tool_chat_template, tool_grammar

Message = Mapping[str, str]
"""One chat turn: `{"role": "system" | "user" | "assistant", "content": text}`."""

Adapter = LoRA | Composed
"""What a request may carry: a bare LoRA, or a composed one that already has a cache name and directory."""

ROLES = ("system", "user", "assistant", "tool")
# Where message i's content goes in a template rendered with placeholders.
_SLOT = re.compile(f"{re.escape(MARK)}(\\d+){re.escape(MARK)}")


class GenerationParams(BaseModel):
    """Decoding settings, and the tools the answer may call; the defaults are greedy, so answers are
    reproducible.

    With `tools`, the prompt states them (`tool_calls.TOOL_CHAT_TEMPLATE`), calls come back in the answer's
    text as `<tool_call>` blocks (`tool_calls.parse_tool_calls` reads them), and engines constrain the
    answer to well-formed calls (`tool_calls.tool_grammar`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: tuple[str, ...] = Field((), description="the answer ends before the first of these strings")
    seed: int | None = None
    tools: tuple[dict[str, Any], ...] = Field((), description="OpenAI-format function tools "
                                              "(`{'type': 'function', 'function': {'name', 'description', "
                                              "'parameters'}}`)")
    tool_choice: str = Field("auto", description="`auto` (the model decides), `required` (a call), `none` (no "
                             "call), or a tool's name (a call of that tool)")
    parallel_tool_calls: bool = Field(True, description="whether more calls may follow the first")
    json_schema: dict[str, Any] | None = Field(None, description="structured output: the answer is one JSON "
                                               "value valid against this schema (`tool_calls.json_grammar`)")

    @model_validator(mode="after")
    def _tools(self) -> GenerationParams:
        check_tool_choice(self.tools, self.tool_choice)
        if self.json_schema is not None:
            json_grammar(self.json_schema)
            if self.tools:
                raise ValueError("give tools or json_schema, not both: an answer is either calls or one JSON value")
        return self

    @property
    def grammar(self) -> str | None:
        """The grammar every engine constrains the answer to (llguidance's Lark), or None: unconstrained."""
        if self.json_schema is not None:
            return json_grammar(self.json_schema)
        return tool_grammar(self.tools, self.tool_choice, self.parallel_tool_calls)

    @property
    def stated_tools(self) -> tuple[dict[str, Any], ...]:
        """The tools the prompt states: none with `tool_choice="none"` (as vLLM's
        `--exclude-tools-when-tool-choice-none`), since a small model told of tools it may not call writes
        about them instead of answering."""
        return () if self.tool_choice == "none" else self.tools


def chat_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Check and copy a chat: a non-empty list of `{"role", "content"}` dicts with known roles.

    Raises:
        TypeError: not a list of mappings with string roles and contents.
        ValueError: an empty chat or an unknown role.
    """
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise TypeError("messages must be a list of {'role', 'content'} dicts")
    if not messages:
        raise ValueError("messages is empty")
    out = []
    for m in messages:
        if not (isinstance(m, Mapping) and all(isinstance(m.get(k), str) for k in ("role", "content"))):
            raise TypeError(f"each message must be a dict with string 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"unknown role {m['role']!r}; expected one of {ROLES}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message],
                max_tokens: int | None = None, tools: Sequence[Mapping[str, Any]] = ()) -> list[int]:
    """Token ids of a chat in the model's chat template, ending with the assistant's generation prompt.

    Every engine renders prompts here, so the same chat is the same tokens whichever engine serves it.
    Message contents are tokenized as plain text: a `<|im_start|>system` inside a user message, a memory
    or a tool output is the characters it is made of, never a role marker. Only the template's own text
    yields special tokens (it is rendered with placeholders, the contents tokenized apart).

    Args:
        max_tokens: the longest prompt allowed (the model's window less the answer's tokens). A longer
            chat loses its oldest messages after the system ones first; a last message still too long
            keeps the start and the end of its content, its middle cut out.
        tools: OpenAI-format tools the answer may call; the system turn states them, in
            `tool_calls.TOOL_CHAT_TEMPLATE` (the model's own template has none).

    Raises:
        TypeError / ValueError: what `chat_messages` raises, a window too small for the template alone, or
            tools for a model whose template is not ChatML.
    """
    chat = chat_messages(messages)
    parts = _parts(tokenizer, chat, tools)
    while max_tokens is not None and _length(parts) > max_tokens and _drop_oldest_turn(chat):
        parts = _parts(tokenizer, chat, tools)
    over = 0 if max_tokens is None else _length(parts) - max_tokens
    if over > 0:
        last = max(i for i, part in enumerate(parts) if isinstance(part, tuple))
        content = parts[last][0]
        keep = len(content) - over
        if keep <= 0:
            raise ValueError(f"a window of {max_tokens} prompt tokens cannot hold the chat template")
        parts[last] = (content[: keep // 2] + content[len(content) - (keep - keep // 2):],)
    return [token for part in parts for token in (part[0] if isinstance(part, tuple) else part)]


def _drop_oldest_turn(chat: list[dict[str, str]]) -> bool:
    """Drop the oldest message after the system ones but never the last, then any replies it leaves at the
    front (templates such as Gemma's require the first turn to be the user's). False: nothing to drop."""
    dropped = False
    while True:
        oldest = next((i for i, m in enumerate(chat[:-1]) if m["role"] != "system"), None)
        if oldest is None or (dropped and chat[oldest]["role"] == "user"):
            return dropped
        del chat[oldest]
        dropped = True


def _parts(tokenizer: PreTrainedTokenizerBase, chat: list[dict[str, str]],
           tools: Sequence[Mapping[str, Any]] = ()) -> list[list[int] | tuple[list[int]]]:
    """The rendered chat as token pieces: template text as lists, each message content as a 1-tuple."""
    slots = [{**m, "content": f"{MARK}{i}{MARK}"} for i, m in enumerate(chat)]
    with_tools = {"tools": list(tools), "chat_template": tool_chat_template(tokenizer)} if tools else {}
    rendered = tokenizer.apply_chat_template(slots, add_generation_prompt=True, tokenize=False, **with_tools)
    pieces = _SLOT.split(rendered)  # template, index, template, index, ..., template
    parts: list[list[int] | tuple[list[int]]] = []
    for j, piece in enumerate(pieces):
        if j % 2:
            parts.append((plain_ids(tokenizer, chat[int(piece)]["content"]),))
        elif piece:
            parts.append(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return parts


def _length(parts: list[list[int] | tuple[list[int]]]) -> int:
    return sum(len(part[0]) if isinstance(part, tuple) else len(part) for part in parts)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class Engine(ABC):
    """Generates chat answers from one base model, each request with its own adapter or none."""

    model_id: str

    @abstractmethod
    def generate(self, messages: Sequence[Message], adapter: Adapter | None = None,
                 params: GenerationParams | None = None) -> str:
        """The assistant's answer to `messages`, with `adapter` applied (None: the base model)."""

    @abstractmethod
    def stream(self, messages: Sequence[Message], adapter: Adapter | None = None,
               params: GenerationParams | None = None) -> Iterator[str]:
        """The same answer as `generate`, as text pieces while they are produced."""

    def generate_batch(self, requests: Sequence[tuple[Sequence[Message], Adapter | None]],
                       params: GenerationParams | None = None) -> list[str]:
        """Answers to several requests, each with its own adapter; engines override this to batch."""
        return [self.generate(messages, adapter, params) for messages, adapter in requests]

    def adapter_name(self, adapter: Adapter | None) -> str:
        """The model name a request with `adapter` goes to on an OpenAI-compatible server serving the same
        composed cache: the base model's id for None, else the composed adapter's cache name.

        Raises:
            TypeError: a bare `LoRA`, which has a cache name only once it is written to a cache (the
                vLLM server engine writes it; this one does not).
        """
        if adapter is None:
            return self.model_id
        if isinstance(adapter, LoRA):
            raise TypeError(f"{type(self).__name__} gives no serving name to a bare LoRA: pass the composed "
                            "adapter that D2LMemory.prepare returns")
        return adapter.name

    def evict(self, names: Iterable[str]) -> None:  # noqa: B027 - engines without named adapters keep none
        """Drop adapters by cache name (after `ComposedCache.erase`), so a forgotten memory is not served."""

    def close(self) -> None:  # noqa: B027 - engines holding nothing have nothing to release
        """Release the model, processes and connections."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
