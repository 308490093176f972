"""Cut a document into equal contiguous token chunks, each wrapped as its own chat turn.

Every chunk is read the way the teacher reads a document during meta-training: as the content of a
user turn of the base model's chat template (`Context: <chunk>`). Chunks have at most `chunk_tokens`
document tokens and are as equal as possible, so no input can overflow the model's window. The document
is tokenized as plain text (`plain_ids`): special-token strings inside it never become chat markers.
"""

from __future__ import annotations

import math

from transformers import PreTrainedTokenizerBase

from d2l_memory.prompts import CHUNK_TEMPLATE

MARK = "\u2063D2L\u2063"  # an invisible separator no real document contains around "D2L"


def plain_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of `text` as plain text: special-token strings in it (`<|im_start|>`, `<|im_end|>`, ...)
    become the ordinary tokens of their characters, so a document, a memory or a message can never
    open a new chat turn or end one."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def validate_text(text: object, what: str = "text") -> str:
    """Return `text` if it is a non-empty, encodable str; otherwise raise a message naming the problem.

    Raises:
        TypeError: not a str (bytes included).
        ValueError: empty or whitespace only, or lone surrogates that cannot be encoded.
    """
    if isinstance(text, bytes | bytearray):
        raise TypeError(f"{what} must be str, got bytes: decode it first (e.g. data.decode('utf-8'))")
    if not isinstance(text, str):
        raise TypeError(f"{what} must be str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{what} is empty or whitespace only")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} holds a lone surrogate at position {exc.start}; it is not valid Unicode") from exc
    return text


def turn_affixes(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Token ids before and after a chunk in a one-turn chat.

    An empty system message stops templates (SmolLM2's among them) from inserting their default
    system prompt: ~30 tokens per chunk that would cost encoder time and carry nothing.
    """
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": ""}, {"role": "user", "content": CHUNK_TEMPLATE.format(document=MARK)}],
        tokenize=False,
    )
    before, after = rendered.split(MARK)
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return encode(before), encode(after)


def split_tokens(ids: list[int], chunk_tokens: int) -> list[list[int]]:
    """Split `ids` into `ceil(len/chunk_tokens)` contiguous pieces whose sizes differ by at most one."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    n_chunks = max(1, math.ceil(len(ids) / chunk_tokens))
    base, extra = divmod(len(ids), n_chunks)
    pieces, start = [], 0
    for i in range(n_chunks):
        end = start + base + (1 if i < extra else 0)
        pieces.append(ids[start:end])
        start = end
    return pieces


def chunk_document(tokenizer: PreTrainedTokenizerBase, text: str, chunk_tokens: int,
                   max_positions: int | None = None) -> list[list[int]]:
    """Tokenize `text` and return one wrapped id sequence per chunk.

    Raises:
        ValueError: the text is invalid (see `validate_text`) or a chunk plus its chat wrapping would
            not fit `max_positions`.
    """
    validate_text(text, "document")
    before, after = turn_affixes(tokenizer)
    if max_positions is not None and chunk_tokens + len(before) + len(after) > max_positions:
        raise ValueError(f"chunk_tokens={chunk_tokens} plus the chat wrapping exceeds the model window "
                         f"of {max_positions} tokens")
    return [before + piece + after for piece in split_tokens(plain_ids(tokenizer, text), chunk_tokens)]
