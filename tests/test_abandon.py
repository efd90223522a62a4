"""Every way a consumer can abandon a stream leaves the LLM ready for the next call.

Each test leaves a stream behind in one way and then calls the LLM again from the same thread
(or, for a dead thread, from another one): the call must run at once, with the text a fresh
LLM gives, and the abandoned stream must be over.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time

import pytest

from cyllama_cffi import LLM, FinishReason

PROMPT = "The capital of France is"
LONG_PROMPT = "Tell me everything about the history of the Roman Empire. " * 60  # ~800 tokens


@pytest.fixture(scope="module")
def llm(model_path):
    with LLM(model_path, temperature=0.0, max_tokens=16) as shared:
        yield shared


@pytest.fixture(scope="module")
def expected(llm) -> str:
    return llm(PROMPT).text


def assert_ready(llm: LLM, expected: str) -> None:
    started = time.monotonic()
    assert llm(PROMPT).text == expected
    assert time.monotonic() - started < 10.0


def wait_until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)


def press_ctrl_c_when(predicate) -> threading.Thread:
    """A real SIGINT to this process as soon as ``predicate()`` holds (the main thread gets it)."""
    def press() -> None:
        wait_until(predicate)
        os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=press, daemon=True)
    presser.start()
    return presser


def test_ctrl_c_during_the_prompt_of_a_plain_call(llm, expected):
    """No SIGINT hook, a non-streaming call: the caller never sees the stream. Ctrl-C while the
    prompt decodes raises KeyboardInterrupt, and the next call runs."""
    prompt = llm.tokenize(LONG_PROMPT)

    def mid_prompt() -> bool:
        seq = llm._seq  # None while the context is being replaced
        done = list(seq.tokens) if seq is not None else []
        return 0 < len(done) < len(prompt) and done == prompt[:len(done)]

    presser = press_ctrl_c_when(mid_prompt)
    with pytest.raises(KeyboardInterrupt):
        llm(LONG_PROMPT)
    presser.join()
    assert llm.last_finish_reason == FinishReason.CANCELLED
    assert_ready(llm, expected)


def test_ctrl_c_during_the_tokens_of_a_stream(llm, expected):
    stream = llm.stream(PROMPT, config=llm.config.replace(max_tokens=100000, n_ctx=2048))
    presser = press_ctrl_c_when(lambda: len(stream.generated) >= 3)
    with pytest.raises(KeyboardInterrupt):
        for _ in stream:
            pass
    presser.join()
    assert stream.finish_reason == FinishReason.CANCELLED
    assert_ready(llm, expected)


def test_an_exception_from_on_token(llm, expected):
    def explode(chunk: str) -> None:
        raise ValueError("the consumer failed")

    with pytest.raises(ValueError, match="consumer failed"):
        llm(PROMPT, on_token=explode)
    assert_ready(llm, expected)


def test_break_out_of_a_for_loop_keeping_the_stream(llm, expected):
    stream = llm.stream(PROMPT)
    for _ in stream:
        break
    assert_ready(llm, expected)
    assert stream.finish_reason == FinishReason.CANCELLED and list(stream) == []


def test_a_dropped_stream_even_while_the_collector_is_off(llm, expected):
    gc.disable()
    try:
        holder: dict = {}
        holder["self"] = holder  # only a reference cycle keeps the stream alive
        holder["stream"] = llm.stream(PROMPT)
        next(holder["stream"])
        del holder
        assert_ready(llm, expected)
    finally:
        gc.enable()


def test_a_stream_whose_thread_died(llm, expected):
    kept: list = []

    def consume_a_little() -> None:
        stream = llm.stream(PROMPT)
        next(stream)
        kept.append(stream)  # still referenced, but nobody consumes it any more

    for target in (consume_a_little, lambda: kept.append(llm.stream(PROMPT))):  # started or not
        thread = threading.Thread(target=target)
        thread.start()
        thread.join(60)
        assert_ready(llm, expected)
        assert kept[-1].finish_reason == FinishReason.CANCELLED


def test_a_stream_of_a_live_thread_is_not_taken_away(llm, expected):
    """The one case that must not take over: another thread is still consuming."""
    stream = llm.stream(PROMPT)
    taken = threading.Event()
    release = threading.Event()
    rest: list = []

    def consume() -> None:
        rest.append(next(stream))
        taken.set()
        release.wait(60)
        rest.extend(stream)

    consumer = threading.Thread(target=consume)
    consumer.start()
    try:
        assert taken.wait(60)
        with pytest.raises(RuntimeError, match="another thread.*not thread-safe"):
            llm(PROMPT)
    finally:
        release.set()
        consumer.join(60)
    assert "".join(rest) == expected
    assert_ready(llm, expected)
