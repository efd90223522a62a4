"""A Ctrl-C landing anywhere inside a hand-off to a worker thread leaves that thread usable.

The prefill helper (``HelperThread``) and ``AsyncLLM``'s worker take their calls from the thread
that a ``KeyboardInterrupt`` reaches. If the interrupt could leave a lock held inside the hand-off,
the next one (the ``stop`` at exit, say) would wait forever: with ``queue.SimpleQueue`` that is
what happens on PyPy, where the queue is Python code. Here a trace function raises
``KeyboardInterrupt`` before each bytecode of a ``submit`` in turn, and another thread's hand-off
must then still go through and run. (On CPython a ``SimpleQueue`` is C and takes no trace
events; there this proves the same for the Python code of the hand-off itself.)
"""

from __future__ import annotations

import sys
import threading
from typing import Callable, Iterator

from cyllama_cffi import aio
from cyllama_cffi._background import HelperThread, Job

WAIT_SECONDS = 10.0  # a hand-off takes microseconds; a held lock waits forever


def interrupted_at_each_step(hand_off: Callable[[], None]) -> Iterator[int]:
    """Run ``hand_off`` once per bytecode it executes, interrupted just before that one; yield the step."""
    step = 1
    while True:
        seen = 0

        def tracer(frame, event, arg):
            nonlocal seen
            frame.f_trace_opcodes = True
            if event in ("line", "opcode"):
                seen += 1
                if seen == step:
                    raise KeyboardInterrupt
            return tracer

        sys.settrace(tracer)
        try:
            hand_off()
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        if seen < step:  # it ran to its end before the step to interrupt
            return
        yield step
        step += 1


def from_another_thread(hand_off: Callable[[], None]) -> bool:
    """Whether ``hand_off`` returns in time when run on a fresh thread (it would block forever on a held lock)."""
    thread = threading.Thread(target=hand_off, daemon=True)
    thread.start()
    thread.join(WAIT_SECONDS)
    return not thread.is_alive()


def test_the_prefill_helper_runs_the_next_job_after_a_submit_was_interrupted_anywhere():
    steps = 0
    helper = HelperThread()
    try:
        for step in interrupted_at_each_step(lambda: helper.submit(Job(lambda: None))):
            steps += 1
            ran = []
            job = Job(lambda: ran.append(True))
            assert from_another_thread(lambda: helper.submit(job)), f"a submit hung after one interrupted at step {step}"
            assert job.wake.acquire(timeout=WAIT_SECONDS), f"the job after step {step} never ran"
            assert ran == [True] and job.error is None
    finally:
        helper.join()
    assert steps > 0  # the hand-off has Python steps to interrupt
    assert not helper.is_alive()


def test_the_async_worker_runs_the_next_call_after_a_submit_was_interrupted_anywhere():
    steps = 0
    worker = aio._Worker()
    try:
        for step in interrupted_at_each_step(lambda: worker.submit(lambda: None)):
            steps += 1
            futures = []
            assert from_another_thread(lambda: futures.append(worker.submit(lambda: step))), (
                f"a submit hung after one interrupted at step {step}")
            assert futures[0].result(timeout=WAIT_SECONDS) == step
    finally:
        worker.stop()
        worker.join(WAIT_SECONDS)
    assert steps > 0
    assert not worker._thread.is_alive()
