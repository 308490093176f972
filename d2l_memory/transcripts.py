"""Conversations and tool results as the text a memory holds: one rendering, one segmentation.

`D2LMemory.absorb_messages` stores a conversation as `Role: text` lines cut at turn boundaries into
segments of at most a token budget; the benchmarks and the meta-training generator build their memories
with the same two functions, so what the hypernetwork is trained on is exactly what it reads in use.
`retrieval_parts` cuts a memory's text into the sentences it is also searched by, and `refers_to_user` tells
a message about its writer's own life, which the relevance gate treats as one about their memories.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence

LANGCHAIN_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool"}
# Subject and possessive forms only: "me" and "us" are mostly requests ("tell me about Paris").
_FIRST_PERSON = re.compile(r"\b(?:i|my|mine|myself|we|our|ours|ourselves)\b", re.IGNORECASE)


def normalize_messages(messages: object) -> list[tuple[str, str]]:
    """`(role, content)` pairs from tuples, `{"role", "content"}` dicts or LangChain messages.

    Raises:
        TypeError: anything else, or content that is not text.
        ValueError: an empty list.
    """
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise TypeError("messages must be a list of (role, content) tuples, dicts or LangChain messages")
    if not messages:
        raise ValueError("messages is empty")
    out = []
    for m in messages:
        if isinstance(m, tuple) and len(m) == 2:
            role, content = m
        elif isinstance(m, Mapping):
            role, content = m.get("role"), m.get("content")
        elif hasattr(m, "type") and hasattr(m, "content"):  # a LangChain BaseMessage, without importing it
            role, content = LANGCHAIN_ROLES.get(m.type, m.type), m.content
        else:
            raise TypeError(f"cannot read a message from {type(m).__name__}: use (role, content) or a dict")
        if not isinstance(role, str) or not isinstance(content, str):
            raise TypeError(f"message role and content must be str, got {role!r} and {type(content).__name__}")
        out.append((role, content))
    return out


def transcript_turns(messages: object, roles: Collection[str] | None = None) -> list[str]:
    """One `Role: text` line per non-empty turn, keeping only `roles` (None keeps every turn).

    Raises:
        TypeError: unreadable messages, or `roles` given as a single string.
    """
    if isinstance(roles, str):
        raise TypeError(f"roles must be a collection of role names such as ('user',), not the string {roles!r}")
    # Only the first letter is raised: a named role ("Ross Geller", "McKenzie") keeps its own capitals.
    return [f"{role[:1].upper()}{role[1:]}: {content.strip()}" for role, content in normalize_messages(messages)
            if content.strip() and (roles is None or role in roles)]


def segment_turns(turns: Sequence[str], count_tokens: Callable[[str], int], budget: int,
                  header: str | None = None) -> list[str]:
    """Cut `turns` at turn boundaries into segments of at most `budget` tokens (a longer single turn is a
    segment of its own); each segment is its turns joined by newlines, after `header` when one is given
    (e.g. a session's date, so that a memory recalled alone still says when it was said).

    Raises:
        ValueError: a non-positive budget.
    """
    if budget <= 0:
        raise ValueError(f"segment_tokens must be positive, got {budget}")
    segments: list[list[str]] = []
    used = 0
    for turn in turns:
        n = count_tokens(turn)
        if not segments or (segments[-1] and used + n > budget):
            segments.append([])
            used = 0
        segments[-1].append(turn)
        used += n
    return ["\n".join([header, *seg] if header else seg) for seg in segments]


MAX_PARTS = 32
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")
# Where people join two things they tell about themselves: "My favorite color is teal and I live in Lisbon",
# "I'm a nurse; my wife is a teacher", "I love sushi, but my son hates fish".
_CLAUSE = re.compile(r"\s*;\s*|,?\s+(?:and|but|plus|also|so)\s+(?=(?:I|I'm|I've|I'd|my|we|we're|our|me)\b)",
                     re.IGNORECASE)
_ROLE_PREFIX = re.compile(r"^(user|assistant|system|tool):\s*", re.IGNORECASE)


def retrieval_parts(text: str, max_parts: int = MAX_PARTS) -> list[str]:
    """The sentences of `text`, turn by turn and without their `Role:` prefix, that a memory is searched by
    besides its whole text (a question about one fact matches the sentence that states it far better than a
    memory holding that fact among chit-chat), then the statements of sentences that join several ("my
    favorite color is teal and I live in Lisbon"). One-word sentences ("Hi!") are dropped; more than
    `max_parts` are joined, in order, into `max_parts` runs of neighbours. A text of one plain sentence has
    no parts: its whole text is that sentence.
    """
    lines = (_ROLE_PREFIX.sub("", line.strip()) for line in text.splitlines())
    sentences = [s.strip() for line in lines for s in _SENTENCE_END.split(line) if len(s.split()) >= 2]
    # a sentence that joins several statements is searched by each statement too
    sentences += [c for s in sentences if len(cs := _CLAUSE.split(s)) > 1 for c in cs if len(c.split()) >= 2]
    if len(sentences) <= 1:
        return []
    if len(sentences) > max_parts:
        bounds = [round(i * len(sentences) / max_parts) for i in range(max_parts + 1)]
        sentences = [" ".join(sentences[a:b]) for a, b in itertools.pairwise(bounds)]
    return sentences


def refers_to_user(text: str) -> bool:
    """Whether `text` speaks of its writer in the first person ("Where do I live?", "what's my code", "what
    did we decide"; not "tell me about Paris"). Such a message asks about the user's own life, so their
    memories are where an answer would be, and it is worded farther from how they told it (a question
    against a statement, "my usual order" against "I can't function without my espresso") than a message
    is from a document about its topic: the relevance gate uses a lower threshold for it."""
    return _FIRST_PERSON.search(text) is not None


def render_tool_output(output: object) -> str:
    """Tool results as text a small model reads: JSON objects become `key: value` lines.

    Raises:
        TypeError: a value that is neither text nor JSON-serialisable.
    """
    if isinstance(output, str):
        try:
            output = json.loads(output)
        except ValueError:
            return output
        if isinstance(output, str):
            return output
    try:
        json.dumps(output)
    except TypeError as exc:
        raise TypeError(f"tool output must be text or JSON-serialisable, got {type(output).__name__}") from exc

    def lines(value: object, prefix: str = "") -> Iterator[str]:
        if isinstance(value, Mapping):
            for key, item in value.items():
                yield from lines(item, f"{prefix}{key}." if isinstance(item, Mapping | list) else f"{prefix}{key}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                yield from lines(item, f"{prefix}{i + 1}." if isinstance(item, Mapping | list) else f"{prefix}{i + 1}")
        else:
            yield f"{prefix.rstrip('.')}: {value}" if prefix else str(value)

    return "\n".join(lines(output))
