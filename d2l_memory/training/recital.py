"""Self-supervised samples on real text: with a memory in context, the teacher says it back or goes on from a cue.

Question-answer samples teach the hypernetwork the questions its templates ask; these teach it to put the
text itself into the adapter, whatever the text holds (Generative Adapter and SHINE pretrain their
hypernetworks this way, and generalise to documents they never saw). Each sample's context is a memory as
d2l stores one:

- turns of a real MSC dialogue (the training file), `User:` / `Assistant:` lines as `absorb_messages`
  writes them;
- a user telling some of their MSC persona facts ("User: My dad worked at Home Depot. ...");
- a window of whole sentences from a SQuAD or SQuADShifts training passage, or from an essay.

Its question either asks for the memory back (`recite`: the response is the whole memory, so recited
memories are short) or quotes one sentence or turn and asks what came next (`continue`: the response is
the next one). The response is always a verbatim piece of the context, so the teacher (the base model
with the context) can say it, and `teacher.build_shard` keeps the sample only when it would.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from functools import cache

from d2l_memory.training.data import TRAIN_FILES, Sample, essays, shared_data, squad_samples
from d2l_memory.transcripts import transcript_turns

RECITE = [
    "What did I tell you? Repeat it word for word.",
    "Can you repeat exactly what I said?",
    "Please say back to me what I told you.",
    "Quote what I wrote to you, exactly as I wrote it.",
    "Tell me again, word for word, what I told you.",
    "What were my exact words?",
    "Repeat the message I gave you.",
    "Say back everything I said, without changing a word.",
    "I forgot what I wrote. Can you give it back to me verbatim?",
    "Recite what you were told.",
    "What exactly did I say to you earlier?",
    "Give me back the text I shared, unchanged.",
]
CONTINUE = [
    'What came right after "{cue}"?',
    'I said "{cue}" What did I say next?',
    'Continue from "{cue}"',
    'After "{cue}", what was the next thing said?',
    'How did it go on after "{cue}"?',
    'What followed "{cue}"? Quote it.',
    'Finish the passage that goes on from "{cue}"',
    'Right after the words "{cue}", what came next?',
    'What is the line after "{cue}"?',
    'Go on from "{cue}" exactly as it was written.',
]
KINDS = {"dialogue": 0.4, "persona": 0.2, "passage": 0.25, "essay": 0.15}
RECITE_TOKENS = 64  # the longest memory recited whole (tokens): longer ones are asked to continue
NEXT_TOKENS = 48  # the longest next piece a `continue` question may ask for
CUE_WORDS = 24  # a cue longer than this is quoted by its last half
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


@cache
def msc_episodes() -> tuple[tuple[tuple[str, ...], tuple[tuple[str, str], ...]], ...]:
    """(the first speaker's persona facts, the dialogue as `(role, text)` turns, that speaker the user) of
    every episode in MSC's training file (the test file is evaluation's)."""
    path = shared_data() / "msc_multi_session_chat" / "msc_dialogue_session_3_valid.jsonl"
    episodes = []
    for line in path.read_text().splitlines():
        episode = json.loads(line)
        first = episode["dialog"][0]["id"]
        turns = tuple(("user" if t["id"] == first else "assistant", " ".join(t["text"].split()))
                      for t in episode["dialog"] if t["text"].strip())
        episodes.append((tuple(" ".join(p.split()) for p in episode["personas"][0]), turns))
    return tuple(episodes)


@cache
def _passages() -> tuple[str, ...]:
    return tuple(sorted({s.context for f in TRAIN_FILES for s in squad_samples(shared_data() / f)}))


@cache
def _essays() -> tuple[str, ...]:
    return tuple(essays())


def sentences(text: str) -> list[str]:
    """`text` cut after each sentence end that a capital or a quote follows (no abbreviation list: a
    wrong cut only makes a shorter piece, which is still verbatim)."""
    return [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if s.strip()]


def _window(rng: random.Random, pieces: Sequence[str], n: int) -> list[str]:
    start = rng.randint(0, max(0, len(pieces) - n))
    return list(pieces[start : start + n])


def _memory(rng: random.Random, kind: str) -> tuple[list[str], str]:
    """The pieces (turns or sentences) of one memory of `kind`, and how they are joined."""
    if kind in ("dialogue", "persona"):
        personas, turns = rng.choice(msc_episodes())
        if kind == "persona":
            facts = rng.sample(personas, min(len(personas), rng.randint(1, 4)))
            return transcript_turns([("user", " ".join(facts))]), "\n"
        return transcript_turns(_window(rng, turns, rng.randint(2, 6))), "\n"
    text = rng.choice(_passages() if kind == "passage" else _essays())
    return _window(rng, sentences(text), rng.randint(2, 6)), " "


def recital_sample(rng: random.Random, count_tokens: Callable[[str], int] | None = None) -> Sample:
    """One memory of real text and a question that asks for it back, or for what follows a quoted piece.

    `count_tokens` (the base model's tokenizer) decides which memories are short enough to recite whole
    (`RECITE_TOKENS`) and which next pieces short enough to ask for (`NEXT_TOKENS`).
    """
    count = count_tokens or (lambda text: len(text) // 4)
    kinds, weights = zip(*KINDS.items(), strict=True)
    while True:
        kind = rng.choices(kinds, weights)[0]
        pieces, joiner = _memory(rng, kind)
        context = joiner.join(pieces)
        nexts = [i for i in range(1, len(pieces))
                 if count(pieces[i]) <= NEXT_TOKENS and min(len(pieces[i - 1]), len(pieces[i])) > 12]
        if count(context) <= RECITE_TOKENS and (not nexts or rng.random() < 0.5):
            return Sample(context=context, question=rng.choice(RECITE), answer=context, source=f"recite:{kind}")
        if nexts:
            i = rng.choice(nexts)
            words = pieces[i - 1].split()  # a long piece is quoted by its end, as people quote
            cue = pieces[i - 1] if len(words) <= CUE_WORDS else "..." + " ".join(words[-CUE_WORDS // 2:])
            return Sample(context=context, question=rng.choice(CONTINUE).format(cue=cue), answer=pieces[i],
                          source=f"continue:{kind}")
