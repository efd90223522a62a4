"""``AsyncLLM`` and the async helpers: an :class:`~cyllama_cffi.LLM` driven from asyncio.

Every blocking step (the model load, tokenizing, the prompt's prefill, each token) runs on one
thread of the ``AsyncLLM``'s own; the event loop only receives the chunks, handed over with
``loop.call_soon_threadsafe``, so it never waits for a decode or a lock. Calls on one
``AsyncLLM`` take turns (an ``asyncio.Lock``, first come first served).

Stopping is real: when the awaiting task is cancelled, ``asyncio.wait_for`` times out, a
stream's ``timeout`` expires, or an ``async for`` is left early (``break``, ``aclose()``, the
generator collected), ``LLM.cancel()`` is called, the C flag stops even a running prefill, and
the generation ends within milliseconds; the next call starts at once. (Running the sync
``LLM`` under ``asyncio.to_thread`` cancels only the awaiting side: the thread generates on to
``max_tokens`` and keeps the model busy meanwhile.)
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import os
import threading
import weakref
from pathlib import Path
from typing import Any, AsyncIterator, Callable, List, Mapping, Optional, Sequence, Union

from ._background import Inbox
from ._lora import parse_lora
from .config import GenerationConfig
from .errors import ClosedError
from .response import FinishReason, GenerationStats, Response

__all__ = ["AsyncLLM", "complete_async", "chat_async", "stream_complete_async"]

Messages = Sequence[Mapping[str, str]]
_END = object()  # posted after a stream's last chunk


class _Worker:
    """The thread an ``AsyncLLM`` does all its blocking work on: calls run one at a time, in order.

    One thread, not a pool: an ``LLM`` lets a stream be stepped only by the thread that started
    it (or it raises ``LLMBusyError``), and ggml keeps an OpenMP pool per decoding thread. A
    daemon, like the prefill helper; at interpreter exit a running generation is cancelled and
    the thread joined (see ``_stop_workers_at_exit``).
    """

    def __init__(self) -> None:
        self._calls = Inbox()  # of (future, call), or None to stop
        self._thread = threading.Thread(target=_serve, args=(self._calls,), name="cyllama-async", daemon=True)
        self._thread.start()
        self.loading: Optional["concurrent.futures.Future[Any]"] = None  # the LLM, once loaded
        _live_workers.add(self)

    def submit(self, call: Callable[[], Any]) -> "concurrent.futures.Future[Any]":
        """Queue ``call``; its future, cancelled before it starts, skips it."""
        future: "concurrent.futures.Future[Any]" = concurrent.futures.Future()
        self._calls.put((future, call))
        return future

    def stop(self) -> None:
        """End the thread after the calls already queued (never blocks)."""
        self._calls.put(None)

    def stop_at_exit(self) -> None:
        """Interpreter exit: cancel the running generation, skip the queued calls, end the thread."""
        llm = _loaded(self.loading) if self.loading is not None else None
        if llm is not None:
            llm.cancel()
        self.stop()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


# Every AsyncLLM's worker, for the exit hook below.
_live_workers: "weakref.WeakSet[_Worker]" = weakref.WeakSet()
_exiting = False


def _stop_workers_at_exit() -> None:
    """End every worker thread before the interpreter is torn down.

    A daemon thread still inside llama.cpp when the interpreter finalizes (a model load calls
    back into Python for its progress) is killed at its next attempt to run Python, in the
    middle of C++ code, and takes the process down: a program that made an ``AsyncLLM`` and
    ended while its model loaded could crash on exit. So the exit cancels running generations,
    skips queued calls, and waits for each thread to return from llama.cpp (a load finishes;
    a decode stops at its next graph node).
    """
    global _exiting
    _exiting = True
    workers = list(_live_workers)
    for worker in workers:
        worker.stop_at_exit()
    for worker in workers:
        worker.join(timeout=60.0)


atexit.register(_stop_workers_at_exit)


def _serve(calls: Inbox) -> None:
    while True:
        item = calls.get()
        if item is None:
            return
        future, call = item
        del item
        if _exiting:
            future.cancel()
        elif future.set_running_or_notify_cancel():
            try:
                result = call()
            except BaseException as error:  # handed to the awaiting task
                future.set_exception(error)
            else:
                future.set_result(result)
            result = None
        del future, call  # hold nothing (a model, a stream) while idle


class _Call:
    """A call's hold on its ``AsyncLLM``'s turn, and what it runs on the worker (by calling it)."""

    consumer: Optional["asyncio.Task[Any]"] = None  # the task iterating it, for a stream

    def __init__(self, run: Callable[[], Any]) -> None:
        self._run = run
        self.holds_turn = False

    def __call__(self) -> Any:  # on the worker
        return self._run()

    def cancel(self) -> None:
        """Nothing to stop: a short call (a context reset) ends on its own."""


class _Generation(_Call):
    """One call's generation, run on the worker by calling it; cancelled from the loop, never blocking.

    ``start`` makes the :class:`~cyllama_cffi.Stream` (on the worker: tokenizing a long prompt
    takes time too); ``on_chunk`` receives each chunk there, then ``_END``; without it the
    chunks are joined into the returned :class:`Response`.
    """

    def __init__(self, llm: Any, start: Callable[[], Any], on_chunk: Optional[Callable[[Any], None]] = None) -> None:
        super().__init__(start)
        self._llm = llm
        self._on_chunk = on_chunk
        self._started = False
        self._ended = False
        self._cancelled = False

    def __call__(self) -> Optional[Response]:  # on the worker
        self._started = True
        try:
            if self._cancelled:
                return None
            stream = self._run()
            with stream:  # however this ends, the stream is closed and the LLM free
                # cancel() sees _started and calls LLM.cancel(); one that came before the stream's
                # start was cleared by it (a generation forgets earlier cancels), so look again.
                if self._cancelled:
                    stream.close()
                pieces: List[str] = []
                for chunk in stream:
                    if self._on_chunk is None:
                        pieces.append(chunk)
                    else:
                        self._on_chunk(chunk)
            return Response("".join(pieces), stream.stats, stream.finish_reason or FinishReason.STOP,
                            self._llm.model_name, logprobs=stream.logprobs)
        finally:
            self._ended = True
            if self._on_chunk is not None:
                try:
                    self._on_chunk(_END)
                except RuntimeError:  # the consumer's loop is closed: nobody is waiting for the end
                    pass

    def cancel(self) -> None:
        """Stop it: skipped if not started, else ``LLM.cancel()`` (the C flag: even a running prefill stops)."""
        self._cancelled = True  # before _started is read: see __call__
        if self._started and not self._ended:
            self._llm.cancel()


async def _settled(done: "concurrent.futures.Future[Any]") -> None:
    """Wait for a worker call to end, whatever its outcome; being cancelled again stops only the wait."""
    if done.done():
        return
    waiter = asyncio.wrap_future(done)
    waiter.add_done_callback(_retrieve)
    await asyncio.wait([waiter])  # asyncio.wait never cancels what it waits for


def _retrieve(future: "asyncio.Future[Any]") -> None:
    """Mark an outcome nobody reads as read (no "exception was never retrieved" log)."""
    if not future.cancelled():
        future.exception()


class AsyncLLM:
    """An :class:`~cyllama_cffi.LLM` for asyncio, whose cancellations stop the generation.

    ``AsyncLLM(model_path, config=None, verbose=False, **overrides)``: the arguments of
    ``LLM``. The model loads on the ``AsyncLLM``'s own thread while the constructor returns;
    ``async with`` (or the first call) waits for it and raises its error (``FileNotFoundError``,
    ``InvalidGGUFError``...). A bad config value raises at once.

    Calls take turns in the order they come. Cancelling a call, in any way, ends its generation
    within milliseconds (``last_finish_reason`` is ``"cancelled"``) and lets the next one run.
    """

    def __init__(self, model_path: Union[str, "os.PathLike[str]"], config: Optional[GenerationConfig] = None,
                 verbose: bool = False, lora: Any = None, **overrides: Any) -> None:
        base = config if config is not None else GenerationConfig()
        if not isinstance(base, GenerationConfig):
            raise TypeError(f"config must be a GenerationConfig, got {type(base).__name__}")
        self._config = base.replace(**overrides)
        parse_lora(lora)  # a bad form raises here; a bad file when the model has loaded
        self._model_path = str(Path(os.fspath(model_path)).expanduser())  # what LLM.model_path will say
        self._worker = _Worker()
        self._loading = self._worker.loading = self._worker.submit(_load(model_path, self._config, verbose, lora))
        self._lock: Optional[asyncio.Lock] = None
        self._lock_loop: Optional[asyncio.AbstractEventLoop] = None
        self._current: Optional[_Call] = None  # the call whose turn it is
        self._load_waiter: Optional["asyncio.Future[Any]"] = None  # see _llm
        self._load_waiter_loop: Optional[asyncio.AbstractEventLoop] = None
        self._closed = False
        # Dropped without close(): free the model on its thread, then end the thread.
        self._finalizer = weakref.finalize(self, _shut_down, self._worker, self._loading)

    # -- properties -------------------------------------------------------------------------------
    @property
    def config(self) -> GenerationConfig:
        """The configuration calls start from (their arguments override it)."""
        return self._config

    @property
    def model_path(self) -> str:
        return self._model_path

    @property
    def last_finish_reason(self) -> Optional[FinishReason]:
        """How the last generation ended (``"cancelled"`` after any cancellation); None before any."""
        llm = _loaded(self._loading)
        return llm.last_finish_reason if llm is not None else None

    @property
    def last_stats(self) -> Optional[GenerationStats]:
        """The stats of the last generation; None before any."""
        llm = _loaded(self._loading)
        return llm.last_stats if llm is not None else None

    # -- generation -------------------------------------------------------------------------------
    async def __call__(self, prompt: Any, config: Optional[GenerationConfig] = None, **overrides: Any) -> Response:
        """Generate from ``prompt`` (text or token ids): a :class:`~cyllama_cffi.Response`."""
        config = self._call_config(config, overrides)
        llm = await self._llm()
        return await self._run(_Generation(llm, lambda: llm.stream(prompt, config)))

    async def generate(self, prompt: Any, config: Optional[GenerationConfig] = None, **overrides: Any) -> Response:
        """The same as awaiting the ``AsyncLLM`` called."""
        return await self(prompt, config, **overrides)

    async def generate_with_stats(self, prompt: Any, config: Optional[GenerationConfig] = None,
                                  **overrides: Any) -> Response:
        """The same as :meth:`generate`: every ``Response`` carries its ``stats``."""
        return await self(prompt, config, **overrides)

    async def chat(self, messages: Messages, config: Optional[GenerationConfig] = None,
                   template: Optional[str] = None) -> Response:
        """Answer chat ``messages`` (dicts with ``role`` and ``content``), as ``LLM.chat`` renders them."""
        config = self._call_config(config, {})
        llm = await self._llm()
        return await self._run(_Generation(llm, lambda: llm.chat(messages, config, stream=True, template=template)))

    def stream(self, prompt: Any, config: Optional[GenerationConfig] = None, timeout: Optional[float] = None,
               **overrides: Any) -> AsyncIterator[str]:
        """The chunks of a generation, as an async iterator.

        ``timeout``: the most seconds to wait for each chunk; past it ``asyncio.TimeoutError``
        is raised and the generation ends. Leaving the ``async for`` early ends it too.
        """
        config = self._call_config(config, overrides)
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be None or a number of seconds > 0, got {timeout!r}")
        return self._stream(lambda llm: llm.stream(prompt, config), timeout)

    def get_chat_template(self, template_name: Optional[str] = None) -> str:
        """The model's chat template (``""`` if none); waits for the model if it is still loading."""
        return self._loading.result().get_chat_template(template_name)

    async def set_lora(self, lora: Any) -> None:
        """:meth:`LLM.set_lora <cyllama_cffi.LLM.set_lora>`, in turn with the calls before it."""
        parse_lora(lora)
        llm = await self._llm()
        await self._run(_Call(lambda: llm.set_lora(lora)))

    # -- lifetime ---------------------------------------------------------------------------------
    async def reset_context(self) -> None:
        """Drop the context (its KV cache); the next call makes a fresh one."""
        llm = await self._llm()
        await self._run(_Call(lambda: _reset(llm)))

    async def close(self) -> None:
        """Free the model, ending a running generation first; calls waiting their turn raise ``ClosedError``.

        Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        if self._current is not None:
            self._current.cancel()
        self._finalizer.detach()
        await _settled(self._worker.submit(lambda: _close_loaded(self._loading)))
        self._worker.stop()

    async def __aenter__(self) -> "AsyncLLM":
        try:
            await self._llm()
        except BaseException:  # no __aexit__ follows: end the thread now
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = " closed" if self._closed else "" if self._loading.done() else " loading"
        return f"<AsyncLLM {os.path.basename(self._model_path)}{state}>"

    # -- machinery --------------------------------------------------------------------------------
    def _call_config(self, config: Optional[GenerationConfig], overrides: Mapping[str, Any]) -> GenerationConfig:
        base = config if config is not None else self._config
        if not isinstance(base, GenerationConfig):
            raise TypeError(f"config must be a GenerationConfig, got {type(base).__name__}")
        return base.replace(**overrides) if overrides else base

    async def _llm(self) -> Any:
        """The loaded ``LLM`` (waiting for the load without blocking the loop)."""
        if self._closed:
            raise ClosedError("this AsyncLLM is closed")
        # Every call of a loop waits on the same asyncio future, even once the load is done:
        # its state changes only between the loop's steps, so calls leave it in the order they
        # came and take their turns in that order. (Asking the worker's future directly, a call
        # made just after the load finished could overtake calls that were waiting for it.)
        loop = asyncio.get_running_loop()
        if self._load_waiter is None or self._load_waiter_loop is not loop:
            self._load_waiter = asyncio.wrap_future(self._loading)
            self._load_waiter.add_done_callback(_retrieve)
            self._load_waiter_loop = loop
        if not self._load_waiter.done():
            await asyncio.wait([self._load_waiter])  # a cancel here must not cancel the load itself
        return self._loading.result()

    def _turn_lock(self) -> asyncio.Lock:
        # Made in the running loop: on Python 3.9 an asyncio.Lock binds to a loop when created.
        loop = asyncio.get_running_loop()
        if self._lock is None or (self._lock_loop is not loop and not self._lock.locked()):
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    async def _take_turn(self, call: _Call) -> None:
        current = self._current
        if current is not None and current.consumer is not None and current.consumer is asyncio.current_task():
            # This task left a stream of its own (a break, on an interpreter that collects it
            # later) and calls again: that stream is over, as a new call from its thread ends a
            # sync LLM's. Waiting for it would wait for ourselves.
            current.cancel()
            self._end_turn(current)
        lock = self._turn_lock()
        await lock.acquire()  # a cancel while waiting here touches nobody's generation
        if self._closed:
            lock.release()
            raise ClosedError("this AsyncLLM is closed")
        call.holds_turn = True
        self._current = call

    def _end_turn(self, call: _Call) -> None:
        if call.holds_turn:
            call.holds_turn = False
            if self._current is call:
                self._current = None
            assert self._lock is not None
            self._lock.release()

    async def _run(self, call: _Call) -> Any:
        """Take a turn and run ``call`` on the worker; a cancel ends it, then re-raises."""
        await self._take_turn(call)
        try:
            done = self._worker.submit(call)
            try:
                return await asyncio.wrap_future(done)  # a cancel here also skips it if not started
            except asyncio.CancelledError:
                call.cancel()
                await _settled(done)  # milliseconds: then last_finish_reason says "cancelled"
                raise
        finally:
            self._end_turn(call)

    async def _stream(self, start: Callable[[Any], Any], timeout: Optional[float]) -> AsyncIterator[str]:
        llm = await self._llm()
        loop = asyncio.get_running_loop()
        chunks: "asyncio.Queue[Any]" = asyncio.Queue()

        def post(item: Any) -> None:  # on the worker
            loop.call_soon_threadsafe(chunks.put_nowait, item)  # RuntimeError once the loop is closed: ends it

        generation = _Generation(llm, lambda: start(llm), post)
        generation.consumer = asyncio.current_task()
        await self._take_turn(generation)
        done = self._worker.submit(generation)
        try:
            while True:
                waiting = chunks.get()
                item = await (waiting if timeout is None else asyncio.wait_for(waiting, timeout))
                if item is _END:
                    break
                yield item
                if not generation.holds_turn:  # its consumer called again meanwhile: it was ended
                    break
                generation.consumer = asyncio.current_task()  # whoever resumed us consumes it now
            await asyncio.wrap_future(done)  # an exception of the generation is raised here
        finally:
            if not done.done():  # left early: break, aclose(), a cancel, the timeout
                done.cancel()
                generation.cancel()
                await _settled(done)
            self._end_turn(generation)


def _load(model_path: Any, config: GenerationConfig, verbose: bool, lora: Any = None) -> Callable[[], Any]:
    def load() -> Any:
        from .llm import LLM  # here: importing the package stays free of the compiled module

        return LLM(model_path, config=config, verbose=verbose, lora=lora)

    return load


def _reset(llm: Any) -> None:
    # LLM.reset_context() where this version has it; else the same by hand.
    llm.reset_context() if hasattr(llm, "reset_context") else llm._close_context()


def _loaded(loading: "concurrent.futures.Future[Any]") -> Any:
    """The LLM if it has loaded, else None; never waits."""
    if loading.done() and not loading.cancelled() and loading.exception() is None:
        return loading.result()
    return None


def _close_loaded(loading: "concurrent.futures.Future[Any]") -> None:
    llm = _loaded(loading)
    if llm is not None:
        llm._release()  # the model too: the AsyncLLM is done with it


def _shut_down(worker: _Worker, loading: "concurrent.futures.Future[Any]") -> None:
    """An AsyncLLM was dropped unclosed: free its model on its own thread, then end the thread."""
    worker.submit(lambda: _close_loaded(loading))
    worker.stop()


# -- one-off helpers --------------------------------------------------------------------------------
async def complete_async(prompt: Any, model_path: Union[str, "os.PathLike[str]"],
                         config: Optional[GenerationConfig] = None, verbose: bool = False,
                         **overrides: Any) -> Response:
    """Load the model, generate from ``prompt``, free the model. For repeated calls keep an :class:`AsyncLLM`."""
    async with AsyncLLM(model_path, config, verbose, **overrides) as llm:
        return await llm(prompt)


async def chat_async(messages: Messages, model_path: Union[str, "os.PathLike[str]"],
                     config: Optional[GenerationConfig] = None, verbose: bool = False,
                     template: Optional[str] = None, **overrides: Any) -> Response:
    """Load the model, answer ``messages``, free the model."""
    async with AsyncLLM(model_path, config, verbose, **overrides) as llm:
        return await llm.chat(messages, template=template)


async def stream_complete_async(prompt: Any, model_path: Union[str, "os.PathLike[str]"],
                                config: Optional[GenerationConfig] = None, verbose: bool = False,
                                **overrides: Any) -> AsyncIterator[str]:
    """Load the model, yield the chunks of a generation from ``prompt``, free the model."""
    async with AsyncLLM(model_path, config, verbose, **overrides) as llm:
        async for chunk in llm.stream(prompt):
            yield chunk
