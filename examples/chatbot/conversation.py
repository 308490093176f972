"""One user's conversation with the chatbot, and that user's memories: the state both faces share.

A conversation keeps its messages only while it lasts. `end()` absorbs what the user said into the user's
long-term memory (`D2LMemory.absorb_messages`, kind `chat`, one session id per conversation) and starts afresh, so
the next conversation begins with an empty prompt and knows the user only through what was absorbed.
Every call is scoped by the conversation's user id: one user's memories never reach another's answers.
"""

from __future__ import annotations

from collections.abc import Generator
from uuid import uuid4

from d2l_memory import MODES, D2LMemory, MemoryNotFoundError, MemoryRecord
from d2l_memory.cli import HISTORY_MESSAGES

# hybrid: the memories' adapter plus their best snippet in the prompt. With the young shipped hypernetwork
# adapter mode alone answers few conversation questions worded as people type (docs/training.md); the snippet
# makes the bot dependable while the adapter still carries what the snippet leaves out.
DEFAULT_MODE = "hybrid"
SOURCE = {"source": "chatbot"}  # metadata on every memory this example writes
# Only what the user said becomes memory: the bot's replies add nothing about the user, and a reply that
# dodged a question ("as a chatbot I can't know...") would become the memory that best matches it next time.
ABSORBED_ROLES = ("user",)


def check_user(user_id: object) -> str:
    """`user_id` if the store accepts it as a user id.

    Raises:
        ValueError: the store's own message (ids are 1-256 letters, digits and `_ . : @ + / = -`).
    """
    D2LMemory.validate_scope(user_id=user_id)  # type: ignore[arg-type]
    return user_id  # type: ignore[return-value]


def check_mode(mode: object) -> str:
    """`mode` if it is one of `D2LMemory`'s modes.

    Raises:
        ValueError: any other value.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    return mode  # type: ignore[return-value]


def memories(memory: D2LMemory, user_id: str) -> list[MemoryRecord]:
    """The user's memories, newest first."""
    return memory.list(check_user(user_id))


def forget(memory: D2LMemory, user_id: str, memory_id: str | None = None) -> int:
    """Forget one of the user's memories, or all of them (`memory_id=None`); returns how many went.

    Raises:
        ValueError: an invalid user or memory id.
        MemoryNotFoundError: `memory_id` is not one of this user's memories (another user's included:
            a user can never erase, or learn of, someone else's memory).
    """
    check_user(user_id)
    if memory_id is None:
        return memory.forget(user_id=user_id)
    if not memory.forget(memory_id, user_id=user_id):  # scoped: another user's id forgets nothing
        raise MemoryNotFoundError(f"{user_id} has no memory {memory_id}")
    return 1


class Conversation:
    """One conversation of `user_id` with the bot.

    Args:
        memory: the long-term memory that answers and absorbs.
        user_id: whose conversation it is (checked against the store's id rules).
        mode: how memories reach the model: adapter, context, hybrid or none.
        max_new_tokens: longest answer, in tokens.
        messages: the conversation so far (`{"role", "content"}` dicts), e.g. a web client's copy.

    Raises:
        ValueError: an invalid user id or mode.
    """

    def __init__(self, memory: D2LMemory, user_id: str, mode: str = DEFAULT_MODE, max_new_tokens: int = 128,
                 messages: list[dict[str, str]] | None = None) -> None:
        self.memory = memory
        self.user_id = check_user(user_id)
        self.mode = check_mode(mode)
        self.max_new_tokens = max_new_tokens
        self.messages: list[dict[str, str]] = list(messages or [])
        self.session_id = uuid4().hex

    def reply(self, text: str) -> Generator[str, None, None]:
        """Answer `text`, yielding pieces as they are generated; the turn joins the conversation once the
        answer is complete (an interrupted answer leaves no half turn behind).

        Raises:
            ValueError / TypeError: what `D2LMemory.stream` raises (empty text, a bad id), on the first `next`.
        """
        pieces: list[str] = []
        stream = self.memory.stream(text, self.user_id, self.mode, self.max_new_tokens,
                                    history=self.messages[-HISTORY_MESSAGES:])
        try:
            for piece in stream:
                pieces.append(piece)
                yield piece
        finally:
            stream.close()  # an abandoned answer releases the engine now, not when collected
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces)}]

    def end(self) -> list[MemoryRecord]:
        """Absorb the conversation into the user's memory and start a new one; returns the new memories
        (none for a conversation without messages)."""
        records: list[MemoryRecord] = []
        if any(m["content"].strip() for m in self.messages if m["role"] in ABSORBED_ROLES):
            records = self.memory.absorb_messages(self.messages, self.user_id, session_id=self.session_id,
                                                  metadata=SOURCE, roles=ABSORBED_ROLES)
        self.messages = []
        self.session_id = uuid4().hex
        return records
