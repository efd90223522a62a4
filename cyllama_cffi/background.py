"""One ``llama_decode`` on a helper thread, which its caller may stop waiting for.

Why: ggml polls the abort flag once per graph node, and a node can be long. Late in a long
prompt the attention node covers every cached position: on a 2-core Zen 3, a 512-token
micro-batch at 4,000 cached tokens spends ~130 ms in that one node, so the abort callback
alone answers a cancel only after up to that long. Run on a helper, the chunk's decode still
stops at its next node, but the stream that waited for it returns at once: ``cancel()`` sets
the ``wake`` event the stream waits on, and the bookkeeping of the chunk (what reached the KV
cache) is done by whichever side is still there when the decode returns.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:  # imported where the first worker starts: it costs the package's import ~2 ms
    import queue

Bookkeeping = Callable[[Optional[BaseException]], None]


class BackgroundDecode:
    """Runs ``decode()`` on a :class:`DecodeWorker`; ``wake`` is set when it returns.

    The caller waits on ``wake`` (which others may set too, to call it back early) and then
    either finds ``finished`` and handles ``error`` itself, or calls :meth:`leave` to hand the
    outcome to ``on_done``, which then runs on the helper thread. ``done`` is set after all
    of that, so whoever must not touch the context before the decode is over waits on it.
    """

    def __init__(self, decode: Callable[[], None], wake: threading.Event) -> None:
        self._decode = decode
        self.wake = wake
        self.done = threading.Event()
        self.finished = False
        self.error: Optional[BaseException] = None
        self._lock = threading.Lock()
        self._on_done: Optional[Bookkeeping] = None

    def leave(self, on_done: Bookkeeping) -> bool:
        """Stop waiting: ``on_done(error)`` runs on the helper when the decode returns.

        False when it already returned (then nothing was handed over: handle ``error`` here).
        """
        with self._lock:
            if self.finished:
                return False
            self._on_done = on_done
            return True

    def run(self) -> None:
        """On the worker thread: decode, wake the waiter, hand the outcome over if it left."""
        try:
            self._decode()
        except BaseException as error:  # handed to whoever handles the outcome
            self.error = error
        with self._lock:
            self.finished = True
            on_done = self._on_done
        self.wake.set()
        try:
            if on_done is not None:
                on_done(self.error)
        finally:
            self.done.set()


class DecodeWorker:
    """A daemon thread that runs :class:`BackgroundDecode` jobs in turn: one per prompt.

    One thread for all chunks of a prompt, ended when the prompt is done, rather than one
    per ``LLM``: ggml's OpenMP build keeps a pool of worker threads per calling thread and
    synchronises every graph node with an OpenMP barrier, and libgomp stops spinning at those
    barriers (sleeping in the kernel instead) once its pools hold more threads than there are
    cores. A decode thread kept beside the stream's own (which decodes the generated tokens)
    made token decoding ~18 % slower on 2 cores; a thread that ends with its prompt frees its
    pool before the first token.
    """

    def __init__(self) -> None:
        import queue

        self._jobs: "queue.SimpleQueue[Optional[BackgroundDecode]]" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None

    def submit(self, job: BackgroundDecode) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=_serve, args=(self._jobs,), name="cyllama-decode", daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def stop(self, wait: bool = True) -> Optional[threading.Thread]:
        """End the thread after the job it runs, if any; ``wait``: join it. Returns the thread."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            if wait:
                thread.join()
        return thread


def _serve(jobs: "queue.SimpleQueue[Optional[BackgroundDecode]]") -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        job.run()
        del job  # hold nothing (stream, context) while waiting for the next one
