"""``cyllama-cffi generate [PROMPT]``: stream one answer (the default subcommand).

Ctrl-C stops the generation at once, even in the middle of the prefill (the LLM's
SIGINT handler interrupts ``llama_decode``); what was generated is printed and the exit
status is 130, the shell's convention for a process stopped by Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, TextIO

from ._common import EXIT_INTERRUPTED, EXIT_OK, UsageError, load_llm
from ._parser import DEFAULT_PROMPT


def read_prompt(prompt: Any, stdin: TextIO) -> str:
    """The prompt text: the argument, or stdin for ``-`` (or no argument when stdin is not a terminal)."""
    if prompt == "-" or (prompt is None and not stdin.isatty()):
        text = stdin.read()
        if text.strip():
            return text
        if prompt == "-":
            raise UsageError("stdin gave an empty prompt")
        return DEFAULT_PROMPT  # e.g. stdin is /dev/null: as on a terminal
    return DEFAULT_PROMPT if prompt is None else prompt


def run(args: argparse.Namespace) -> int:
    if args.raw and args.system:
        raise UsageError("--system goes through the chat template, which --raw skips: use one of them")
    prompt = read_prompt(args.prompt, sys.stdin)
    llm = load_llm(args, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    with llm:
        messages: List[Dict[str, str]] = []
        if args.system:
            messages.append({"role": "system", "content": args.system})
        messages.append({"role": "user", "content": prompt})
        with llm.install_sigint_handler():
            stream = llm(prompt, stream=True) if args.raw else llm.chat(messages, stream=True)
            for chunk in stream:
                sys.stdout.write(chunk)
                sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        stats = llm.last_stats
        if stats is not None:
            print(f"[{llm.last_finish_reason.value}: {stats.prompt_tokens} prompt tokens, "
                  f"{stats.generated_tokens} generated at {stats.tokens_per_second:.1f} tok/s]", file=sys.stderr)
        return EXIT_INTERRUPTED if llm.last_finish_reason == "cancelled" else EXIT_OK
