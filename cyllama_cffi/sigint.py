"""Ctrl-C that interrupts a running ``llama_decode``.

Python runs signal handlers only between bytecodes, so a plain
``signal.signal`` handler waits for a multi-second prefill to finish. Here two
layers are installed, Python's first and the shim's C ``sigaction`` hook on
top of it:

* the C hook bumps a process-wide counter that the abort callback of every
  watching context reads, so the decode stops within one graph node, and then
  chains to the previous handler (CPython's or PyPy's own trampoline), so
* the Python handler still runs exactly once and calls ``cancel()`` (no
  ``KeyboardInterrupt``): at once while the main thread waits for a prompt chunk
  decoded on a helper thread, right after the decode returns when it is the
  main thread that decodes (generated tokens; low-level calls).

Handles restore in reverse order. SIGINT is blocked while handlers are
swapped, so a Ctrl-C arriving mid-swap is delivered afterwards, never to a
half-restored state.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List

from ._ffi import lib

_stack: List["SigintHandle"] = []
_stack_lock = threading.Lock()


@contextmanager
def _sigint_blocked() -> Iterator[None]:
    if hasattr(signal, "pthread_sigmask"):
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    else:  # pragma: no cover - non-POSIX
        yield


class SigintHandle:
    """Returned by ``install_sigint_handler``; ``restore()`` (idempotent) or use as a context manager."""

    def __init__(self, previous: Any, on_restore: Callable[[], None]) -> None:
        self._previous = previous
        self._on_restore = on_restore
        self._restored = False

    @property
    def active(self) -> bool:
        return not self._restored

    def restore(self) -> None:
        """Put back exactly the handler that was there before (and the C hook of an outer handle)."""
        if self._restored:
            return
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("restore() must be called from the main thread (signal handlers live there)")
        with _stack_lock, _sigint_blocked():
            self._restored = True
            lib.cyl_sigint_uninstall()
            signal.signal(signal.SIGINT, self._previous)
            if self in _stack:
                _stack.remove(self)
            if _stack:  # an outer handle is still active: its C hook goes back on top
                lib.cyl_sigint_install()
            self._on_restore()

    def __enter__(self) -> "SigintHandle":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.restore()


def install_sigint_handler(cancel: Callable[[], None], on_restore: Callable[[], None] = lambda: None) -> SigintHandle:
    """Route Ctrl-C to ``cancel`` and let it interrupt running decodes.

    Main thread only (``ValueError`` otherwise), like ``signal.signal``.
    Decodes stop early only in contexts that watch SIGINT (``LLM`` does this
    for its own context while the handle is active).
    """
    if threading.current_thread() is not threading.main_thread():
        raise ValueError("install_sigint_handler() must be called from the main thread")

    def on_sigint(signum: int, frame: Any) -> None:
        cancel()

    with _stack_lock, _sigint_blocked():
        previous = signal.signal(signal.SIGINT, on_sigint)
        if lib.cyl_sigint_install() != 0:
            signal.signal(signal.SIGINT, previous)
            raise OSError("could not install the C SIGINT hook")
        handle = SigintHandle(previous, on_restore)
        _stack.append(handle)
    return handle


def hook_is_active() -> bool:
    """True when the C hook is the process's SIGINT handler (someone may have replaced it)."""
    return bool(lib.cyl_sigint_hook_is_current())
