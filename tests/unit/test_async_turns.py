"""AsyncLLM's turn-taking and cancel routing, over a stand-in LLM (no model, no compiled module).

What the real-model tests in tests/test_async.py cannot show on every interpreter of the fast
tier: an AsyncLLM made outside any event loop works in ``asyncio.run`` (on Python 3.9 an
``asyncio.Lock`` binds to a loop when it is made), calls take turns in order, and a cancel
reaches only the generation of the call that was cancelled.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from cyllama_cffi import aio
from cyllama_cffi.response import FinishReason, GenerationStats


class FakeStream:
    """Chunks ``"<prompt><i> "`` every few milliseconds until ``max_tokens`` or a cancel; with the
    prompt ``"stall"``, one chunk and then none until a cancel."""

    def __init__(self, llm: "FakeLLM", prompt: str, max_tokens: int) -> None:
        self.llm, self.prompt, self.max_tokens = llm, prompt, max_tokens
        self.stats = GenerationStats()
        self.finish_reason = None
        self.logprobs = None  # as a Stream's without GenerationConfig(logprobs=n)
        self.count = 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self.finish_reason is None:
            stalled = self.prompt == "stall" and self.count > 0
            self.llm.cancelled.wait(None if stalled else 0.005)  # the "decode" of one token, which a cancel interrupts
            if self.llm.cancelled.is_set():
                self._finish(FinishReason.CANCELLED)
            elif self.count >= self.max_tokens:
                self._finish(FinishReason.LENGTH)
        if self.finish_reason is not None:
            raise StopIteration
        self.count += 1
        return f"{self.prompt}{self.count} "

    def close(self) -> None:
        if self.finish_reason is None:
            self._finish(FinishReason.CANCELLED)

    def _finish(self, reason: FinishReason) -> None:
        self.finish_reason = self.llm.last_finish_reason = reason

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class FakeLLM:
    model_name = "fake"

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.last_finish_reason = None
        self.last_stats = None
        self.started = []  # prompts, in the order their generations started

    def stream(self, prompt: str, config) -> FakeStream:
        self.cancelled.clear()  # as LLM.stream: a generation forgets earlier cancels
        self.started.append(prompt)
        return FakeStream(self, prompt, config.max_tokens)

    def cancel(self) -> None:
        self.cancelled.set()

    def close(self) -> None:
        pass


@pytest.fixture
def llm(monkeypatch):
    monkeypatch.setattr(aio, "_load", lambda *args: FakeLLM)
    instance = aio.AsyncLLM("fake.gguf", max_tokens=3)  # made outside any event loop
    yield instance
    asyncio.run(instance.close())


def test_calls_take_turns_in_order(llm):
    async def main():
        return await asyncio.gather(llm("a"), llm("b"), llm("c", max_tokens=2))

    results = asyncio.run(main())
    assert [r.text for r in results] == ["a1 a2 a3 ", "b1 b2 b3 ", "c1 c2 "]
    assert llm._loading.result().started == ["a", "b", "c"]


def test_a_cancel_reaches_only_the_cancelled_calls_generation(llm):
    async def main():
        fake = await llm._llm()
        running = asyncio.ensure_future(llm("run", max_tokens=10**6))
        waiting = asyncio.ensure_future(llm("wait"))
        while not fake.started:
            await asyncio.sleep(0.001)
        waiting.cancel()  # still waiting for its turn
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert not fake.cancelled.is_set() and not running.done()
        cancelled_at = time.perf_counter()
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert time.perf_counter() - cancelled_at < 1.0
        assert llm.last_finish_reason == "cancelled"
        assert (await llm("next")).text == "next1 next2 next3 "
        assert fake.started == ["run", "next"]  # the call cancelled in the queue never ran

    asyncio.run(main())


def test_the_streams_timeout_and_a_call_from_the_task_that_left_a_stream(llm):
    async def main():
        chunks = []
        with pytest.raises(asyncio.TimeoutError):  # 1 s for the first chunk; the second never comes
            async for chunk in llm.stream("stall", timeout=1.0, max_tokens=10**6):
                chunks.append(chunk)
        assert chunks == ["stall1 "]  # the generation ran, and the timeout cancelled it
        assert llm.last_finish_reason == "cancelled"
        stream = llm.stream("s", max_tokens=10**6)
        async for _ in stream:
            break  # the generator stays suspended: it is still referenced
        assert (await llm("n")).text == "n1 n2 n3 "  # the same task calls: the stream is over
        assert [chunk async for chunk in stream] == []

    asyncio.run(main())


def test_closed(llm):
    asyncio.run(llm.close())
    with pytest.raises(aio.ClosedError):
        asyncio.run(llm("x"))
