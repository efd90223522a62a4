"""The thread that owns the engine: admits requests into slots and steps them together.

One :class:`Scheduler` thread does every call into the :class:`~cyllama_cffi._engine.Engine`
(its context is not thread-safe). Handlers :meth:`~Scheduler.submit` a :class:`Job` from any
thread; a bounded queue holds jobs waiting for a slot (:class:`QueueFull` past it). Between
two steps the thread admits queued jobs into free slots (each with its own sampler chain, stop
rules and grammar) and drops cancelled ones, then steps: one ``llama_decode`` for every slot.
It reports each job's text, and its end, through the job's ``sink`` (called on this thread:
the sink hands the event to the event loop). A job that asked for log-probabilities gets the
entries of its new tokens just before each piece of text, and the rest (tokens whose text was
held back: a stop sequence) just before its end: each entry exactly once, in token order.
Idle, it sleeps on a condition.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, List, Optional

from .._engine import Engine, EngineSequence
from ..config import GenerationConfig
from ..response import FinishReason
from ..sampling import build_sampler
from ._metrics import Metrics

__all__ = ["Job", "QueueFull", "Scheduler", "Usage"]

_log = logging.getLogger("cyllama_cffi.server")


class QueueFull(Exception):
    """Every slot is busy and the queue holds ``max_queue`` jobs already."""


class ShuttingDown(Exception):
    """The scheduler is stopping and takes no more work."""


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens found in the slot's cells, not decoded again


# ("text", str) | ("logprobs", [TokenLogprob]) | ("done", (finish_reason, Usage)) | ("error", str)
Sink = Callable[[str, Any], None]


class Job:
    """One request's generation: its tokens, its config, where its text goes.

    ``logprobs``: None (off), or how many alternatives each token's entry lists (0 to 20).
    """

    def __init__(self, prompt: List[int], config: GenerationConfig, sink: Sink,
                 logprobs: Optional[int] = None) -> None:
        self.prompt = prompt
        self.config = config
        self.sink = sink
        self.logprobs = logprobs
        self._sent = 0  # log-probability entries handed to the sink so far
        self.sequence: Optional[EngineSequence] = None
        self.cancelled = False
        self.finished = False
        self.t_submitted = time.perf_counter()
        self._decoded = 0  # prompt tokens counted in the metrics so far
        self._generated = 0  # generated tokens counted so far
        self._scheduler: Optional["Scheduler"] = None

    def cancel(self) -> None:
        """Stop this job at the next step (any thread); its slot and cells are freed."""
        if self.finished or self.cancelled:
            return
        self.cancelled = True
        sequence = self.sequence
        if sequence is not None:
            sequence.cancel()
        if self._scheduler is not None:
            self._scheduler.wake()

    # -- the scheduler thread -------------------------------------------------------------------
    def _text(self, text: str) -> None:
        """The sequence's ``on_text``: the entries of the tokens so far first, then the text."""
        self._send_logprobs()
        self.sink("text", text)

    def _send_logprobs(self) -> None:
        entries = self.sequence.logprobs if self.sequence is not None else None
        if entries is not None and len(entries) > self._sent:
            new, self._sent = entries[self._sent:], len(entries)
            self.sink("logprobs", new)


class Scheduler:
    """Owns ``engine`` and steps it on its own thread; see the module docstring."""

    def __init__(self, engine: Engine, metrics: Metrics, max_queue: int) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_queue = max_queue
        self._queue: Deque[Job] = deque()
        self._active: List[Job] = []
        # Reentrant: stop() may run in a signal handler while the main thread is inside submit().
        self._cond = threading.Condition(threading.RLock())
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="cyllama-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # -- any thread -------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job``; ``QueueFull`` when the queue is at its bound, ``ShuttingDown`` when stopping."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            free = self.engine.n_seq_max - len(self._active)
            if len(self._queue) >= self.max_queue + max(0, free):  # past the free slots, max_queue may wait
                raise QueueFull(f"all {self.engine.n_seq_max} slots are busy and {len(self._queue)} requests wait")
            job._scheduler = self
            self._queue.append(job)
            self.metrics.set(queue_depth=len(self._queue))
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def stop(self) -> None:
        """Cancel all work (even a running decode) and end the thread; safe from any thread."""
        with self._cond:
            self._stopping = True
            self.engine.cancel()
            self._cond.notify()

    def join(self, timeout: Optional[float] = None) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the scheduler thread -----------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self._active and not self._queue:
                        self._cond.wait()
                    if self._stopping:
                        break
                    self._admit()
                if not engine.running:
                    self._collect()
                    continue
                try:
                    engine.step()
                    self.metrics.add(steps=1)
                except Exception as error:  # a decode failure: end every job, keep serving
                    _log.exception("engine step failed")
                    for sequence in engine.running:
                        engine.drop(sequence)
                    for job in list(self._active):
                        self._end(job, "error", str(error))
                    self._active = []
                    continue
                self._collect()
        finally:
            self._shutdown()

    def _admit(self) -> None:
        """Queued jobs into free slots, oldest first (under the lock)."""
        engine = self.engine
        for job in [j for j in self._queue if j.cancelled]:  # gone before their turn: the queue shrinks now
            self._queue.remove(job)
            self.metrics.add(cancels=1)
            self._end(job, "done", (FinishReason.CANCELLED, Usage(len(job.prompt), 0, 0)))
        while self._queue and engine.has_room:
            job = self._queue.popleft()
            if job.cancelled:
                self._end(job, "done", (FinishReason.CANCELLED, Usage(len(job.prompt), 0, 0)))
                self.metrics.add(cancels=1)
                continue
            try:
                if not self._active and not engine.running:
                    engine.begin()  # forget a cancel made while idle
                sampler = build_sampler(job.config, engine.ctx.vocab, engine.seq_capacity)
                sequence = EngineSequence(job.prompt, sampler, job.config.max_tokens, job.config.stop_sequences,
                                          on_text=job._text, logprobs=job.logprobs)
                engine.add(sequence)
            except Exception as error:  # a grammar llama.cpp refuses, a prompt that cannot fit
                self._end(job, "error", str(error))
                continue
            job.sequence = sequence
            if job.cancelled:
                sequence.cancel()
            self._active.append(job)
            self.metrics.add(prompt_tokens=len(job.prompt), prompt_tokens_cached=sequence.n_reused)
        self.metrics.set(queue_depth=len(self._queue), slots_busy=len(self._active))

    def _collect(self) -> None:
        """After a step: count progress, report first tokens and ends, free finished jobs."""
        decoded = generated = 0
        still = []
        now = time.perf_counter()
        for job in self._active:
            sequence = job.sequence
            assert sequence is not None
            done = min(len(sequence.cached), len(sequence.prompt)) - sequence.n_reused
            decoded += done - job._decoded
            job._decoded = done
            if job._generated == 0 and sequence.generated:
                self.metrics.first_token(now - job.t_submitted)
            generated += len(sequence.generated) - job._generated
            job._generated = len(sequence.generated)
            if sequence.finished:
                if sequence.finish_reason is FinishReason.CANCELLED:
                    self.metrics.add(cancels=1)
                usage = Usage(len(sequence.prompt), len(sequence.generated), sequence.n_reused)
                self._end(job, "done", (sequence.finish_reason, usage))
            else:
                still.append(job)
        self._active = still
        self.metrics.add(prompt_tokens_decoded=decoded, generated_tokens=generated)
        self.metrics.set(slots_busy=len(self._active))

    def _end(self, job: Job, kind: str, value: Any) -> None:
        job.finished = True
        try:
            if kind == "done":
                job._send_logprobs()  # the entries whose text was held back, then the end
            job.sink(kind, value)
        except Exception:  # a sink must not stop the engine
            _log.exception("a request's sink failed")

    def _shutdown(self) -> None:
        """Stopping: every job ends (cancelled), then the engine is freed."""
        engine = self.engine
        for sequence in engine.running:
            engine.drop(sequence)
        self._collect()
        with self._cond:
            queued, self._queue = list(self._queue), deque()
        for job in queued:
            self.metrics.add(cancels=1)
            self._end(job, "done", (FinishReason.CANCELLED, Usage(len(job.prompt), 0, 0)))
        self.metrics.set(queue_depth=0, slots_busy=0)
        engine.close()
