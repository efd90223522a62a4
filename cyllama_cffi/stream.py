"""``Stream``: one generation, as an iterator of text chunks.

``llm(prompt, stream=True)`` and ``llm.stream(prompt)`` return one. It owns the LLM's context
while it runs; it lets go when it ends, when it is closed, when its consumer stops (``break``,
an exception, a dropped reference, a dead thread) and a new call on the LLM comes, never later.
"""

from __future__ import annotations

import enum
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Generator, Iterator, List, Optional

from .errors import ClosedError
from .response import FinishReason, GenerationStats

if TYPE_CHECKING:
    from ._cancel import Cancellation
    from ._generation import Progress
    from ._logprobs import TokenLogprob

__all__ = ["Stream", "StreamState", "TokenCallback"]

TokenCallback = Callable[[str], Any]


class StreamState(enum.Enum):
    """Where a stream is in its life: the one state it has."""

    READY = "ready"        # created; nothing decoded yet
    RUNNING = "running"    # the prompt or the tokens are being produced
    FINISHED = "finished"  # ended: ``finish_reason`` says why, ``stats`` are final


class Stream(Iterator[str]):
    """An iterator of text chunks; also a context manager that closes it.

    Made by ``LLM.stream()`` / ``llm(prompt, stream=True)``, not constructed directly.
    ``finish_reason`` (a :class:`FinishReason`) and ``stats`` are set when it ends; the LLM's
    ``last_finish_reason``/``last_stats`` show the same. ``generated`` lists the token ids
    produced so far; with ``GenerationConfig(logprobs=n)``, ``logprobs`` has a
    :class:`~cyllama_cffi.TokenLogprob` for each of them (None when not asked for). ``on_token``
    (if given) is called with each chunk before it is returned.
    """

    def __init__(self, steps: Generator[str, None, FinishReason], progress: "Progress",
                 cancellation: "Cancellation", prompt_tokens: int, on_token: Optional[TokenCallback],
                 on_finish: Callable[["Stream"], None]) -> None:
        self._steps = steps
        self._progress = progress
        self._cancellation = cancellation
        self._on_token = on_token
        self._on_finish = on_finish
        self._step_lock = threading.Lock()  # held while the generation computes its next chunk
        self._thread = threading.current_thread()  # the consumer: who created or last stepped it
        self._stepping: Optional[threading.Thread] = None  # the thread inside __next__ now, if any
        self._t_start = time.perf_counter()
        self.state = StreamState.READY
        self.finish_reason: Optional[FinishReason] = None
        self.stats = GenerationStats(prompt_tokens=prompt_tokens)

    @property
    def generated(self) -> List[int]:
        """Token ids generated so far (the end-of-generation token is not included; the tokens of a
        matched stop sequence are)."""
        return self._progress.generated

    @property
    def logprobs(self) -> Optional[List["TokenLogprob"]]:
        """One :class:`~cyllama_cffi.TokenLogprob` per token of ``generated``, growing as chunks are
        yielded; None unless the config asked for ``logprobs``."""
        return self._progress.logprobs

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        with self._step_lock:
            if self.state is StreamState.FINISHED:
                raise StopIteration
            self.state = StreamState.RUNNING
            self._thread = self._stepping = threading.current_thread()
            try:
                chunk = next(self._steps)
            except StopIteration as end:
                self._finish(end.value)
                raise StopIteration from None
            except ClosedError:  # the LLM was closed under us (close() elsewhere, interpreter exit)
                self._finish(FinishReason.CANCELLED)
                raise StopIteration from None
            except Exception:
                self._finish(FinishReason.ERROR)
                raise
            except BaseException:  # KeyboardInterrupt, SystemExit: the consumer was stopped
                self._finish(FinishReason.CANCELLED)
                raise
            finally:
                self._stepping = None
        if self._on_token is not None:
            self._on_token(chunk)
        return chunk

    def close(self) -> None:
        """End this stream now (``finish_reason`` "cancelled"); the LLM is free at once.

        From any thread: a decode running for it stops at its next graph node. From a signal
        handler that interrupted this stream's own step, it only stops the step's decode (the
        step then ends the stream); ``LLM.cancel()`` is the call made for signal handlers.
        """
        if self.state is StreamState.FINISHED:
            return
        self._cancellation.interrupt()
        if self._stepping is threading.current_thread():
            # A signal handler interrupting this stream's own step: waiting for the step lock
            # would wait for ourselves. The C flag set above ends the step's decode instead.
            return
        with self._step_lock:
            if self.state is not StreamState.FINISHED:
                self._steps.close()  # its sampler is freed; the next generation settles the KV cache
                self._finish(FinishReason.CANCELLED)

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        reason = f" {self.finish_reason}" if self.finish_reason is not None else ""
        return f"<Stream {self.state.value}{reason}, {len(self.generated)} tokens>"

    def _holds_llm_against(self, thread: threading.Thread) -> bool:
        """Whether a new call on the LLM from ``thread`` must wait for this stream (it may not).

        A stream holds its LLM only while it can still be consumed by someone else: not
        finished, no cancel requested, and its consumer is another thread that is alive. The
        consumer's own thread calling again has left it (or it would not be calling).
        """
        if self.state is StreamState.FINISHED or self._cancellation.is_requested():
            return False
        return self._thread is not thread and self._thread.is_alive()

    def _supersede(self) -> None:
        """A new call takes the LLM: end this stream and wait for its step to return."""
        self.close()

    def _finish(self, reason: FinishReason) -> None:
        self.state = StreamState.FINISHED
        self.finish_reason = reason
        now = time.perf_counter()
        prompt_done = self._progress.prompt_done_at or now
        stats = self.stats
        stats.generated_tokens = len(self._progress.generated)
        stats.total_time = now - self._t_start
        stats.prompt_time = prompt_done - self._t_start
        stats.generation_time = now - prompt_done
        stats.tokens_per_second = (stats.generated_tokens / stats.generation_time
                                   if stats.generation_time > 0 else 0.0)
        self._on_finish(self)
