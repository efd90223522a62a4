"""Threads: cancel() hammered from many threads, racing starts, ownership hand-offs, abandoned streams.

Complements test_cancellation.py (single cancels, one stream left alive at a
time). Every scenario ends with a greedy generation compared with a fresh
LLM's: whatever the threads did, the KV cache and the LLM's state must be
exactly as good as new.
"""

from __future__ import annotations

import gc
import random
import threading
import time
from typing import Dict, List

import pytest

from cyllama_cffi import LLM, ClosedError, LLMBusyError, StreamState

SHORT = "The capital of France is"
PROMPT = "Once upon a time, in a land far away,"
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 150  # ~1500 tokens: a prefill of a second or more


@pytest.fixture(scope="module")
def llm(model_path):
    with LLM(model_path, temperature=0.0, max_tokens=16) as instance:
        yield instance


@pytest.fixture(scope="module")
def reference(model_path) -> Dict[str, str]:
    with LLM(model_path, temperature=0.0, max_tokens=16) as fresh:
        return {SHORT: fresh(SHORT).text, PROMPT: fresh(PROMPT).text}


def assert_as_good_as_new(llm: LLM, reference: Dict[str, str]) -> None:
    """The KV bookkeeping matches llama.cpp's, and greedy output matches a fresh LLM's."""
    seq = llm._seq
    if seq is not None:
        if seq._helper is not None:
            seq._helper.join()  # a cancelled prompt chunk may still be returning
        # Before the next call's settle() cuts the cache back to the record: they must agree already.
        assert len(seq.tokens) == seq.ctx.memory_seq_pos_max(0) + 1
    assert llm(SHORT).text == reference[SHORT]
    assert llm(PROMPT).text == reference[PROMPT]


def wait_until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)


def test_many_threads_hammering_cancel_while_generating(llm, reference):
    """8 threads call cancel() in tight loops; each round they start at a random moment
    (0-150 ms in), so rounds are cut anywhere from inside the prefill to tokens in."""
    stop, go = threading.Event(), threading.Event()
    calls = [0] * 8
    errors: List[BaseException] = []

    def hammer(index: int) -> None:
        try:
            while not stop.is_set():
                if not go.wait(0.05):
                    continue
                for _ in range(100):
                    llm.cancel()
                    llm.cancel_requested  # noqa: B018 - reading races with the writes too
                calls[index] += 100
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    hammers = [threading.Thread(target=hammer, args=(i,)) for i in range(len(calls))]
    for thread in hammers:
        thread.start()
    rng = random.Random(7)
    rounds = []
    try:
        for round_ in range(24):
            prompt = LONG_PROMPT if round_ % 3 == 0 else PROMPT  # a third of the cancels land mid-prefill
            stream = llm.stream(prompt, config=llm.config.replace(max_tokens=48))
            opener = threading.Timer(rng.uniform(0, 0.15), go.set)
            opener.start()
            text = "".join(stream)
            opener.cancel()
            opener.join()
            go.clear()
            rounds.append((prompt is LONG_PROMPT, stream.finish_reason, len(stream.generated)))
            assert text == llm.detokenize(stream.generated)
            llm._seq.settle()  # a cancelled prompt chunk's decode returns on its helper
            assert len(llm._seq.tokens) == llm._seq.ctx.memory_seq_pos_max(0) + 1
    finally:
        stop.set()
        go.set()
        for thread in hammers:
            thread.join()
    assert not errors
    assert min(calls) > 0, calls
    assert sum(reason == "cancelled" for _, reason, _ in rounds) >= len(rounds) // 2, rounds
    assert any(long and reason == "cancelled" and not n for long, reason, n in rounds), rounds  # in a prefill
    assert any(not long and reason == "cancelled" and n for long, reason, n in rounds), rounds  # between tokens
    assert_as_good_as_new(llm, reference)


def test_a_second_generation_from_another_thread_gets_llm_busy_error(llm, reference):
    stream = llm.stream(LONG_PROMPT, config=llm.config.replace(max_tokens=4))
    box: Dict[str, object] = {}
    worker = threading.Thread(target=lambda: box.update(chunks=list(stream)))
    worker.start()
    try:
        wait_until(lambda: stream.state is StreamState.RUNNING)  # the worker is inside the prefill
        with pytest.raises(LLMBusyError, match="another thread.*not thread-safe"):
            llm(SHORT)
        with pytest.raises(RuntimeError, match="another thread"):  # cyllama's type still catches it
            llm.stream(SHORT)
    finally:
        llm.cancel()
        worker.join(60)
    assert not worker.is_alive() and stream.finish_reason == "cancelled"
    assert_as_good_as_new(llm, reference)


def test_simultaneous_starts_exactly_one_wins(llm, reference):
    for _ in range(4):
        barrier = threading.Barrier(4)
        all_tried = threading.Barrier(4)  # no thread ends (and lets go of its stream) before all tried
        results: List[object] = []
        lock = threading.Lock()

        def start() -> None:
            barrier.wait()
            try:
                outcome: object = llm.stream(LONG_PROMPT, config=llm.config.replace(max_tokens=4))
            except LLMBusyError as error:
                outcome = error
            with lock:
                results.append(outcome)
            all_tried.wait()

        threads = [threading.Thread(target=start) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        winners = [r for r in results if not isinstance(r, LLMBusyError)]
        assert len(results) == 4 and len(winners) == 1, results
        assert all("another thread" in str(r) for r in results if isinstance(r, LLMBusyError))
        winners[0].close()
    assert_as_good_as_new(llm, reference)


def test_one_stream_consumed_by_several_threads_in_turn(llm, reference):
    stream = llm.stream(PROMPT)
    pieces: List[str] = [next(stream)]

    def take(count: int) -> None:
        for _ in range(count):
            chunk = next(stream, None)
            if chunk is not None:
                pieces.append(chunk)

    for count in (2, 3, 1000):  # each thread picks up where the previous one stopped
        thread = threading.Thread(target=take, args=(count,))
        thread.start()
        thread.join(60)
    assert "".join(pieces) == reference[PROMPT] and stream.finish_reason in ("stop", "length")


def test_generations_in_different_threads_one_after_another(model_path, reference):
    holder: Dict[str, object] = {}
    steps = [lambda: holder.update(llm=LLM(model_path, temperature=0.0, max_tokens=16)),  # created here
             lambda: holder.update(short=holder["llm"](SHORT).text),                      # used there
             lambda: holder.update(prompt="".join(holder["llm"](PROMPT, stream=True))),
             lambda: holder["llm"].close(),                                               # closed elsewhere
             lambda: holder.update(again=holder["llm"](SHORT).text),                      # and used again
             lambda: holder["llm"].__exit__(None, None, None)]                            # released
    for step in steps:
        thread = threading.Thread(target=step)
        thread.start()
        thread.join(120)
    assert holder["short"] == holder["again"] == reference[SHORT] and holder["prompt"] == reference[PROMPT]
    with pytest.raises(ClosedError):
        holder["llm"](SHORT)


def test_abandoned_streams_never_block_the_llm(llm, reference):
    # 1. started in a thread that then ends without closing it (freed by reference counting on
    #    CPython; on PyPy the next call runs the collector itself)
    def abandon() -> None:
        stream = llm.stream(PROMPT)
        next(stream)

    thread = threading.Thread(target=abandon)
    thread.start()
    thread.join(60)
    assert llm(SHORT).text == reference[SHORT]

    # 2. kept alive only by a reference cycle, with the automatic collector off: the thread that
    #    left it calls again, which ends it
    class Holder:
        pass

    gc.disable()
    try:
        holder = Holder()
        holder.me = holder
        holder.stream = llm.stream(PROMPT)
        next(holder.stream)
        del holder
        assert llm(SHORT).text == reference[SHORT]
    finally:
        gc.enable()

    # 3. never started at all
    never = llm.stream(LONG_PROMPT)
    del never
    assert_as_good_as_new(llm, reference)


def test_close_from_another_thread_mid_prefill(model_path):
    llm = LLM(model_path, temperature=0.0, max_tokens=8)
    stream = llm.stream(LONG_PROMPT)
    box: Dict[str, object] = {}

    def consume() -> None:
        try:
            box["chunks"] = list(stream)
        except BaseException as error:  # pragma: no cover - reported below
            box["error"] = error

    worker = threading.Thread(target=consume)
    worker.start()
    wait_until(lambda: len(llm._seq.tokens) > 0)  # part of the prompt is in the KV cache
    started = time.monotonic()
    llm.close()
    worker.join(60)
    assert time.monotonic() - started < 5.0
    assert "error" not in box and box["chunks"] == [] and stream.finish_reason == "cancelled"
    assert llm._seq is None and not llm.model.closed  # close() frees the context, keeps the model
    assert llm(SHORT).finish_reason in ("stop", "length")
    with llm:
        pass
    with pytest.raises(ClosedError):
        llm(SHORT)
