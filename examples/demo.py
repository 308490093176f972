"""`make demo`: two users tell the assistant about themselves over two sessions; later, in a fresh
conversation with nothing in the prompt, it is asked what it remembers.

Every question is answered in the four modes (adapter: the memories only in the weights; hybrid: the
weights plus the best memory's text; context: the memories' text in the prompt, classic RAG; none: no
memory). Each answer is printed whole, marked with whether it holds the expected fact (computed, not
asserted), and each mode's count closes the run. One fact was told in an earlier session than the rest,
and one was changed later (a knowledge update: the current value is expected). Finally one user's
memories are forgotten and the question is asked again. Whatever the hypernetwork gets wrong shows.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

from rich.console import Console
from rich.padding import Padding
from rich.text import Text

from d2l_memory import MODES, D2LMemory
from d2l_memory.scoring import contains

ANSWER_INDENT = 11  # under the mode column, so that a wrapped answer stays in its own block

SESSIONS = [  # (session, user, what the user said, the assistant's reply)
    ("monday", "alice", "Hi! My name is Alice. My favorite color is teal and I live in Lisbon.", "Nice to meet you!"),
    ("monday", "bruno", "Hello, I'm Bruno. I work as a baker and I have a pet parrot.", "Great to meet you, Bruno!"),
    ("friday", "alice", "My sister Marta is visiting next week, I can't wait.", "How lovely!"),
    ("friday", "bruno", "Big news: I quit the bakery. I work as a carpenter now.", "Congratulations!"),
]
QUESTIONS = [  # (user, question, the fact the answer should hold)
    ("alice", "What is my favorite color?", "teal"),
    ("alice", "Where do I live?", "Lisbon"),
    ("alice", "What is my sister's name?", "Marta"),
    ("bruno", "What kind of pet do I have?", "parrot"),
    ("bruno", "What is my job now?", "carpenter"),  # the knowledge update: "baker" would be stale
]


def quiet() -> None:
    """Keep library progress bars and load logs out of the demo's output (errors still show)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("lancedb", "sentence_transformers", "d2l_memory"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main() -> None:
    quiet()
    console = Console(highlight=False)
    with tempfile.TemporaryDirectory() as path:
        start = time.perf_counter()
        with console.status("Loading SmolLM2-135M-Instruct, the hypernetwork, the embedder and the store "
                            "(the model is converted once, on the first run)"):
            mem = D2LMemory(path)
            mem.load()  # loading is lazy: done here, so that the first absorb's time is its own
        console.print(f"Ready in {time.perf_counter() - start:.1f} s.\n")
        with mem:
            console.rule("The users talk; each conversation is absorbed into adapters")
            for session, user, said, reply in SESSIONS:
                start = time.perf_counter()
                [record] = mem.absorb_messages([("user", said), ("assistant", reply)], user_id=user,
                                               session_id=session, roles=("user",))
                console.print(f"[bold]{user}[/], {session}:")
                console.print(Padding(Text(said), (0, 0, 0, 2)))
                console.print(f"  -> memory of rank {record.rank}, absorbed in {time.perf_counter() - start:.2f} s",
                              style="dim")
            console.rule("A fresh conversation: what does the assistant remember?")
            held = dict.fromkeys(MODES, 0)
            for user, question, fact in QUESTIONS:
                console.print(f"\n[bold]{user}[/] asks: {question}  [dim](expected: {fact})[/]")
                for mode in MODES:
                    messages, _ = mem.prepare(question, user, mode=mode)
                    prompt_tokens = sum(mem.count_tokens(m["content"]) for m in messages)
                    start = time.perf_counter()
                    answer = mem.chat(question, user_id=user, mode=mode, max_new_tokens=32).strip()
                    ok = bool(contains(answer, fact))
                    held[mode] += ok
                    mark = "[green]holds it[/]" if ok else "[red]misses it[/]"
                    console.print(f"  [bold]{mode:<8}[/] {mark}  [dim]{prompt_tokens} prompt tokens, "
                                  f"{time.perf_counter() - start:.1f} s[/]")
                    console.print(Padding(Text(answer), (0, 0, 0, ANSWER_INDENT)))
            console.rule("Answers that hold the expected fact")
            for mode in MODES:
                console.print(f"  {mode:<8} {held[mode]} of {len(QUESTIONS)}")
            console.rule("Forget: Alice's memories are erased")
            removed = mem.forget(user_id="alice")
            answer = mem.chat("What is my favorite color?", user_id="alice", mode="context", max_new_tokens=32)
            console.print(f"Removed {removed} memories; recall now finds "
                          f"{len(mem.recall('favorite color', user_id='alice'))}. Asked again:")
            console.print(Padding(Text(answer.strip()), (0, 0, 0, ANSWER_INDENT)))


if __name__ == "__main__":
    main()
