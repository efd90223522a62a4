"""``cyllama-cffi chat``: a conversation in the terminal, answered through ``LLM.chat``.

The keys, chosen to match the Python REPL:

* Ctrl-C while an answer streams stops that answer (the LLM's SIGINT handler, which also
  interrupts a running prefill). The partial answer stays in the history, so the history
  is what the screen shows; ``/reset`` forgets it.
* Ctrl-C at the prompt discards the line being typed and gives a fresh prompt.
* Ctrl-D at the prompt (or ``/exit``) leaves, with exit status 0.

Line editing and in-session recall (up arrow) come from ``readline`` where Python has it.
With ``--stats``, each answer is followed on stderr by its prompt and generated token
counts: the prompt count grows with the history, which shows the history reached the model.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Dict, List, Optional

from ._common import EXIT_OK, error, load_llm

PROMPT = "> "
HELP = "/reset clears the conversation, /exit (or Ctrl-D) leaves, Ctrl-C stops an answer."


def _enable_line_editing() -> None:
    try:
        import readline  # noqa: F401 - importing it is what gives input() line editing
    except ImportError:  # e.g. a Python built without it: input() still works
        pass


class Conversation:
    """The messages so far: an optional system message, then user and assistant turns."""

    def __init__(self, system: Optional[str]) -> None:
        self.system = system
        self.messages: List[Dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, text: str) -> List[Dict[str, str]]:
        """The messages to answer once the user said ``text``."""
        return self.messages + [{"role": "user", "content": text}]

    def record(self, text: str, answer: str) -> None:
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]


def answer(llm: Any, messages: List[Dict[str, str]], write: Callable[[str], None]) -> str:
    """Stream the answer to ``messages`` through ``write``; Ctrl-C stops it. Returns the text shown."""
    parts: List[str] = []
    with llm.install_sigint_handler():
        for chunk in llm.chat(messages, stream=True):
            parts.append(chunk)
            write(chunk)
    return "".join(parts)


def run(args: argparse.Namespace, read_line: Callable[[str], str] = input) -> int:
    llm = load_llm(args, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    if read_line is input:
        _enable_line_editing()
    conversation = Conversation(args.system)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    with llm:
        if sys.stdin.isatty():
            print(f"chatting with {llm.model_name}. {HELP}", file=sys.stderr)
        while True:
            try:
                line = read_line(PROMPT)
            except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line
                write("\n")
                continue
            except EOFError:  # Ctrl-D
                write("\n")
                return EXIT_OK
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                return EXIT_OK
            if text == "/reset":
                conversation.reset()
                print("[conversation cleared]", file=sys.stderr)
                continue
            if text == "/help":
                print(HELP, file=sys.stderr)
                continue
            try:
                reply = answer(llm, conversation.ask(text), write)
            except KeyboardInterrupt:  # a Ctrl-C just before or after the handler was in place
                write("\n")
                continue
            except ValueError as problem:  # e.g. the history no longer fits the context
                error(f"{problem} (/reset starts over)")
                continue
            write("\n")
            conversation.record(text, reply)
            if llm.last_finish_reason == "cancelled":
                print("[answer stopped]", file=sys.stderr)
            stats = llm.last_stats
            if args.stats and stats is not None:
                print(f"[{stats.prompt_tokens} prompt tokens, {stats.generated_tokens} generated, "
                      f"{stats.tokens_per_second:.1f} tok/s]", file=sys.stderr)
