"""The command line's grammar: subcommands, options, help text, and the bare-prompt rule.

Pure argparse, no model and no compiled module, so it is tested in the fast tier.
Global options (``--model``, ``--threads``, ``--ctx-size``, ``--verbose``) are accepted
before or after the subcommand: each subparser declares them again with
``default=SUPPRESS``, so a value given after the subcommand wins and one given before it
is not reset.
"""

from __future__ import annotations

import argparse
from typing import List, Optional, Sequence, Tuple

SUBCOMMANDS = ("generate", "chat", "serve", "embed", "bench")
DEFAULT_PROMPT = "Write a short poem about a llama who learns to code."

# Global options that take a value, and those that do not: the bare-prompt rule skips them.
GLOBAL_VALUE_OPTIONS = ("--model", "--threads", "--ctx-size")
GLOBAL_FLAGS = ("--verbose",)
# Options that answer on their own: with them and no subcommand, nothing is inserted.
TOP_LEVEL_ONLY = ("-h", "--help", "--version")

EPILOG = """\
A command line without a subcommand means generate: cyllama-cffi "PROMPT".

examples:
  cyllama-cffi "Write a haiku about llamas."
  cyllama-cffi generate --max-tokens 50 --temperature 0.8 "Once upon a time"
  echo "Summarise: llamas are camelids." | cyllama-cffi generate
  cyllama-cffi chat --system "You are terse."
  cyllama-cffi serve --port 8080
  cyllama-cffi embed "first text" "second text"
  cyllama-cffi bench --prompt-tokens 256 --gen-tokens 64

The model is --model, else $CYLLAMA_MODEL, else SmolLM2-135M-Instruct (fetched once).
Run "cyllama-cffi SUBCOMMAND --help" for the options of one subcommand.
"""

GENERATE_EPILOG = """\
The prompt is the argument; "-", or no argument while stdin is not a terminal,
reads it from stdin (no argument on a terminal uses a sample prompt).
Ctrl-C stops the generation at once, even while the prompt is being read by the
model; what was generated is printed and the exit status is 130.

examples:
  cyllama-cffi generate "Write a haiku about llamas."
  cyllama-cffi generate --raw --max-tokens 50 "Once upon a time"
  cat question.txt | cyllama-cffi generate -
"""

CHAT_EPILOG = """\
Commands at the prompt: /reset clears the conversation (the system prompt stays),
/exit (or Ctrl-D) leaves with status 0, /help lists them.
Ctrl-C while an answer streams stops that answer; the partial answer stays in the
conversation. Ctrl-C at the prompt discards the line and gives a fresh prompt.

examples:
  cyllama-cffi chat
  cyllama-cffi chat --system "Answer in one sentence." --temperature 0
  cyllama-cffi chat --stats --model path/to/model.gguf
"""

SERVE_EPILOG = """\
Everything after "serve" goes to the server; "cyllama-cffi serve --help" shows its options.

examples:
  cyllama-cffi serve --port 8080
  cyllama-cffi serve path/to/model.gguf --host 0.0.0.0 --parallel 4
"""

EMBED_EPILOG = """\
Texts are the arguments, or the lines of stdin when there are none (or "-").

examples:
  cyllama-cffi embed "a llama" "an alpaca"
  printf 'one\\ntwo\\n' | cyllama-cffi embed --pooling last
  cyllama-cffi embed --format npy --output vectors.npy "a llama" "an alpaca"
"""

BENCH_EPILOG = """\
A quick check, not a benchmark suite: one prompt of N tokens decoded in one batch
(prefill), then M single-token decodes (greedy), repeated; the median of each is printed.

examples:
  cyllama-cffi bench
  cyllama-cffi bench --prompt-tokens 512 --gen-tokens 128 --repetitions 5 --threads 4
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("global options")
    group.add_argument("--model", metavar="PATH", default=default(None),
                       help="GGUF file (default: $CYLLAMA_MODEL, else SmolLM2-135M-Instruct, fetched once)")
    group.add_argument("--threads", metavar="N", type=_positive_int, default=default(None),
                       help="CPU threads (default: the usable cores)")
    group.add_argument("--ctx-size", metavar="N", type=_positive_int, default=default(None),
                       help="context size in tokens (default: sized to the prompt plus the answer)")
    group.add_argument("--verbose", action="store_true", default=default(False), help="show llama.cpp's log")


def _add_sampling_options(parser: argparse.ArgumentParser, temperature: float, max_tokens: int) -> None:
    parser.add_argument("--max-tokens", metavar="N", type=int, default=max_tokens,
                        help=f"most tokens to generate (default: {max_tokens})")
    parser.add_argument("--temperature", metavar="T", type=float, default=temperature,
                        help=f"sampling temperature, 0 for greedy (default: {temperature})")
    parser.add_argument("--seed", metavar="N", type=int, default=None, help="sampling seed (default: random)")


def build_parser(prog: str = "cyllama-cffi") -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Run a llama.cpp model from the command line: generate, chat, serve, embed, bench.")
    parser.add_argument("--version", action="version", version=f"cyllama-cffi {__version__}")
    _add_global_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")

    def subcommand(name: str, summary: str, epilog: str, **kwargs: object) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=summary + ".", epilog=epilog,
                                  formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
        _add_global_options(sub, suppress=True)
        return sub

    generate = subcommand("generate", "stream one answer to a prompt", GENERATE_EPILOG)
    generate.add_argument("prompt", nargs="?", default=None,
                          help='the prompt ("-" reads stdin; default: stdin when it is not a terminal, '
                               "else a sample prompt)")
    _add_sampling_options(generate, temperature=0.0, max_tokens=200)
    generate.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    generate.add_argument("--system", metavar="TEXT", help="a system message before the prompt (chat template)")

    chat = subcommand("chat", "talk with the model in a terminal, keeping the conversation", CHAT_EPILOG)
    chat.add_argument("--system", metavar="TEXT", help="the system message that starts the conversation")
    _add_sampling_options(chat, temperature=0.7, max_tokens=512)
    chat.add_argument("--stats", action="store_true",
                      help="after each answer, print its token counts and speed on stderr")

    # Only for the listing and "serve -h" before dispatch; dispatch() hands serve's arguments over untouched.
    commands.add_parser("serve", help="run the OpenAI-compatible HTTP server (needs the server extra)",
                        add_help=False, epilog=SERVE_EPILOG)

    embed = subcommand("embed", "print embedding vectors of texts", EMBED_EPILOG)
    embed.add_argument("texts", nargs="*", metavar="TEXT", help='texts to embed (none or "-": the lines of stdin)')
    embed.add_argument("--pooling", choices=("mean", "cls", "last", "none"), default="mean",
                       help='how token vectors become one vector; "none" prints every token\'s (default: mean)')
    embed.add_argument("--no-normalize", dest="normalize", action="store_false",
                       help="keep the raw vectors (default: L2 norm 1)")
    embed.add_argument("--format", choices=("json", "npy"), default="json",
                       help="json: one array per line; npy: one (texts x dims) array, needs --output")
    embed.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout")

    bench = subcommand("bench", "measure prefill and decode speed in tokens per second", BENCH_EPILOG)
    bench.add_argument("--prompt-tokens", "-p", metavar="N", type=_positive_int, default=128,
                       help="tokens of the prefill (default: 128)")
    bench.add_argument("--gen-tokens", "-n", metavar="M", type=_positive_int, default=32,
                       help="tokens decoded one by one (default: 32)")
    bench.add_argument("--repetitions", "-r", metavar="R", type=_positive_int, default=3,
                       help="how many times each is measured (default: 3)")
    return parser


def _skip_global_options(argv: Sequence[str]) -> int:
    """Index of the first argument that is not a global option (or its value)."""
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg in GLOBAL_FLAGS:
            index += 1
        elif arg in GLOBAL_VALUE_OPTIONS:
            index += 2
        elif arg.split("=", 1)[0] in GLOBAL_VALUE_OPTIONS:
            index += 1
        else:
            break
    return min(index, len(argv))


def with_subcommand(argv: Sequence[str]) -> List[str]:
    """``argv`` with ``generate`` inserted when it names no subcommand (the bare-prompt rule).

    ``cyllama-cffi "a prompt"``, ``cyllama-cffi --max-tokens 5 "a prompt"`` and a bare
    ``cyllama-cffi`` all mean ``generate``; ``--help`` and ``--version`` alone do not. A
    prompt that is exactly a subcommand's name needs ``generate`` written out.
    """
    argv = list(argv)
    index = _skip_global_options(argv)
    rest = argv[index:]
    if rest and (rest[0] in SUBCOMMANDS or rest[0] in TOP_LEVEL_ONLY):
        return argv
    return argv[:index] + ["generate"] + rest


def split_serve(argv: Sequence[str]) -> Optional[Tuple[List[str], List[str]]]:
    """For ``... serve ARGS``: (the global options before ``serve``, ARGS untouched); else None."""
    argv = list(argv)
    index = _skip_global_options(argv)
    if index < len(argv) and argv[index] == "serve":
        return argv[:index], argv[index + 1:]
    return None


def parse_args(argv: Sequence[str], prog: str = "cyllama-cffi") -> argparse.Namespace:
    """Parse a command line other than ``serve`` (see :func:`split_serve`)."""
    return build_parser(prog).parse_args(with_subcommand(argv))
