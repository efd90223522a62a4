"""One call at a time on a helper thread, which its caller may stop waiting for.

Why: ggml polls the abort flag once per graph node, and a node can be long. Late in a long
prompt the attention node covers every cached position: on 2 cores, a 512-token micro-batch
at 4,000 cached tokens spends ~130 ms in that one node, so the abort flag alone answers a
cancel only after up to that long. Run on a helper, a prompt chunk's decode still stops at its
next node, but the stream that waited for it returns at once (see :mod:`._generation`).

Nothing here blocks the thread that signals: a job's completion and a cancel both wake the
waiter by releasing a plain lock, which never waits and takes no other lock, so it is safe
from a signal handler and from a thread that a ``KeyboardInterrupt`` left anywhere.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable, Deque, Optional


class Job:
    """``call()`` run on a :class:`HelperThread`; ``finished`` once it returned, ``error`` if it raised.

    ``wake`` is a lock held from the start and released once: when the call returns, or when
    someone else wants the waiter back early (:func:`wake`).
    """

    def __init__(self, call: Callable[[], None]) -> None:
        self._call: Optional[Callable[[], None]] = call
        self.finished = False
        self.error: Optional[BaseException] = None
        self.wake = threading.Lock()
        self.wake.acquire()

    def run(self) -> None:
        try:
            self._call()  # type: ignore[misc]
        except BaseException as error:  # handed to whoever reads the outcome
            self.error = error
        finally:
            self._call = None  # hold nothing (sequence, context) once done
            self.finished = True
            wake(self.wake)


def wake(lock: threading.Lock) -> None:
    """Release a job's wake lock if nobody has yet: never blocks."""
    try:
        lock.release()
    except RuntimeError:  # released already (the job finished, or another wake came first)
        pass


class Inbox:
    """Items handed to one consumer thread, in order: ``put`` never blocks, wherever it is interrupted.

    A deque and a lock rather than a queue: a ``KeyboardInterrupt`` that lands inside a queue's
    ``put()`` can leave the queue's internal lock held (on PyPy ``queue.SimpleQueue`` is Python
    code), and the next ``put()`` (the one that stops the thread, at exit) then waits forever.
    ``deque.append`` and ``Lock.release`` are single steps: interrupted between them, the item
    at worst waits for the next ``put``, which wakes the consumer for both.
    """

    def __init__(self) -> None:
        self._items: "Deque[Any]" = deque()
        self._ready = threading.Lock()  # released (by wake) when items may be waiting
        self._ready.acquire()

    def put(self, item: Any) -> None:
        self._items.append(item)
        wake(self._ready)

    def get(self) -> Any:
        """The next item, waiting for one (the consumer thread only)."""
        while not self._items:
            self._ready.acquire()  # until a wake; one that came early returns at once, and the loop looks again
        return self._items.popleft()


class HelperThread:
    """A daemon thread that runs :class:`Job` s in turn: one per prompt, ended with it.

    One thread for all chunks of a prompt rather than one per ``LLM``: ggml's OpenMP build keeps
    a pool of worker threads per calling thread and synchronises every graph node with an OpenMP
    barrier, and libgomp stops spinning at those barriers (sleeping in the kernel instead) once
    its pools hold more threads than there are cores. A decode thread kept beside the one that
    decodes the generated tokens made token decoding ~18 % slower on 2 cores; a thread that
    ends with its prompt frees its pool before the first token, and the thread that starts it
    frees its own first (``KVSequence.start_helper``).
    """

    def __init__(self) -> None:
        self._jobs = Inbox()  # of Job, or None to stop
        self._thread = threading.Thread(target=_serve, args=(self._jobs,), name="cyllama-decode", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        self._jobs.put(job)
        return job

    def stop(self) -> None:
        """End the thread after the job it runs, if any (idempotent, never blocks)."""
        self._jobs.put(None)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self) -> None:
        """Stop the thread and wait for it (its OpenMP pool goes with it)."""
        self.stop()
        if self._thread.ident is not None and self._thread is not threading.current_thread():
            self._thread.join()


def _serve(jobs: Inbox) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        job.run()
        del job  # hold nothing while waiting for the next one
