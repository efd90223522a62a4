"""AsyncLLM: the sync LLM's results, calls taking turns, and cancellations that really stop.

Every cancellation route (the awaiting task cancelled, ``asyncio.wait_for`` timing out, the
stream's ``timeout``, leaving an ``async for`` by ``break``, ``aclose()`` or dropping it) must
end the generation within milliseconds, in the middle of a ~4,000-token prefill or of the
tokens, where running on would take minutes on a loaded machine; the next call then runs at
once and generates what a fresh LLM does. Plain ``asyncio.run``: no plugin.
"""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from cyllama_cffi import LLM, AsyncLLM, FinishReason, complete_async
from cyllama_cffi.aio import stream_complete_async

SHORT = "The capital of France is"
PROMPT = "Once upon a time, in a land far away,"
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 400  # ~4,000 tokens: a prefill of many seconds
LONG = dict(max_tokens=100000, n_ctx=8192)  # would run for minutes if not stopped
STOP_BOUND = 0.5  # seconds from a cancellation to the generation's end
FOLLOW_UP_BOUND = 300  # a follow-up that had to wait for max_tokens would take far longer; fail, don't hang


@pytest.fixture(scope="module")
def reference(model_path):
    """Greedy outputs of a fresh sync LLM."""
    with LLM(model_path, temperature=0.0, max_tokens=12) as fresh:
        return {SHORT: fresh(SHORT).text, PROMPT: fresh(PROMPT).text,
                "short4": fresh(SHORT, config=fresh.config.replace(max_tokens=4)).text}


def new_llm(model_path) -> AsyncLLM:
    return AsyncLLM(model_path, temperature=0.0, max_tokens=12)


async def until(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


def running_stream(allm):
    """The sync Stream the AsyncLLM's worker is running, if any."""
    llm = allm._loading.result()
    return llm._owner() if llm._owner is not None else None


def in_prefill(allm):
    stream = running_stream(allm)
    return stream is not None and stream.state.value == "running" and not stream.generated


def in_tokens(allm, n=3):
    stream = running_stream(allm)
    return stream is not None and len(stream.generated) >= n


async def warm_up(allm):
    """Make the context the long runs use, so that they start their prefill at once."""
    await allm("Hi", max_tokens=1, n_ctx=8192)


def assert_stopped(allm, cancelled_at, phase, n_prompt=None):
    """The generation ended "cancelled", soon after ``cancelled_at``, in the middle of ``phase``."""
    llm = allm._loading.result()
    assert allm.last_finish_reason == FinishReason.CANCELLED == "cancelled"
    latency = llm.last_finished_at - cancelled_at
    assert -0.01 < latency < STOP_BOUND, f"the generation ended {latency:.3f} s after the cancel"
    stats = allm.last_stats
    if phase == "prefill":
        assert stats.generated_tokens == 0
        assert stats.prompt_tokens == n_prompt > 3500
        llm._seq.settle()  # the chunk's decode may still be returning on its helper
        assert len(llm._seq.tokens) < n_prompt  # the prompt was not all decoded
    else:
        assert 0 < stats.generated_tokens < 2000
    return latency


async def follow_up_matches_fresh(allm, reference):
    response = await asyncio.wait_for(allm(SHORT), FOLLOW_UP_BOUND)
    assert response == reference[SHORT] and response.finish_reason in ("stop", "length")


# -- results and turns ------------------------------------------------------------------------------

def test_results_equal_the_sync_llm(model_path, reference):
    async def main():
        async with new_llm(model_path) as llm:
            response = await llm(SHORT)
            assert response.text == reference[SHORT] and response.finish_reason == "length"
            assert (await llm.generate(PROMPT)).text == reference[PROMPT]
            with_stats = await llm.generate_with_stats(SHORT)
            assert with_stats.text == reference[SHORT] and with_stats.stats.prompt_tokens > 0
            assert with_stats.stats.generated_tokens == 12 and with_stats.finish_reason == "length"
            assert "".join([chunk async for chunk in llm.stream(PROMPT)]) == reference[PROMPT]
            assert (await llm(SHORT, max_tokens=4)).text == reference["short4"]  # kwargs override the config
            assert (await llm(SHORT, config=llm.config.replace(max_tokens=4))).text == reference["short4"]
            assert llm.config.max_tokens == 12 and llm.model_path == str(model_path)
            assert llm.last_finish_reason == "length"

    asyncio.run(main())


def test_bad_arguments_raise_at_the_call(model_path):
    llm = new_llm(model_path)
    with pytest.raises(TypeError, match="unknown GenerationConfig field"):
        llm.stream(SHORT, max_tokenz=3)
    with pytest.raises(ValueError, match="timeout"):
        llm.stream(SHORT, timeout=0)
    with pytest.raises(ValueError, match="Invalid GenerationConfig"):
        AsyncLLM(model_path, max_tokens=-1)
    asyncio.run(llm.close())


def test_queued_calls_run_in_order(model_path, reference):
    async def main():
        async with new_llm(model_path) as llm:
            finished = []

            async def call(name, prompt):
                text = (await llm(prompt)).text
                finished.append(name)
                return text

            async def stream(name, prompt):
                text = "".join([chunk async for chunk in llm.stream(prompt)])
                finished.append(name)
                return text

            results = await asyncio.gather(call("a", SHORT), stream("b", PROMPT), call("c", PROMPT),
                                           stream("d", SHORT))
            assert finished == ["a", "b", "c", "d"]  # first come, first served; none refused
            assert results == [reference[SHORT], reference[PROMPT], reference[PROMPT], reference[SHORT]]

    asyncio.run(main())


def test_a_cancel_while_waiting_for_the_turn_touches_nobody_elses_generation(model_path, reference):
    async def main():
        async with new_llm(model_path) as llm:
            first = asyncio.ensure_future(llm(PROMPT))
            second = asyncio.ensure_future(llm(SHORT))
            await until(lambda: in_tokens(llm, 1))
            second.cancel()  # still waiting for its turn
            with pytest.raises(asyncio.CancelledError):
                await second
            assert (await first).text == reference[PROMPT] and first.result().finish_reason == "length"
            await follow_up_matches_fresh(llm, reference)

    asyncio.run(main())


# -- every way of cancelling stops the generation -----------------------------------------------------

@pytest.mark.parametrize("phase", ["prefill", "tokens"])
@pytest.mark.parametrize("kind", ["call", "stream"])
def test_cancelling_the_awaiting_task(model_path, reference, kind, phase):
    async def main():
        async with new_llm(model_path) as llm:
            await warm_up(llm)
            prompt = LONG_PROMPT if phase == "prefill" else PROMPT
            chunks = []

            async def consume():
                async for chunk in llm.stream(prompt, **LONG):
                    chunks.append(chunk)

            task = asyncio.ensure_future(llm(prompt, **LONG) if kind == "call" else consume())
            await until(lambda: (in_prefill if phase == "prefill" else in_tokens)(llm))
            n_prompt = running_stream(llm).stats.prompt_tokens
            cancelled_at = time.perf_counter()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert time.perf_counter() - cancelled_at < STOP_BOUND
            assert_stopped(llm, cancelled_at, phase, n_prompt)
            await follow_up_matches_fresh(llm, reference)

    asyncio.run(main())


@pytest.mark.parametrize("phase", ["prefill", "tokens"])
@pytest.mark.parametrize("kind", ["call", "stream"])
def test_wait_for_timing_out(model_path, reference, kind, phase):
    async def main():
        async with new_llm(model_path) as llm:
            await warm_up(llm)
            prompt = LONG_PROMPT if phase == "prefill" else PROMPT

            async def consume():
                return [chunk async for chunk in llm.stream(prompt, **LONG)]

            task = asyncio.ensure_future(llm(prompt, **LONG) if kind == "call" else consume())
            await until(lambda: (in_prefill if phase == "prefill" else in_tokens)(llm))
            n_prompt = running_stream(llm).stats.prompt_tokens
            timeout = 0.2
            deadline = time.perf_counter() + timeout
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(task, timeout)
            assert time.perf_counter() - deadline < STOP_BOUND
            assert_stopped(llm, deadline, phase, n_prompt)
            await follow_up_matches_fresh(llm, reference)

    asyncio.run(main())


def slow_token_after(llm, n_prompt, tokens):
    """A Python abort callback making the decode of generated token ``tokens`` take up to 120 s,
    polling the C flag as ggml does between graph nodes: a stand-in for a slow model."""
    ctx = llm._seq.ctx
    stalled = threading.Event()

    def callback():
        if len(llm._seq.tokens) >= n_prompt + tokens and not stalled.is_set():
            stalled.set()
            deadline = time.monotonic() + 120
            while not ctx.cancel and time.monotonic() < deadline:
                time.sleep(0.001)
        return ctx.cancel

    ctx.set_abort_callback(callback)
    return stalled


@pytest.mark.parametrize("phase", ["prefill", "tokens"])
def test_the_streams_timeout(model_path, reference, phase):
    async def main():
        async with new_llm(model_path) as llm:
            await warm_up(llm)
            sync = llm._loading.result()
            prompt = LONG_PROMPT if phase == "prefill" else PROMPT
            n_prompt = len(sync.tokenize(prompt))
            stalled = slow_token_after(sync, n_prompt, 3) if phase == "tokens" else None
            timeout = 1.0
            chunks = []
            waiting_since = time.perf_counter()
            try:
                with pytest.raises(asyncio.TimeoutError):
                    async for chunk in llm.stream(prompt, timeout=timeout, **LONG):
                        chunks.append(chunk)
                        waiting_since = time.perf_counter()  # the wait for the next chunk starts after this
                raised_at = time.perf_counter()
            finally:
                sync._seq.ctx.set_abort_callback(None)
            timed_out_at = waiting_since + timeout  # at the earliest
            if phase == "prefill":
                assert chunks == []
            else:
                assert stalled.is_set() and 1 <= len(chunks) <= 4
            assert raised_at - timed_out_at < STOP_BOUND
            assert_stopped(llm, timed_out_at, phase, n_prompt)
            await follow_up_matches_fresh(llm, reference)

    asyncio.run(main())


@pytest.mark.parametrize("how", ["aclose", "garbage"])
def test_leaving_an_async_for_early(model_path, reference, how):
    async def main():
        async with new_llm(model_path) as llm:
            sync = llm._loading.result()
            stream = llm.stream(PROMPT, **LONG)
            count = 0
            async for _ in stream:
                count += 1
                if count == 3:
                    break
            left_at = time.perf_counter()
            if how == "aclose":
                await stream.aclose()
                assert time.perf_counter() - left_at < STOP_BOUND
            else:
                del stream
                gc.collect()  # at once on CPython; PyPy collects when asked
                await until(lambda: sync.last_finished_at is not None and sync.last_finished_at > left_at)
            assert_stopped(llm, left_at, "tokens")
            await follow_up_matches_fresh(llm, reference)

    asyncio.run(main())


def test_a_new_call_from_the_task_that_left_a_stream_ends_it(model_path, reference):
    """A break keeps a generator that is still referenced suspended (and, on PyPy, one that is
    not, until it is collected): the task calling again has left it, so the call ends it and
    runs at once, as a sync LLM's call does for a stream its thread left."""

    async def main():
        async with new_llm(model_path) as llm:
            stream = llm.stream(PROMPT, **LONG)
            count = 0
            async for _ in stream:
                count += 1
                if count == 3:
                    left = running_stream(llm)
                    break
            called_at = time.perf_counter()
            assert (await llm(SHORT)).text == reference[SHORT]  # from this task (wait_for would make another)
            assert left.finish_reason == "cancelled" and 3 <= left.stats.generated_tokens < 2000
            assert left._t_start + left.stats.total_time - called_at < STOP_BOUND
            assert [chunk async for chunk in stream] == []  # resumed, it just ends

    asyncio.run(main())


def test_a_stream_left_by_break_is_cancelled_when_collected(model_path, reference):
    async def main():
        async with new_llm(model_path) as llm:
            sync = llm._loading.result()
            count = 0
            async for _ in llm.stream(PROMPT, **LONG):
                count += 1
                if count == 3:
                    break
            left_at = time.perf_counter()
            gc.collect()  # CPython finalized the generator already; PyPy does now
            await until(lambda: sync.last_finished_at is not None and sync.last_finished_at > left_at)
            assert_stopped(llm, left_at, "tokens")
            await follow_up_matches_fresh(llm, reference)

    asyncio.run(main())


# A loop that waited for the decode would stall for a whole micro-batch of the long prompt:
# seconds on 2 cores. The loop's own worst tick is a few ms to ~60 ms there (the OS scheduler
# sharing the cores with the decode's threads, PyPy's garbage collector); the bound sits between.
STALL_BOUND = 0.200


def test_the_event_loop_never_stalls_during_a_long_prefill(model_path):
    lateness = []

    async def main():
        async with new_llm(model_path) as llm:
            await warm_up(llm)
            stop = asyncio.Event()

            async def ticker():
                while not stop.is_set():
                    before = time.perf_counter()
                    await asyncio.sleep(0.001)
                    lateness.append(time.perf_counter() - before - 0.001)

            ticking = asyncio.ensure_future(ticker())
            task = asyncio.ensure_future(llm(LONG_PROMPT, **LONG))
            await until(lambda: in_prefill(llm))
            lateness.clear()  # measure the prefill only
            started = time.perf_counter()
            while time.perf_counter() - started < 1.5:
                await asyncio.sleep(0.01)
            assert in_prefill(llm)  # all of it measured while the prompt was decoding
            task.cancel()
            stop.set()
            await ticking
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    worst = max(lateness)
    print(f"\nlongest event-loop stall during the prefill: {worst * 1000:.2f} ms over {len(lateness)} ticks")
    assert worst < STALL_BOUND, f"the event loop stalled {worst * 1000:.1f} ms"


# -- errors and closing ---------------------------------------------------------------------------------

def test_an_exception_in_the_generation_reaches_the_awaiting_task(model_path, reference):
    class Broken(Exception):
        pass

    async def main():
        async with new_llm(model_path) as llm:
            sync = llm._loading.result()
            with pytest.raises(ValueError, match="prompt is empty"):  # raised on the worker
                await llm("")
            with pytest.raises(ValueError, match="prompt is empty"):
                [chunk async for chunk in llm.stream("")]
            real = sync.vocab.piece_bytes
            calls = []

            def piece_bytes(token):
                calls.append(token)
                if len(calls) == 3:
                    raise Broken("from the token loop")
                return real(token)

            sync.vocab.piece_bytes = piece_bytes
            try:
                with pytest.raises(Broken):
                    await llm(PROMPT)
                assert llm.last_finish_reason == "error"
                calls.clear()
                chunks = []
                with pytest.raises(Broken):
                    async for chunk in llm.stream(PROMPT):
                        chunks.append(chunk)
                assert len(chunks) <= 2 and llm.last_finish_reason == "error"
            finally:
                del sync.vocab.piece_bytes
            await follow_up_matches_fresh(llm, reference)

    asyncio.run(main())


def test_a_bad_model_path_raises_at_async_with(tmp_path):
    llm = AsyncLLM(tmp_path / "missing.gguf")  # the load runs on the AsyncLLM's thread

    async def main():
        with pytest.raises(FileNotFoundError):
            async with llm:
                pass

    asyncio.run(main())
    llm._worker._thread.join(10)
    assert not llm._worker._thread.is_alive()  # a failed async with ends the AsyncLLM's thread


def test_close_while_a_generation_runs_cancels_it(model_path):
    async def main():
        llm = new_llm(model_path)
        await warm_up(llm)
        task = asyncio.ensure_future(llm(LONG_PROMPT, **LONG))
        waiting = asyncio.ensure_future(llm(SHORT))
        await until(lambda: in_prefill(llm))
        closed_at = time.perf_counter()
        await llm.close()
        assert time.perf_counter() - closed_at < 5.0  # the prefill alone would take minutes
        response = await task  # its caller gets what was generated: nothing, cancelled
        assert response.finish_reason == "cancelled" and response.text == ""
        with pytest.raises(Exception, match="closed"):
            await waiting
        with pytest.raises(Exception, match="closed"):
            await llm(SHORT)
        await llm.close()  # idempotent
        llm._worker._thread.join(10)
        assert not llm._worker._thread.is_alive()  # the AsyncLLM's thread ended with it

    asyncio.run(main())


def test_reset_context(model_path, reference):
    async def main():
        async with new_llm(model_path) as llm:
            assert (await llm(SHORT)).text == reference[SHORT]
            await llm.reset_context()
            assert llm._loading.result()._seq is None
            assert (await llm(SHORT)).text == reference[SHORT]

    asyncio.run(main())


def test_chat_equals_the_sync_llm(model_path):
    messages = [{"role": "user", "content": "What is the capital of France?"}]

    async def main():
        with LLM(model_path, temperature=0.0, max_tokens=12) as sync:
            expected = sync.chat(messages).text
            template = sync.get_chat_template()
        async with new_llm(model_path) as llm:
            assert (await llm.chat(messages)).text == expected
            assert llm.get_chat_template() == template

    asyncio.run(main())


def test_module_level_helpers(model_path, reference):
    async def main():
        response = await complete_async(SHORT, model_path, temperature=0.0, max_tokens=12)
        assert response.text == reference[SHORT]
        chunks = [chunk async for chunk in stream_complete_async(PROMPT, model_path, temperature=0.0,
                                                                  max_tokens=12)]
        assert "".join(chunks) == reference[PROMPT]

    before = set(threading.enumerate())
    asyncio.run(main())
    threads = [t for t in set(threading.enumerate()) - before if t.name == "cyllama-async"]
    for thread in threads:
        thread.join(10)
    assert not [t for t in threads if t.is_alive()]  # each helper closed its AsyncLLM and its thread


def test_chat_async(model_path):
    from cyllama_cffi import chat_async

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with LLM(model_path, temperature=0.0, max_tokens=12) as sync:
        expected = sync.chat(messages).text
    response = asyncio.run(chat_async(messages, model_path, temperature=0.0, max_tokens=12))
    assert response.text == expected


def test_interpreter_exit_waits_for_a_model_still_loading(tmp_path, model_path):
    """A program that ends while an AsyncLLM's model loads exits cleanly.

    Without the exit hook, the C library's exit handlers ran while the worker thread was still
    inside llama.cpp's model load, which then read freed ggml state: a segfault in a few percent
    of runs. The hook joins the worker first; the check is that no worker thread is alive by the
    time the last exit callback runs (registered first, it runs last).
    """
    script = tmp_path / "exit_while_loading.py"
    script.write_text(textwrap.dedent(f"""
        import atexit, threading
        atexit.register(lambda: print("alive at exit:",
                                      [t.name for t in threading.enumerate() if t.name == "cyllama-async"]))
        from cyllama_cffi import AsyncLLM
        llm = AsyncLLM({str(model_path)!r}, max_tokens=8)
    """))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    for _ in range(3):
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 0, result.stderr
        assert "alive at exit: []" in result.stdout
