"""The two layers of cancellation of one ``LLM``, in one object.

``request()`` sets a flag, which the generation checks between prompt chunks and once per
token, and the C abort flag of the LLM's context, which ggml polls once per graph node inside
``llama_decode``, so even a running prefill stops at its next node. A prompt chunk decodes on a
helper thread while the stream waits in :meth:`Cancellation.wait`, which ``request()`` also
wakes: the stream returns at once, and the chunk's decode stops on its own (see
:mod:`._generation`).

``request()`` takes no lock and never waits: it is safe from any thread and from a signal
handler that interrupts the very thread that is generating.
"""

from __future__ import annotations

from typing import Optional

from ._background import Job, wake
from .errors import ClosedError
from .lowlevel.context import LlamaContext


class Cancellation:
    """The cancel state of one LLM: a flag, its context's C flag, and a waiter to wake."""

    def __init__(self) -> None:
        self._requested = False
        self._ctx: Optional[LlamaContext] = None
        self._waiting: Optional[Job] = None

    def attach(self, ctx: Optional[LlamaContext]) -> None:
        """The context whose C flag ``request()`` sets from now on."""
        self._ctx = ctx

    def begin(self) -> None:
        """A generation starts: forget earlier requests (and SIGINTs caught while idle)."""
        if self._ctx is not None:
            self._ctx.begin_generation()
        self._requested = False

    def is_requested(self) -> bool:
        return self._requested

    def request(self) -> None:
        """Stop the running generation: between tokens, and inside ``llama_decode``."""
        self._requested = True  # before the waiter is read: see wait()
        self.interrupt()

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
        job = self._waiting
        if job is not None:
            wake(job.wake)

    def wait(self, job: Job) -> None:
        """Block until ``job`` has finished or a cancel is requested (look at ``job.finished``).

        The waiter is published before the flag is read, and ``request()`` sets the flag before
        it reads the waiter: whatever the interleaving, a request is never missed. An
        ``interrupt()`` alone may be: then the C flag ends the job's decode at its next node.
        """
        self._waiting = job
        try:
            if not self._requested:
                job.wake.acquire()
        finally:
            self._waiting = None
