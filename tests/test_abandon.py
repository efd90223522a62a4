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


def test_ctrl_c_mid_chunk_does_not_make_the_next_call_wait_for_the_chunk(model_path):
    """Ctrl-C (no hook) while a long prompt chunk decodes on the helper: the next call stops that
    chunk (the C flag) instead of waiting for the rest of it."""
    with LLM(model_path, temperature=0.0, max_tokens=4, n_batch=2048, n_ubatch=2048, n_ctx=4096) as own:
        expected = own(PROMPT).text
        prompt = own.tokenize(LONG_PROMPT * 2)[:2000]  # one chunk of ~2000 tokens: seconds of decoding
        started = {}
        real_decode = own._seq.ctx.decode

        def decode(batch):
            started["at"] = time.monotonic()
            return real_decode(batch)

        own._seq.ctx.decode = decode
        presser = press_ctrl_c_when(lambda: "at" in started and time.monotonic() - started["at"] > 0.3)
        try:
            with pytest.raises(KeyboardInterrupt):
                own(prompt)
        finally:
            presser.join()
            del own._seq.ctx.decode
        begun = time.monotonic()
        assert own(PROMPT).text == expected
        assert time.monotonic() - begun < 3.0  # the rest of the chunk alone takes several seconds


def test_a_start_interrupted_on_its_way_does_not_block(llm, expected):
    """What a Ctrl-C between claiming the LLM and setting the stream up leaves behind."""
    llm._starting = threading.current_thread()
    assert_ready(llm, expected)


def test_a_busy_lock_left_by_an_interrupted_call_is_released(llm, expected):
    """What a Ctrl-C between taking the context's busy lock and the try that releases it leaves."""
    llm(PROMPT)
    assert llm._seq.ctx._busy.acquire(blocking=False)
    assert_ready(llm, expected)


STREAM_CLOSE_FROM_HANDLER = """
import os, signal, sys, threading, time
from cyllama_cffi import LLM
llm = LLM(sys.argv[1], temperature=0.0, max_tokens=8)
stream = llm.stream("Tell me everything about the Roman Empire. " * 300)  # seconds of prompt
signal.signal(signal.SIGUSR1, lambda *args: stream.close())
def send():
    while not llm._seq.tokens:
        time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGUSR1)
threading.Thread(target=send, daemon=True).start()
chunks = list(stream)
print(len(stream.generated), stream.finish_reason, llm("The capital of France is").finish_reason, flush=True)
"""


def test_stream_close_from_a_signal_handler_interrupting_its_own_step(tmp_path, model_path):
    """The handler runs in the thread that is inside the stream's step: close() must not wait
    for that step (itself) but stop its decode."""
    import subprocess
    import sys

    script = tmp_path / "close_from_handler.py"
    script.write_text(STREAM_CLOSE_FROM_HANDLER)
    done = subprocess.run([sys.executable, str(script), str(model_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    generated, reason, next_reason = done.stdout.split()
    # The signal comes seconds before the prompt is done; even if the handler ran only after it,
    # the C flag would stop the first token's decode.
    assert int(generated) <= 1 and reason == "cancelled" and next_reason == "length"
