"""Two-layer cancellation: between tokens (Event) and inside llama_decode (C flag)."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cyllama_cffi import LLM, DecodeAborted, LlamaBatch, LlamaContext, LlamaError, StreamState

PROMPT = "Once upon a time, in a land far away,"
SHORT = "The capital of France is"
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 300  # ~3000 tokens, a multi-second prefill


@pytest.fixture(scope="module")
def llm(model_path):
    with LLM(model_path, temperature=0.0, max_tokens=64) as instance:
        yield instance


@pytest.fixture(scope="module")
def reference(model_path):
    """Greedy outputs of a fresh LLM, to compare with after cancellations."""
    with LLM(model_path, temperature=0.0, max_tokens=64) as fresh:
        return {SHORT: fresh(SHORT).text, PROMPT: fresh(PROMPT).text}


def wait_until(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.001)


def start_prefill_in_thread(llm, prompt=LONG_PROMPT, config=None):
    """Run the first step of a long-prompt stream in a worker; return (stream, thread, result box)."""
    stream = llm.stream(prompt, config=config or llm.config.replace(max_tokens=8))
    box = {}

    def run():
        box["chunks"] = list(stream)
        box["done_at"] = time.monotonic()

    worker = threading.Thread(target=run)
    worker.start()
    wait_until(lambda: len(llm._seq.tokens) > 0)  # the first n_ubatch chunk is committed: mid-prefill
    return stream, worker, box


def test_cancel_between_tokens_keeps_partial_output(llm, reference):
    chunks = []
    stream = llm(PROMPT, stream=True, config=llm.config.replace(max_tokens=200))
    for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 5:
            llm.cancel()
    assert len(chunks) == 5  # no chunk after the cancel: checked once per token
    assert stream.finish_reason == "cancelled" and llm.last_finish_reason == "cancelled"
    assert llm.cancel_requested
    assert "".join(chunks) == llm.detokenize(stream.generated)
    # the flag auto-clears: the next call runs to completion and matches a fresh LLM
    assert llm(PROMPT).text == reference[PROMPT]
    assert not llm.cancel_requested


def test_cancel_from_a_timer_thread(llm):
    config = llm.config.replace(max_tokens=100000, n_ctx=4096)
    timer = threading.Timer(0.5, llm.cancel)
    timer.start()
    started = time.monotonic()
    text = "".join(llm(PROMPT, stream=True, config=config))
    elapsed = time.monotonic() - started
    timer.join()
    assert llm.last_finish_reason == "cancelled"
    assert text and elapsed < 5.0
    assert 0 < llm.last_stats.generated_tokens < 4000


def test_stale_cancel_does_not_leak_into_the_next_call(llm, reference):
    llm.cancel()
    llm.cancel()  # idempotent
    assert llm.cancel_requested
    response = llm(SHORT)
    assert response.finish_reason in ("stop", "length") and response.text == reference[SHORT]


def test_cancel_before_first_step_yields_nothing(llm):
    stream = llm(SHORT, stream=True)
    llm.cancel()
    assert list(stream) == [] and stream.finish_reason == "cancelled"


def test_cancel_mid_prefill_returns_fast_and_follow_up_matches_fresh(llm, reference):
    stream, worker, box = start_prefill_in_thread(llm)
    n_prompt = stream.stats.prompt_tokens
    cancelled_at = time.monotonic()
    llm.cancel()
    worker.join(30)
    latency = box["done_at"] - cancelled_at
    assert latency < 1.0, f"prefill took {latency:.3f}s to stop"  # a full prefill takes several seconds
    assert box["chunks"] == [] and stream.finish_reason == "cancelled"
    assert stream.stats.generated_tokens == 0
    llm._seq.settle()  # the chunk's decode may still be returning on its helper
    committed = len(llm._seq.tokens)
    assert 0 < committed < n_prompt  # really stopped in the middle
    assert llm._seq.ctx.memory_seq_pos_max(0) + 1 == committed  # KV trimmed to what was committed
    assert llm(SHORT).text == reference[SHORT]


def test_chunked_prefill_stops_even_if_the_backend_ignores_abort(llm, reference):
    # A callback that never aborts stands in for a GPU backend that ignores the C flag:
    # the Event check between n_ubatch chunks must still stop the prefill.
    config = llm.config.replace(max_tokens=8, n_ubatch=64)
    stream = llm.stream(LONG_PROMPT, config=config)
    box = {}
    worker = threading.Thread(target=lambda: box.update(chunks=list(stream), done_at=time.monotonic()))
    ctx_holder = {}

    def ignore_abort():
        ctx_holder["called"] = True
        return False

    # the context for this config exists once the stream is created
    llm._seq.ctx.set_abort_callback(ignore_abort)
    try:
        worker.start()
        wait_until(lambda: ctx_holder.get("called") and len(llm._seq.tokens) > 0)
        cancelled_at = time.monotonic()
        llm.cancel()
        worker.join(30)
        assert box["done_at"] - cancelled_at < 1.0
        assert stream.finish_reason == "cancelled"
    finally:
        llm._seq.settle()  # the chunk that ignored the flag runs to its end
        llm._seq.ctx.set_abort_callback(None)
    assert 0 < len(llm._seq.tokens) < stream.stats.prompt_tokens
    assert llm(SHORT, config=config.replace(max_tokens=64)).text == reference[SHORT]


def blocking_node(llm, ctx, after_tokens):
    """A Python abort callback standing in for one long graph node: once ``after_tokens`` prompt
    tokens are on record it blocks (once) until ``node_over`` is set or 30 s pass, then honours
    the C flag like the built-in check. Returns (callback, in_node, node_over).

    Why: ggml polls the abort flag only between nodes, and late in a long prompt one node
    (attention over every cached position) takes 100+ ms on a slow CPU."""
    in_node, node_over = threading.Event(), threading.Event()

    def callback():
        if len(llm._seq.tokens) >= after_tokens and not in_node.is_set():
            in_node.set()
            node_over.wait(30)
        return ctx.cancel

    return callback, in_node, node_over


def thread_is_in(thread, function_name):
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name == function_name:
            return True
        frame = frame.f_back
    return False


def test_cancel_ends_the_stream_while_a_graph_node_still_runs(llm, reference):
    # The stream waits for a prefill chunk on a helper thread, so cancel() ends it at once;
    # the chunk's decode stops at ggml's next poll and is put on record; a call that starts
    # meanwhile waits for that decode (not ContextBusyError) and generates what a fresh LLM does.
    stream = llm.stream(LONG_PROMPT, config=llm.config.replace(max_tokens=8))
    ctx = llm._seq.ctx
    callback, in_node, node_over = blocking_node(llm, ctx, after_tokens=1)
    ctx.set_abort_callback(callback)
    box = {}
    consumer = threading.Thread(target=lambda: box.update(chunks=list(stream), done_at=time.monotonic()))
    follow_up = threading.Thread(target=lambda: box.update(text=llm(SHORT).text))
    try:
        consumer.start()
        assert in_node.wait(60)
        cancelled_at = time.monotonic()
        llm.cancel()
        consumer.join(10)
        assert not consumer.is_alive() and not node_over.is_set()  # ended while the "node" ran
        assert box["done_at"] - cancelled_at < 1.0
        assert box["chunks"] == [] and stream.finish_reason == "cancelled"
        follow_up.start()
        wait_until(lambda: thread_is_in(follow_up, "settle"))
    finally:
        node_over.set()
        follow_up.join(60) if follow_up.ident else None
        llm._seq.settle()
    assert box["text"] == reference[SHORT]
    assert 0 < len(llm._seq.tokens)
    ctx.set_abort_callback(None)


def test_ctrl_c_without_the_hook_does_not_wait_for_a_prefill_chunk(llm):
    # With no SIGINT hook, Ctrl-C is a KeyboardInterrupt in the main thread. Waiting for a
    # helper instead of sitting in llama_decode, the main thread raises it at once and the
    # stream ends as cancelled; the chunk finishes in the background and is put on record, and
    # the next call (which waits for it) generates an undisturbed run's text.
    prompt = "Write a short story about a lighthouse keeper and a storm at sea. " * 8
    config = llm.config.replace(max_tokens=12, n_ubatch=32)
    expected = llm(prompt, config=config)
    assert expected.stats.prompt_tokens > 64
    stream = llm.stream(prompt, config=config)
    ctx = llm._seq.ctx
    callback, in_node, node_over = blocking_node(llm, ctx, after_tokens=32)
    ctx.set_abort_callback(callback)
    sent = {}

    def press_ctrl_c():
        in_node.wait(60)
        sent["at"] = time.monotonic()
        os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=press_ctrl_c)
    try:
        presser.start()
        with pytest.raises(KeyboardInterrupt):
            next(stream)
        raised_after = time.monotonic() - sent["at"]
        assert not node_over.is_set() and raised_after < 5.0  # the node would have taken 30 s
        assert stream.finish_reason == "cancelled" and list(stream) == []
        node_over.set()
    finally:
        node_over.set()
        presser.join()
        llm._seq.settle()
        ctx.set_abort_callback(None)
    assert llm(prompt, config=config).text == expected.text


def test_context_cancel_is_a_read_write_mirror_of_the_c_flag(model):
    with LlamaContext(model, n_ctx=64) as ctx, LlamaBatch(8) as batch:
        assert ctx.cancel is False
        ctx.cancel = True
        assert ctx.cancel is True
        batch.set_tokens([1, 2, 3], 0)
        with pytest.raises(DecodeAborted) as raised:
            ctx.decode(batch)
        assert isinstance(raised.value, LlamaError) and raised.value.code == 2 and raised.value.n_past == 0
        ctx.cancel = False
        ctx.decode(batch)
        assert ctx.memory_seq_pos_max(0) == 2


def test_python_abort_callback_and_its_errors(model, caplog):
    with LlamaContext(model, n_ctx=64) as ctx, LlamaBatch(8) as batch:
        batch.set_tokens([1, 2, 3], 0)
        calls = []
        ctx.set_abort_callback(lambda: calls.append(1) or False)
        ctx.decode(batch)
        assert calls
        ctx.memory_clear()
        ctx.set_abort_callback(lambda: True)
        with pytest.raises(DecodeAborted):
            ctx.decode(batch)

        def broken():
            raise KeyError("boom")

        ctx.set_abort_callback(broken)
        with caplog.at_level(logging.ERROR, logger="cyllama_cffi"):
            with pytest.raises(DecodeAborted):
                ctx.decode(batch)
        assert any("abort callback raised" in r.message and r.exc_info for r in caplog.records)
        ctx.set_abort_callback(None)  # back to the C flag
        ctx.cancel = False
        ctx.memory_clear()
        ctx.decode(batch)
        with pytest.raises(TypeError):
            ctx.set_abort_callback(42)  # type: ignore[arg-type]


# -- abandoned, closed and overlapping streams ------------------------------------------

def test_exhausted_stream_left_alive_does_not_block(llm, reference):
    stream = llm(SHORT, stream=True)
    list(stream)
    assert llm(SHORT).text == reference[SHORT]
    assert list(stream) == []


def test_cancelled_stream_left_alive_does_not_block(llm, reference):
    stream = llm(PROMPT, stream=True)
    next(stream)
    llm.cancel()
    assert llm(SHORT).text == reference[SHORT]  # the old generator object is still alive here
    assert list(stream) == []  # resuming it ends cleanly


def test_closed_stream_does_not_block(llm, reference):
    stream = llm(PROMPT, stream=True)
    next(stream)
    stream.close()
    assert stream.finish_reason == "cancelled"
    assert llm(SHORT).text == reference[SHORT]
    assert list(stream) == []


def test_a_new_call_from_the_consuming_thread_ends_its_suspended_stream(llm, reference):
    """The thread that consumes a stream and calls the LLM again has left that stream: the new
    call ends it (cancelled) and runs, rather than refusing."""
    stream = llm(PROMPT, stream=True)
    next(stream)
    assert llm(SHORT).text == reference[SHORT]
    assert stream.finish_reason == "cancelled" and list(stream) == []


def test_garbage_collected_stream_does_not_block(llm, reference):
    stream = llm(PROMPT, stream=True)
    next(stream)
    del stream
    gc.collect()
    assert llm(SHORT).text == reference[SHORT]


def test_in_flight_step_in_an_executor_is_waited_for_not_failed(llm, reference):
    # The FastAPI pattern: next() runs in a worker thread. Cancel, then start the
    # next call at once, while the worker's decode may still be running.
    stream = llm(LONG_PROMPT, stream=True, config=llm.config.replace(max_tokens=8))
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(next, stream, None)
        wait_until(lambda: stream.state is StreamState.RUNNING)
        llm.cancel()
        started = time.monotonic()
        response = llm(SHORT)
        assert response.text == reference[SHORT]
        assert future.result(30) is None  # the old step ended cleanly
    assert time.monotonic() - started < 30
    assert list(stream) == []


def test_an_abort_is_not_reported_as_an_error(model_path):
    # llama.cpp logs an aborted decode at ERROR level; the shim files it under DEBUG, so a
    # cancel neither spams stderr through logging's last-resort handler nor waits for the GIL.
    import subprocess
    import sys

    code = ("import cyllama_cffi as c\n"
            f"m = c.LlamaModel({str(model_path)!r}); ctx = c.LlamaContext(m, n_ctx=64); b = c.LlamaBatch(8)\n"
            "b.set_tokens([1, 2, 3], 0); ctx.cancel = True\n"
            "try:\n    ctx.decode(b)\nexcept c.DecodeAborted:\n    print('aborted')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "aborted"
    assert result.stderr == ""
