"""The vocabularies the whole API speaks, defined once: what a memory is, how a chat uses memories, and how
recalled memories' adapters are weighted when composed.

Light on purpose (typing only): the CLI's `--help`, the store schema, `D2LMemory` and the LangChain
integration all import these.
"""

from __future__ import annotations

from typing import Literal, get_args

Kind = Literal["document", "chat", "tool"]
"""A memory's kind: a document, a stretch of conversation (`absorb_messages`), or a tool's result."""
KINDS: tuple[Kind, ...] = get_args(Kind)

Mode = Literal["adapter", "context", "hybrid", "none"]
"""How a chat turn uses the recalled memories: composed adapters only, their text in the prompt, both
(with the best one's text), or neither."""
MODES: tuple[Mode, ...] = get_args(Mode)

Weighting = Literal["relevance", "mean", "sum"]
"""How the adapters of a chat turn's recalled memories are weighted when composed into one
(`MemoryConfig.composition`): by their recall scores, 1/k each, or 1 each."""
WEIGHTINGS: tuple[Weighting, ...] = get_args(Weighting)
