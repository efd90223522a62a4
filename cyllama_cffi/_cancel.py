"""The two layers of cancellation of one ``LLM``, in one object.

``request()`` (any thread, signal handlers included) sets a ``threading.Event``, which the
generation checks between prompt chunks and once per token, and the C abort flag of the LLM's
context, which ggml polls once per graph node inside ``llama_decode``, so even a running
prefill stops at its next node. A prompt chunk decodes on a helper thread while the stream
waits in :meth:`Cancellation.wait`, which ``request()`` also wakes: the stream returns at once,
and the chunk's decode stops on its own (see :mod:`._generation`).
"""

from __future__ import annotations

import threading
from typing import Optional

from .errors import ClosedError
from .lowlevel.context import LlamaContext


class Cancellation:
    """The cancel state of one LLM: an Event, its context's C flag, and a waiter to wake."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._ctx: Optional[LlamaContext] = None
        self._waiter: Optional[threading.Event] = None
        # Bound once: the token loop checks it every token.
        self.is_requested = self._event.is_set

    def attach(self, ctx: Optional[LlamaContext]) -> None:
        """The context whose C flag ``request()`` sets from now on."""
        self._ctx = ctx

    def begin(self) -> None:
        """A generation starts: forget earlier requests (and SIGINTs caught while idle)."""
        if self._ctx is not None:
            self._ctx.begin_generation()
        self._event.clear()

    def request(self) -> None:
        """Stop the running generation: between tokens, and inside ``llama_decode``."""
        self.interrupt()
        self._event.set()
        self._wake()

    def interrupt(self) -> None:
        """Stop only the decode that is running now (the C flag) and wake a waiting stream.

        What ``Stream.close()`` needs: the stream ends, but ``cancel_requested`` stays False.
        """
        ctx = self._ctx
        if ctx is not None:  # the C flag first: a running decode stops at its next graph node
            try:
                ctx.cancel = True
            except ClosedError:  # the context was being replaced or closed: nothing runs on it
                pass
        self._wake()

    def wait(self, wake: threading.Event) -> None:
        """Block until ``wake`` is set (by whoever it belongs to) or a cancel is requested.

        The waiter is published before the Event is read, and ``request()`` sets the Event
        before it reads the waiter: whatever the interleaving, a request is never missed.
        """
        self._waiter = wake
        try:
            if not self._event.is_set():
                wake.wait()
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            waiter.set()
