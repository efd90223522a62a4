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

import os
import queue
import threading
from typing import Callable, Optional

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
    """One daemon thread that runs :class:`BackgroundDecode` jobs in turn, for one ``LLM``.

    One long-lived thread rather than one per chunk: ggml's OpenMP build keeps a pool of
    worker threads per calling thread, so a new caller per chunk would rebuild that pool every
    time and make the process's thread count churn. The thread holds no reference to the
    ``LLM`` between jobs, so an unreferenced ``LLM`` is still collected (its finalizer stops it).
    """

    def __init__(self) -> None:
        self._jobs: "queue.SimpleQueue[Optional[BackgroundDecode]]" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._pid = 0
        self._lock = threading.Lock()

    def submit(self, job: BackgroundDecode) -> None:
        with self._lock:
            if self._thread is None or self._pid != os.getpid():  # first use, or a forked child
                self._jobs = queue.SimpleQueue()
                self._thread = threading.Thread(target=_serve, args=(self._jobs,), name="cyllama-decode",
                                                daemon=True)
                self._pid = os.getpid()
                self._thread.start()
            self._jobs.put(job)

    def stop(self, wait: bool = True) -> None:
        """End the thread after the job it runs, if any (idempotent); ``wait``: join it."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._jobs.put(None)
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()


def _serve(jobs: "queue.SimpleQueue[Optional[BackgroundDecode]]") -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        job.run()
        del job  # hold nothing (stream, context) while waiting for the next one
