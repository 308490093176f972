"""Grammar-constrained decoding for the embedded engine: llguidance masks each step's logits.

vLLM constrains answers itself (structured outputs); `model.generate` of transformers does not, so the
embedded engine's token loop asks a `Guide` which tokens the grammar allows next, picks among those, and
feeds the tokens the grammar then forces (the fixed text of a tool call: `{"name": "`, `"arguments": `...)
in one forward pass instead of one by one. The grammars are `tool_calls.tool_grammar`'s, in llguidance's
Lark dialect, which vLLM's `guidance` backend reads too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from d2l_memory.errors import EngineError


def guide_tokenizer(tokenizer: PreTrainedTokenizerBase) -> Any:
    """llguidance's view of a (fast) Hugging Face tokenizer; about 1 s to build, so build it once.

    Raises:
        EngineError: llguidance is not installed.
    """
    try:
        import llguidance.hf
    except ImportError as exc:
        raise EngineError("tool calling with the embedded engine needs llguidance: pip install llguidance") from exc
    return llguidance.hf.from_tokenizer(tokenizer)


class Guide:
    """One answer's position in a grammar.

    Args:
        tokenizer: from `guide_tokenizer`.
        grammar: an llguidance grammar (Lark text, as `tool_calls.tool_grammar` writes it).

    Raises:
        ValueError: a grammar llguidance cannot compile.
    """

    def __init__(self, tokenizer: Any, grammar: str) -> None:
        from llguidance import LLMatcher

        self.matcher = LLMatcher(tokenizer, LLMatcher.grammar_from_lark(grammar), log_level=0)
        if self.matcher.is_error():  # llguidance reports grammar errors as a state, not an exception
            raise ValueError(f"grammar: {self.matcher.get_error()}")

    @property
    def stopped(self) -> bool:
        """The grammar is complete and allows nothing more (not even the end-of-sequence token)."""
        return self.matcher.is_stopped()

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (one row, vocabulary-sized) with every token the grammar forbids next at -inf."""
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        n = min(len(bits), logits.shape[-1])
        allowed[:n] = torch.from_numpy(bits[:n].astype(bool)).to(logits.device)
        return logits.masked_fill(~allowed, float("-inf"))

    def advance(self, token: int) -> list[int]:
        """Consume the picked `token`; return the tokens the grammar forces after it (consumed as well).

        Raises:
            EngineError: the token breaks the grammar (only when the caller ignored `mask`).
        """
        if not self.matcher.consume_token(token):
            raise EngineError(f"token {token} breaks the answer's grammar: {self.matcher.get_error()}")
        forced = self.matcher.compute_ff_tokens()
        if forced and not self.matcher.consume_tokens(forced):
            raise EngineError(f"the grammar's forced tokens failed: {self.matcher.get_error()}")
        return forced
