"""`make demo`: two users tell the assistant about themselves; later, with an empty prompt, it is asked.

Answers are printed side by side for the three ways to use the memories (adapter: only in the weights;
context: the text stuffed in the prompt; none: no memory), with prompt tokens and time per answer.
Finally one user's memories are forgotten and the question is asked again.
"""

from __future__ import annotations

import tempfile
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from d2l_memory import D2LMemory
from d2l_memory.models import DEFAULT_MODEL, ensure_converted

SESSION_1 = {
    "alice": [("user", "Hi! My name is Alice. My favorite color is teal and I live in Lisbon."),
              ("assistant", "Nice to meet you, Alice!")],
    "bruno": [("user", "Hello, I'm Bruno. I work as a baker and I have a pet parrot."),
              ("assistant", "Great to meet you, Bruno!")],
}
SESSION_2 = {
    "alice": ["What is my favorite color?", "Where do I live?"],
    "bruno": ["What is my job?", "What kind of pet do I have?"],
}


def main() -> None:
    console = Console()
    with tempfile.TemporaryDirectory() as path:
        start = time.perf_counter()
        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("SmolLM2-135M-Instruct: verify checksums (converted once on first run)", total=2)
            ensure_converted(DEFAULT_MODEL)
            progress.update(task, advance=1, description="Loading the model, the hypernetwork, the embedder, the store")
            mem = D2LMemory(path)
            progress.advance(task)
        console.print(f"Ready in {time.perf_counter() - start:.1f} s.")
        with mem:
            console.rule("Session 1: the users talk; each conversation is absorbed into adapters")
            for user, turns in SESSION_1.items():
                start = time.perf_counter()
                records = mem.absorb_messages(turns, user_id=user, roles=("user",))  # what the user said
                console.print(f"[bold]{user}[/]: {turns[0][1]!r} -> {len(records)} memory, rank "
                              f"{records[0].rank}, absorbed in {time.perf_counter() - start:.2f} s")
            console.rule("Session 2: a fresh prompt; what does the assistant know?")
            table = Table("user", "question", "mode", "answer", "prompt tokens", "seconds")
            for user, questions in SESSION_2.items():
                for question in questions:
                    for mode in ("adapter", "context", "none"):
                        messages, _ = mem.prepare(question, user, mode=mode)
                        n_prompt = len(mem.d2l.base.tokenizer.apply_chat_template(
                            messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
                        start = time.perf_counter()
                        answer = mem.chat(question, user_id=user, mode=mode, max_new_tokens=24)
                        table.add_row(user, question, mode, answer.strip(), str(n_prompt),
                                      f"{time.perf_counter() - start:.1f}")
            console.print(table)
            console.rule("Forget: Alice's memories are erased")
            removed = mem.forget(user_id="alice")
            answer = mem.chat("What is my favorite color?", user_id="alice", mode="context", max_new_tokens=32)
            console.print(f"removed {removed} memories; recall now finds "
                          f"{len(mem.recall('favorite color', user_id='alice'))}; answer: {answer.strip()!r}")


if __name__ == "__main__":
    main()
