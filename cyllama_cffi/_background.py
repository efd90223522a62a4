"""One call at a time on a helper thread, which its caller may stop waiting for.

Why: ggml polls the abort flag once per graph node, and a node can be long. Late in a long
prompt the attention node covers every cached position: on 2 cores, a 512-token micro-batch
at 4,000 cached tokens spends ~130 ms in that one node, so the abort flag alone answers a
cancel only after up to that long. Run on a helper, a prompt chunk's decode still stops at its
next node, but the stream that waited for it returns at once (see :mod:`._generation`).
"""

from __future__ import annotations

import threading
from typing import Callable, Optional


class Job:
    """``call()`` run on a :class:`HelperThread`; ``done`` and then ``wake`` are set when it returns."""

    def __init__(self, call: Callable[[], None], wake: Optional[threading.Event] = None) -> None:
        self._call = call
        self.done = threading.Event()
        self.wake = wake if wake is not None else threading.Event()
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            self._call()
        except BaseException as error:  # handed to whoever reads the outcome
            self.error = error
        finally:
            self._call = None  # hold nothing (sequence, context) once done
            self.done.set()
            self.wake.set()


class HelperThread:
    """A daemon thread that runs :class:`Job` s in turn: one per prompt, ended with it.

    One thread for all chunks of a prompt rather than one per ``LLM``: ggml's OpenMP build keeps
    a pool of worker threads per calling thread and synchronises every graph node with an OpenMP
    barrier, and libgomp stops spinning at those barriers (sleeping in the kernel instead) once
    its pools hold more threads than there are cores. A decode thread kept beside the one that
    decodes the generated tokens made token decoding ~18 % slower on 2 cores; a thread that
    ends with its prompt frees its pool before the first token.
    """

    def __init__(self) -> None:
        import queue  # here: it costs the package's import ~2 ms

        self._jobs: "queue.SimpleQueue[Optional[Job]]" = queue.SimpleQueue()
        self.thread: Optional[threading.Thread] = None

    def submit(self, job: Job) -> Job:
        if self.thread is None:
            self.thread = threading.Thread(target=_serve, args=(self._jobs,), name="cyllama-decode", daemon=True)
            self.thread.start()
        self._jobs.put(job)
        return job

    def stop(self) -> Optional[threading.Thread]:
        """End the thread after the job it runs, if any; returns the thread (join it to wait)."""
        thread, self.thread = self.thread, None
        if thread is not None:
            self._jobs.put(None)
        return thread


def _serve(jobs) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        job.run()
        del job  # hold nothing while waiting for the next one
