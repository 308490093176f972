"""The chatbot's terminal face: a REPL that streams answers and absorbs every finished conversation.

    python -m examples.chatbot.terminal --store DIR [--user alice] [--mode hybrid] [--max-new-tokens 128]

Ending a conversation (/new, /user, /quit, Ctrl-D, the end of piped input) absorbs it into the user's
memory; the next one starts with an empty prompt. Input, streaming and record printing are the
`d2l-memory chat` REPL's own (`d2l_memory.cli`); this module adds the commands.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable

from rich.markup import escape

from d2l_memory import MODES, D2LMemoryError
from d2l_memory.cli import err, input_lines, open_memory, out, print_error, print_records, stream_answer
from examples.chatbot.conversation import DEFAULT_MODE, Conversation, check_mode, check_user, forget, memories

HELP = """\
[bold]/new[/]            end this conversation (it is absorbed into memory) and start a fresh one
[bold]/memories[/]       list your memories
[bold]/forget all[/]     forget all your memories (and this conversation)
[bold]/forget ID[/]      forget one memory
[bold]/mode NAME[/]      how memories reach the model: {modes}
[bold]/user NAME[/]      end this conversation and talk as another user
[bold]/quit[/]           end this conversation and leave"""


def _n_memories(n: int) -> str:
    return f"{n} {'memory' if n == 1 else 'memories'}"


def end(conversation: Conversation) -> None:
    """Absorb the conversation, saying what was learnt."""
    if not conversation.messages:
        return
    with err.status("Absorbing the conversation into memory…"):
        records = conversation.end()
    err.print(f"[dim]Remembered this conversation as {_n_memories(len(records))} of "
              f"{escape(conversation.user_id)}.[/]")


def command(conversation: Conversation, name: str, arg: str) -> bool:
    """Run one slash command; False when it asks to leave.

    Raises:
        ValueError / D2LMemoryError: a bad argument, or what the memory refuses.
    """
    user = conversation.user_id
    if name in ("/quit", "/exit"):
        return False
    if name == "/help":
        out.print(HELP.format(modes=", ".join(MODES)))
    elif name == "/new":
        end(conversation)
        err.print("[dim]New conversation.[/]")
    elif name == "/memories":
        records = memories(conversation.memory, user)
        if records:
            print_records(records)
        else:
            out.print(f"[dim]{escape(user)} has no memories.[/]")
    elif name == "/forget":
        if not arg:
            raise ValueError("say what to forget: /forget all, or /forget ID (ids are in /memories)")
        if arg == "all":
            conversation.messages = []  # forgetting everything includes what this conversation would add
        n = forget(conversation.memory, user, None if arg == "all" else arg)
        out.print(f"Forgot {_n_memories(n)} of {escape(user)}.")
    elif name == "/mode":
        if arg:
            conversation.mode = check_mode(arg)
        out.print(f"Mode: [bold]{conversation.mode}[/] (of {', '.join(MODES)})")
    elif name == "/user":
        if not arg:
            raise ValueError("say who: /user NAME")
        new_user = check_user(arg)  # before ending anything: a bad name changes nothing
        end(conversation)
        conversation.user_id = new_user
        out.print(f"Talking as [bold]{escape(new_user)}[/] "
                  f"({_n_memories(len(memories(conversation.memory, new_user)))}).")
    else:
        raise ValueError(f"unknown command {name}; /help lists them")
    return True


def repl(conversation: Conversation, lines: Iterable[str]) -> None:
    """Answer the messages and run the commands in `lines` until they end or say /quit; the conversation
    is absorbed on the way out."""
    for text in lines:
        try:
            if text.startswith("/"):
                name, _, arg = text.partition(" ")
                if not command(conversation, name.lower(), arg.strip()):
                    break
            else:
                stream_answer(conversation.reply(text))
        except KeyboardInterrupt:  # stop this answer, keep the conversation
            err.print("[dim](interrupted)[/]")
        except (ValueError, TypeError, D2LMemoryError) as exc:
            print_error(exc)
    end(conversation)


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, load the memory, and run the REPL on the terminal or on piped stdin."""
    parser = argparse.ArgumentParser(prog="python -m examples.chatbot.terminal", description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="./chatbot-memories", help="memory store directory or LanceDB URI")
    parser.add_argument("--user", default="alice", help="who is talking (switch later with /user)")
    parser.add_argument("--mode", default=DEFAULT_MODE, choices=MODES, help="how memories reach the model")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest answer, in tokens")
    args = parser.parse_args(argv)
    try:
        check_user(args.user)
    except ValueError as exc:
        parser.error(str(exc))
    with open_memory(args.store) as memory:
        conversation = Conversation(memory, args.user, args.mode, args.max_new_tokens)
        n = len(memories(memory, args.user))
        err.print(f"[dim]Talking as {escape(args.user)} ({_n_memories(n)}) in {args.mode} mode. /help lists "
                  "the commands; /quit or Ctrl-D ends.[/]")
        interactive = sys.stdin.isatty()
        repl(conversation, input_lines(interactive, lambda: f"[bold cyan]{escape(conversation.user_id)}›[/] "))


if __name__ == "__main__":
    main()
