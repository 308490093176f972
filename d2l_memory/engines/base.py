"""The one interface every generation engine implements, and the generation parameters they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType

from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedTokenizerBase

from d2l_memory.compose import Composed
from d2l_memory.lora import LoRA

Message = Mapping[str, str]
"""One chat turn: `{"role": "system" | "user" | "assistant", "content": text}`."""

Adapter = LoRA | Composed
"""What a request may carry: a bare LoRA, or a composed one that already has a cache name and directory."""

ROLES = ("system", "user", "assistant", "tool")


class GenerationParams(BaseModel):
    """Decoding settings; the defaults are greedy, so answers are reproducible."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: tuple[str, ...] = Field((), description="the answer ends before the first of these strings")
    seed: int | None = None


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


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> list[int]:
    """Token ids of a chat in the model's chat template, ending with the assistant's generation prompt.

    Every engine renders prompts here, so the same chat is the same tokens whichever engine serves it.
    """
    text = tokenizer.apply_chat_template(chat_messages(messages), add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


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

    def evict(self, names: Iterable[str]) -> None:  # noqa: B027 - engines without named adapters keep none
        """Drop adapters by cache name (after `ComposedCache.erase`), so a forgotten memory is not served."""

    def close(self) -> None:  # noqa: B027 - engines holding nothing have nothing to release
        """Release the model, processes and connections."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
