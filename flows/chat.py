"""`gptflow chat`: a multi-turn conversation with a model in the terminal, the answer printed as it is sampled.

    gptflow chat --model models:/gpt-tiny@candidate [--system TEXT] [--temperature T] [--top-k K] [--top-p P]
                 [--max-tokens N] [--seed S]

Type a message and press Enter; `/reset` starts a new conversation, `/quit` (or Ctrl-D) ends. Ctrl-C stops an
answer being written and keeps what was written. The prompt, the cut to the context and the streaming are
`tasks/chat_session.py`'s, the same the registered model's `predict_stream` uses.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import TextIO

from tasks.chat_session import Sampling, stream_answer
from tasks.stage import GptflowError

COMMANDS = "/reset starts a new conversation; /quit or Ctrl-D ends"
YOU, ASSISTANT = "you> ", "assistant> "


def chat(model, tok, opts: Sampling, system: str | None = None, stdin: TextIO | None = None,
         stdout: TextIO | None = None) -> list[list[dict[str, str]]]:
    """Talk until /quit or end of input (default: the process's stdin and stdout); returns the conversations
    (a /reset starts the next one).

    Turn n of a conversation samples with seed `opts.seed + n`, so a conversation replays the same with a seed."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    start = [{"role": "system", "content": system}] if system else []
    convos = [list(start)]
    turn = 0
    stdout.write(f"({COMMANDS})\n")
    while (line := _read(stdin, stdout)) is not None and line.strip() != "/quit":
        if line.strip() == "/reset":
            convos.append(list(start))
            turn = 0
            stdout.write("(new conversation)\n")
            continue
        if not line.strip():
            continue
        history = convos[-1]
        history.append({"role": "user", "content": line.rstrip("\n")})
        seed = None if opts.seed is None else opts.seed + turn
        answer = _answer(model, tok, history, replace(opts, seed=seed), stdout)
        if answer is None:
            history.pop()
            continue
        history.append({"role": "assistant", "content": answer})
        turn += 1
    stdout.write("\n")
    return convos


def _read(stdin: TextIO, stdout: TextIO) -> str | None:
    """One line from the user; None at end of input (Ctrl-D) or Ctrl-C at the prompt."""
    try:
        if stdin is sys.stdin and stdin.isatty() and _readline():
            return input(YOU)  # line editing and history; the prompt goes to stdout only once readline is loaded
        stdout.write(YOU)
        line = stdin.readline()
        stdout.write(line)  # echoed, as a terminal would: the transcript reads as a conversation
        stdout.flush()
        return line or None
    except (EOFError, KeyboardInterrupt):
        return None


def _answer(model, tok, history, opts: Sampling, stdout: TextIO) -> str | None:
    """Stream one answer to stdout; None (and a one-line note) when the message cannot fit the context."""
    pieces: list[str] = []
    try:
        stdout.write(ASSISTANT)
        for chunk in stream_answer(model, tok, history, opts):
            stdout.write(chunk)
            stdout.flush()
            pieces.append(chunk)
    except GptflowError as e:
        stdout.write(f"\n(not sent: {e})\n")
        return None
    except KeyboardInterrupt:
        stdout.write(" (stopped)")
    stdout.write("\n")
    return "".join(pieces)


def _readline() -> bool:
    try:
        import readline  # noqa: F401
    except ImportError:  # Windows: read plain lines
        return False
    return True
