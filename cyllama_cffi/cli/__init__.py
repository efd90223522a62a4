"""The ``cyllama-cffi`` command (also ``python -m cyllama_cffi``).

``main(argv)`` returns the exit status: 0 done, 1 an error (one line on stderr, no
traceback; or stdout's reader went away), 2 a usage error, 130 stopped by Ctrl-C. The subcommands live in one module
each and are imported only when chosen, so ``--help`` and ``serve`` load no model code.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from ._common import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, UsageError, error
from ._parser import parse_args, split_serve

__all__ = ["main"]


def _serve_argv(before: List[str], after: List[str]) -> List[str]:
    """The server's argv: ``--model``/``--ctx-size``/``--threads`` given before ``serve`` become the server's own."""
    model: List[str] = []
    passed: List[str] = []
    index = 0
    while index < len(before):
        option, _, value = before[index].partition("=")
        if option in ("--model", "--ctx-size", "--threads") and not value:
            index += 1
            value = before[index] if index < len(before) else ""
        if option == "--model":
            model = [value]
        elif option in ("--ctx-size", "--threads"):
            passed += [option, value]
        elif option == "--verbose":  # the server's own word for it
            passed += ["--log-level", "info"]
        else:
            raise UsageError(f"{option} before 'serve' is not a server option; put server options after 'serve'")
        index += 1
    return model + passed + after


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush meets no closed pipe."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real stdout: nothing will be flushed to a pipe either
        pass


def main(argv: Optional[List[str]] = None, prog: str = "cyllama-cffi") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        serve = split_serve(argv)
        if serve is not None:
            from . import serve as serve_command

            return serve_command.run(_serve_argv(*serve))
        args = parse_args(argv, prog)
        if args.command == "generate":
            from . import generate as command
        elif args.command == "chat":
            from . import chat as command  # type: ignore[no-redef]
        elif args.command == "embed":
            from . import embed as command  # type: ignore[no-redef]
        else:
            from . import bench as command  # type: ignore[no-redef]
        return command.run(args)
    except UsageError as problem:
        error(str(problem))
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. "| head -1" stopped reading: stop quietly, as other commands do
        _silence_stdout()
        return EXIT_ERROR
    except (ValueError, OSError) as problem:
        error(str(problem))
        return EXIT_ERROR
    except Exception as problem:
        from ..errors import LlamaError

        if isinstance(problem, LlamaError):
            error(str(problem))
            return EXIT_ERROR
        raise
