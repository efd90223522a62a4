"""``Stream`` around a stand-in generation: its states, finish reasons, stats and closing.

The generation is a plain Python generator; the cancellation is a stand-in with the two methods
the stream calls (``is_requested`` and ``interrupt``); the clock is a counter.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from cyllama_cffi import stream as stream_module
from cyllama_cffi.errors import ClosedError
from cyllama_cffi.response import FinishReason
from cyllama_cffi.stream import Stream, StreamState


class FakeCancellation:
    def __init__(self) -> None:
        self.requested = False
        self.interrupts = 0

    def is_requested(self) -> bool:
        return self.requested

    def interrupt(self) -> None:
        self.interrupts += 1


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(stream_module, "time", fake)
    return fake


class Generation:
    """Yields ``chunks``, one generated token each, then ends with ``reason`` (or raises ``error``)."""

    def __init__(self, chunks, reason=FinishReason.STOP, error=None, clock=None, prompt_at=None):
        self.chunks, self.reason, self.error, self.clock, self.prompt_at = chunks, reason, error, clock, prompt_at
        self.progress = SimpleNamespace(generated=[], prompt_done_at=0.0)
        self.cleaned_up = False

    def steps(self):
        try:
            if self.prompt_at is not None:
                self.progress.prompt_done_at = self.prompt_at
            for index, chunk in enumerate(self.chunks):
                self.progress.generated.append(1000 + index)
                if self.clock is not None:
                    self.clock.now += 1.0
                yield chunk
            if self.error is not None:
                raise self.error
            return self.reason
        finally:
            self.cleaned_up = True


def make(generation: Generation, prompt_tokens: int = 4, on_token=None):
    cancellation = FakeCancellation()
    finished = []
    stream = Stream(generation.steps(), generation.progress, cancellation, prompt_tokens, on_token, finished.append)
    return stream, cancellation, finished


def test_a_stream_runs_from_ready_to_finished():
    generation = Generation(["Hel", "lo", "!"])
    stream, cancellation, finished = make(generation, prompt_tokens=7)
    assert stream.state is StreamState.READY and stream.finish_reason is None
    assert repr(stream) == "<Stream ready, 0 tokens>"
    assert iter(stream) is stream
    assert next(stream) == "Hel"
    assert stream.state is StreamState.RUNNING and stream.generated == [1000]
    assert list(stream) == ["lo", "!"]
    assert stream.state is StreamState.FINISHED and stream.finish_reason is FinishReason.STOP
    assert finished == [stream] and generation.cleaned_up
    assert stream.stats.prompt_tokens == 7 and stream.stats.generated_tokens == 3
    assert repr(stream) == "<Stream finished stop, 3 tokens>"
    assert stream.generated is generation.progress.generated
    with pytest.raises(StopIteration):
        next(stream)
    assert finished == [stream] and cancellation.interrupts == 0  # finishing happens once


def test_the_generation_s_return_value_is_the_finish_reason():
    stream, _, _ = make(Generation(["a"], reason=FinishReason.LENGTH))
    assert list(stream) == ["a"] and stream.finish_reason is FinishReason.LENGTH


def test_stats_are_measured_from_the_clock(clock):
    generation = Generation(["a", "b", "c", "d"], clock=clock, prompt_at=102.0)
    stream, _, _ = make(generation)  # created at 100.0; the prompt is done at 102.0
    clock.now = 102.0
    assert "".join(stream) == "abcd"  # each chunk advances the clock by one second: ends at 106.0
    stats = stream.stats
    assert (stats.total_time, stats.prompt_time, stats.generation_time) == (6.0, 2.0, 4.0)
    assert stats.tokens_per_second == 1.0 and stats.generated_tokens == 4


def test_a_stream_ended_before_its_prompt_was_done_has_no_generation_time(clock):
    stream, _, _ = make(Generation([]))
    clock.now = 103.0
    assert list(stream) == []
    stats = stream.stats
    assert (stats.total_time, stats.prompt_time, stats.generation_time, stats.tokens_per_second) == (3.0, 3.0, 0.0, 0.0)


def test_on_token_sees_each_chunk_before_it_is_returned():
    seen = []
    stream, _, _ = make(Generation(["x", "y"]), on_token=lambda chunk: seen.append((chunk, list(stream.generated))))
    assert next(stream) == "x" and seen == [("x", [1000])]
    assert list(stream) == ["y"] and seen == [("x", [1000]), ("y", [1000, 1001])]


def test_an_error_in_the_generation_reaches_the_consumer_and_ends_the_stream():
    stream, _, finished = make(Generation(["a"], error=OSError("disk on fire")))
    assert next(stream) == "a"
    with pytest.raises(OSError, match="disk on fire"):
        next(stream)
    assert stream.state is StreamState.FINISHED and stream.finish_reason is FinishReason.ERROR
    assert finished == [stream] and stream.stats.generated_tokens == 1
    with pytest.raises(StopIteration):
        next(stream)


def test_a_closed_llm_ends_the_stream_quietly_as_cancelled():
    stream, _, finished = make(Generation(["a"], error=ClosedError("the LLM was closed")))
    assert list(stream) == ["a"]
    assert stream.finish_reason is FinishReason.CANCELLED and finished == [stream]


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, SystemExit])
def test_a_stopped_consumer_cancels_the_stream_and_the_interruption_goes_on(interruption):
    stream, _, finished = make(Generation([], error=interruption()))
    with pytest.raises(interruption):
        next(stream)
    assert stream.finish_reason is FinishReason.CANCELLED and finished == [stream]


def test_close_interrupts_ends_the_generation_and_finishes_once():
    generation = Generation(["a", "b", "c"])
    stream, cancellation, finished = make(generation)
    assert next(stream) == "a"
    stream.close()
    assert cancellation.interrupts == 1 and generation.cleaned_up
    assert stream.state is StreamState.FINISHED and stream.finish_reason is FinishReason.CANCELLED
    assert finished == [stream] and stream.stats.generated_tokens == 1
    with pytest.raises(StopIteration):
        next(stream)
    stream.close()
    assert cancellation.interrupts == 1 and finished == [stream]


def test_close_before_the_first_chunk():
    generation = Generation(["a"])
    stream, cancellation, finished = make(generation)
    stream.close()
    assert stream.finish_reason is FinishReason.CANCELLED and finished == [stream]
    assert cancellation.interrupts == 1 and stream.generated == []
    assert list(stream) == []


def test_close_after_the_end_changes_nothing():
    stream, cancellation, finished = make(Generation(["a"]))
    assert list(stream) == ["a"]
    stream.close()
    assert stream.finish_reason is FinishReason.STOP and cancellation.interrupts == 0 and finished == [stream]


def test_the_with_block_closes_the_stream():
    generation = Generation(["a", "b"])
    stream, _, _ = make(generation)
    with stream as entered:
        assert entered is stream
        assert next(stream) == "a"
    assert stream.finish_reason is FinishReason.CANCELLED and generation.cleaned_up


def test_close_from_another_thread_waits_for_the_running_step():
    """The decode of the running step is interrupted, the step returns, then the stream ends."""
    in_step, release = threading.Event(), threading.Event()

    def steps():
        yield "first"
        in_step.set()
        assert release.wait(10), "close() never interrupted the step"
        yield "second"
        yield "never"
        return FinishReason.STOP

    progress = SimpleNamespace(generated=[], prompt_done_at=0.0)
    cancellation = FakeCancellation()
    cancellation.interrupt = release.set  # what the C abort flag does to a running decode
    finished = []
    stream = Stream(steps(), progress, cancellation, 1, None, finished.append)
    assert next(stream) == "first"
    got = []
    consumer = threading.Thread(target=lambda: got.append(next(stream)))
    consumer.start()
    assert in_step.wait(10)
    stream.close()
    consumer.join(10)
    assert got == ["second"]  # the step in flight completed; nothing after it ran
    assert stream.finish_reason is FinishReason.CANCELLED and finished == [stream]
    assert list(stream) == []


def test_whether_the_stream_holds_its_llm_against_a_new_call():
    stream, cancellation, _ = make(Generation(["a", "b"]))
    here = threading.current_thread()
    assert not stream._holds_llm_against(here)  # its own consumer calls again: it has left the stream

    done = threading.Event()
    release = threading.Event()

    def consume_one_then_wait():
        next(stream)
        done.set()
        release.wait(10)

    consumer = threading.Thread(target=consume_one_then_wait)
    consumer.start()
    try:
        assert done.wait(10)
        assert stream._holds_llm_against(here)  # another live thread is consuming it
        cancellation.requested = True
        assert not stream._holds_llm_against(here)  # a cancel was asked for
        cancellation.requested = False
    finally:
        release.set()
        consumer.join(10)
    assert not stream._holds_llm_against(here)  # its consumer is gone
    stream.close()
    assert not stream._holds_llm_against(threading.Thread())


def test_stream_states_are_the_three_documented():
    assert [(s.name, s.value) for s in StreamState] == [("READY", "ready"), ("RUNNING", "running"),
                                                        ("FINISHED", "finished")]
