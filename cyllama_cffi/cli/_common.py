"""What the model subcommands share: finding the model, loading it with a progress bar, errors.

Loading is cancel-safe: while llama.cpp reads the weights, Ctrl-C only raises a flag, and
the load's progress callback answers ``False`` at its next call, so llama.cpp stops and
frees what it allocated; the caller then sees ``KeyboardInterrupt``, as for any other
Ctrl-C outside a generation.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

from .._progress import ProgressBar

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # the shell's convention for a process stopped by SIGINT


class UsageError(Exception):
    """A command line that parses but cannot be run as given (exit status 2)."""


def error(message: str) -> None:
    print(f"cyllama-cffi: error: {message}", file=sys.stderr)


def model_path(args: argparse.Namespace) -> Path:
    """``--model``, else ``$CYLLAMA_MODEL``, else the default model (fetched once, with progress)."""
    from ..models import default_model_path

    return default_model_path(args.model, verbose=True, progress=True)


@contextmanager
def cancellable_load(label: str = "loading the model") -> Iterator[Callable[[float], bool]]:
    """A progress callback for a model load that draws a bar and stops on Ctrl-C.

    Used as ``with cancellable_load() as progress: LlamaModel(path, progress_callback=progress)``.
    Raises ``KeyboardInterrupt`` when Ctrl-C came during the load (after the load has
    stopped and been freed, or finished).
    """
    interrupted: List[bool] = []
    bar = ProgressBar(label)

    def on_sigint(signum: int, frame: Any) -> None:
        interrupted.append(True)  # runs in the progress callback: the next bytecode the main thread executes

    def progress(fraction: float) -> bool:
        if interrupted:
            return False
        bar.update(fraction)
        return True

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if in_main else None
    try:
        yield progress
    except Exception as failure:
        from ..errors import LoadCancelled

        if interrupted and isinstance(failure, LoadCancelled):
            raise KeyboardInterrupt from None
        raise
    finally:
        bar.close()
        if in_main:
            signal.signal(signal.SIGINT, previous)
    if interrupted:  # the load finished before the callback saw the flag
        raise KeyboardInterrupt


def load_llm(args: argparse.Namespace, **config_fields: Any) -> Any:
    """An ``LLM`` for ``args`` (model, threads, context size, verbosity) and the given config fields."""
    from ..config import GenerationConfig
    from ..llm import LLM

    path = model_path(args)
    config = GenerationConfig(n_threads=args.threads, n_ctx=args.ctx_size, **config_fields)
    llm: Optional[Any] = None
    try:
        with cancellable_load() as progress:
            llm = LLM(path, config=config, verbose=args.verbose, progress_callback=progress)
    except KeyboardInterrupt:
        if llm is not None:
            llm.__exit__(None, None, None)  # frees the model at once
        raise
    return llm


def load_model(args: argparse.Namespace) -> Any:
    """A ``LlamaModel`` for ``args`` (for embeddings and the bench, which need no ``LLM``)."""
    from .._logging import set_verbose
    from ..lowlevel.model import LlamaModel

    path = model_path(args)
    if args.verbose:
        set_verbose(True)
    model: Optional[Any] = None
    try:
        with cancellable_load() as progress:
            model = LlamaModel(path, progress_callback=progress)
    except KeyboardInterrupt:
        if model is not None:
            model.close()
        raise
    return model
