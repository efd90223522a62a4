"""``LLM``: the high-level generation API with two-layer cancellation.

Cancellation (``llm.cancel()``, any thread, idempotent) sets a
``threading.Event`` polled once per token in the generation loop *and* the C
abort flag of the context, which ggml polls once per graph node inside
``llama_decode``, so a long prefill stops at its next graph node. The prompt is
also fed in ``n_ubatch`` chunks with an Event check between chunks, so it
works on backends that ignore abort callbacks too; each chunk is decoded on a
helper thread (see ``_Stream._prefill``), so a cancel ends the stream at once
even while a long graph node runs. A cancelled generation
yields what it produced, ends with ``finish_reason == "cancelled"`` and
leaves the LLM ready for the next call, whose start clears the flags.

Concurrency model: one generation at a time per ``LLM``. No lock is held
while a stream is suspended at ``yield``; a stream holds only its own
``step lock`` while it computes the next chunk. A new call waits for the
in-flight step (and prefill chunk) of a finished/cancelled/closed stream (at
most one graph node after a cancel) and takes over; a *live* stream makes the new call raise
``RuntimeError``. A superseded stream ends cleanly when resumed.
"""

from __future__ import annotations

import gc
import os
import threading
import time
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

from ._ffi import ffi
from ._logging import set_verbose
from .background import BackgroundDecode, DecodeWorker
from .batch import LlamaBatch
from .config import GenerationConfig
from .context import LlamaContext, usable_cores
from .errors import ClosedError, DecodeAborted
from .gguf_check import check_model_path
from .huge_pages import mmap_by_default
from .model import LlamaModel
from .response import GenerationStats, Response
from .sampler import LlamaSampler
from .sigint import SigintHandle
from .sigint import install_sigint_handler as _install_sigint_handler
from .streaming import TextAssembler


TokenCallback = Callable[[str], Any]
Prompt = Union[str, Sequence[int]]  # text, or token ids decoded as given

# Model-level settings: changing them needs a new model, not just a new context.
_MODEL_FIELDS = ("n_gpu_layers", "main_gpu", "split_mode", "tensor_split")


class LLM:
    """A model ready to generate text.

    ``LLM(model_path, config=None, verbose=False, **overrides)``: fields in
    ``overrides`` replace those of ``config`` (unknown names raise
    ``TypeError``). The path is checked before llama.cpp sees it.
    """

    def __init__(self, model_path: Union[str, "os.PathLike[str]"], config: Optional[GenerationConfig] = None,
                 verbose: bool = False, **overrides: Any) -> None:
        base = config if config is not None else GenerationConfig()
        if not isinstance(base, GenerationConfig):
            raise TypeError(f"config must be a GenerationConfig, got {type(base).__name__}")
        self.config = base.replace(**overrides) if overrides else base.replace()
        self.model_path = str(check_model_path(model_path))
        self.verbose = verbose
        if verbose:
            set_verbose(True)
        cfg = self.config
        use_mmap = cfg.use_mmap if cfg.use_mmap is not None else mmap_by_default(os.path.getsize(self.model_path))
        self.model = LlamaModel(self.model_path, n_gpu_layers=cfg.n_gpu_layers, main_gpu=cfg.main_gpu,
                                split_mode=cfg.split_mode, tensor_split=cfg.tensor_split, use_mmap=use_mmap)
        self.vocab = self.model.vocab
        self._ctx: Optional[LlamaContext] = None
        self._ctx_key: Any = None
        self._batch: Optional[LlamaBatch] = None
        self._kv_tokens: List[int] = []  # tokens whose K/V are in the cache, in order
        self._cancel_event = threading.Event()
        self._prefill_wake: Optional[threading.Event] = None  # a prefill chunk's waiter, see _Stream._prefill
        self._state_lock = threading.Lock()
        self._active: Optional["weakref.ReferenceType[_Stream]"] = None
        self._sigint_watchers = 0
        self._cancel_machinery = True  # only bench/ turns this off, to measure what it costs
        self._closed = False
        self.last_stats: Optional[GenerationStats] = None
        self.last_finish_reason: Optional[str] = None
        self.last_finished_at: Optional[float] = None  # time.perf_counter() when the last generation ended

    # -- cancellation -----------------------------------------------------------------
    def cancel(self) -> None:
        """Stop the running generation soon (between tokens or inside ``llama_decode``).

        Safe from any thread and from signal handlers; idempotent and cheap.
        A cancel with nothing running is forgotten when the next generation starts.
        """
        ctx = self._ctx
        if ctx is not None:  # the C flag first: a running decode stops at its next graph node
            try:
                ctx.cancel = True
            except ClosedError:  # the context was being replaced or closed: nothing runs on it
                pass
        self._cancel_event.set()
        wake = self._prefill_wake
        if wake is not None:  # a stream waiting for a prefill chunk returns now, the chunk stops on its own
            wake.set()

    @property
    def cancel_requested(self) -> bool:
        """True from ``cancel()`` until the next generation starts."""
        return self._cancel_event.is_set()

    def install_sigint_handler(self) -> SigintHandle:
        """Make Ctrl-C call ``cancel()``, interrupting even a running prefill.

        Main thread only. Returns a handle: ``restore()`` it (or use it as a
        context manager) to put the previous handler back.
        """
        handle = _install_sigint_handler(self.cancel, on_restore=self._sigint_unwatch)
        self._sigint_watchers += 1
        if self._ctx is not None:
            self._ctx.watch_sigint(True)
        return handle

    def _sigint_unwatch(self) -> None:
        self._sigint_watchers = max(0, self._sigint_watchers - 1)
        ctx = self._ctx
        if ctx is not None and self._sigint_watchers == 0:
            try:
                ctx.watch_sigint(False)
            except ClosedError:  # closed meanwhile: nothing left to watch
                pass

    # -- generation -----------------------------------------------------------------------
    def __call__(self, prompt: Prompt, config: Optional[GenerationConfig] = None, stream: bool = False,
                 on_token: Optional[TokenCallback] = None) -> Union[Response, Iterator[str]]:
        """Generate from ``prompt``: a ``Response``, or with ``stream=True`` an iterator of text chunks.

        ``prompt`` is text, or a sequence of token ids (e.g. from ``tokenize()``) decoded as given.
        """
        generation = self._start(prompt, config or self.config, on_token)
        if stream:
            return generation
        text = "".join(generation)
        return Response(text, generation.stats, generation.finish_reason or "stop", self.model_name)

    def generate(self, prompt: Prompt, config: Optional[GenerationConfig] = None, **kwargs: Any):
        return self(prompt, config=config, **kwargs)

    def stream(self, prompt: Prompt, config: Optional[GenerationConfig] = None,
               on_token: Optional[TokenCallback] = None) -> "_Stream":
        return self._start(prompt, config or self.config, on_token)

    @property
    def model_name(self) -> str:
        return os.path.basename(self.model_path)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> List[int]:
        return self.vocab.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.vocab.detokenize(tokens)

    def format_chat(self, messages: Sequence[Dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Apply the model's built-in chat template (llama.cpp's template engine)."""
        from ._ffi import ffi, lib

        template = self.model.chat_template()
        if template is None:
            raise ValueError("this model has no built-in chat template")
        keep = []
        array = ffi.new("struct llama_chat_message[]", len(messages))
        for index, message in enumerate(messages):
            role = ffi.new("char[]", message["role"].encode("utf-8"))
            content = ffi.new("char[]", message["content"].encode("utf-8"))
            keep += [role, content]
            array[index].role = role
            array[index].content = content
        encoded_template = template.encode("utf-8")
        size = 256 + 2 * sum(len(m["content"]) + len(m["role"]) for m in messages)
        while True:
            buffer = ffi.new("char[]", size)
            length = lib.llama_chat_apply_template(encoded_template, array, len(messages),
                                                   add_generation_prompt, buffer, size)
            if length < 0:
                raise ValueError("llama.cpp does not support this model's chat template")
            if length <= size:
                return ffi.buffer(buffer, length)[:].decode("utf-8", "replace")
            size = length

    def _start(self, prompt: Prompt, config: GenerationConfig, on_token: Optional[TokenCallback]) -> "_Stream":
        if self._closed:
            raise ClosedError("this LLM is closed")
        if not isinstance(config, GenerationConfig):
            raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
        changed = [name for name in _MODEL_FIELDS if getattr(config, name) != getattr(self.config, name)]
        if changed:
            raise ValueError(f"{', '.join(changed)} can only be set when the LLM is created")
        tokens = self._prompt_tokens(prompt, config)
        self._claim()
        try:
            ctx = self._context_for(len(tokens), config)
            ctx.begin_generation()
            self._cancel_event.clear()
            stream = _Stream(self, ctx, tokens, config, on_token)
            self._active = weakref.ref(stream)
            return stream
        except BaseException:
            self._release(None)
            raise

    def _prompt_tokens(self, prompt: Prompt, config: GenerationConfig) -> List[int]:
        """The prompt as checked token ids: text is tokenized, a sequence of ids is range-checked.

        Ids are checked here because llama.cpp aborts the process for some out-of-range ids
        (sampling and detokenizing them) and only rejects others inside ``llama_decode``.
        Token prompts are decoded as given: no BOS is added (``add_bos`` applies to text).
        """
        if isinstance(prompt, str):
            if prompt == "":
                raise ValueError("the prompt is empty; give at least one character of text")
            tokens = self.vocab.tokenize(prompt, add_special=config.add_bos, parse_special=config.parse_special)
            if not tokens:
                raise ValueError("the prompt tokenizes to no tokens")
            return tokens
        if isinstance(prompt, (bytes, bytearray, memoryview, dict)) or not hasattr(prompt, "__iter__"):
            raise TypeError(f"prompt must be a str or a sequence of token ids, got {type(prompt).__name__}")
        tokens = []
        for token in prompt:
            # bool is an int subclass, numpy integers are not: accept what index() accepts, but no bools.
            if isinstance(token, bool) or not hasattr(token, "__index__"):
                raise TypeError(f"token ids must be integers, got {type(token).__name__}")
            tokens.append(token.__index__())
        if not tokens:
            raise ValueError("the prompt is empty; give at least one token id")
        self.vocab.check_tokens(tokens)
        return tokens

    # -- ownership of the context ------------------------------------------------------------
    def _claim(self) -> None:
        """Become the generation that owns the context, or raise if a live one does."""
        collected = False
        while True:
            with self._state_lock:
                current = self._active() if self._active is not None else None
                if current is None:
                    self._active = _claiming_ref
                    return
                if current is _CLAIMING:
                    raise RuntimeError("another generation is starting on this LLM in another thread")
                live = current._live
                if not live:
                    current._superseded = True  # if resumed, it ends without touching the context
            if live:
                del current
                if not collected:
                    # An abandoned stream may only be waiting for the garbage collector (PyPy).
                    gc.collect()
                    collected = True
                    continue
                raise RuntimeError("another generation is still running on this LLM: exhaust it, close() it "
                                   "or cancel() first (one LLM generates one stream at a time)")
            # Finished, cancelled or closed: wait for its in-flight step, if any, to return.
            with current._step_lock:
                pass
            current._await_running_chunk()
            with self._state_lock:
                if self._active is not None and self._active() is current:
                    self._active = None
            del current

    def _release(self, stream: Optional["_Stream"]) -> None:
        with self._state_lock:
            current = self._active() if self._active is not None else None
            if current is stream or current is _CLAIMING:
                self._active = None

    def _context_for(self, n_prompt: int, config: GenerationConfig) -> LlamaContext:
        if config.n_ctx is not None:
            n_ctx = config.n_ctx
        else:  # room for prompt + max_tokens, in steps of 256, at most the trained context
            wanted = n_prompt + max(config.max_tokens, 1)
            n_ctx = -(-wanted // 256) * 256
            if self.model.n_ctx_train > 0:
                n_ctx = min(n_ctx, self.model.n_ctx_train)
        if n_prompt >= n_ctx:
            raise ValueError(f"the prompt has {n_prompt} tokens but the context holds {n_ctx}; "
                             "shorten the prompt or raise n_ctx")
        n_threads = config.n_threads or usable_cores()
        key = (config.n_batch, config.n_ubatch, n_threads)
        ctx = self._ctx
        if ctx is not None and (self._ctx_key != key or ctx.n_ctx < n_ctx
                                or (config.n_ctx is not None and ctx.n_ctx != n_ctx)):
            ctx.close()
            ctx = self._ctx = None
            self._kv_tokens = []
        if ctx is None:
            ctx = LlamaContext(self.model, n_ctx=n_ctx, n_batch=config.n_batch, n_ubatch=config.n_ubatch,
                               n_threads=n_threads)
            ctx.watch_sigint(self._sigint_watchers > 0)
            if not self._cancel_machinery:
                ctx._remove_abort_callback()
            self._ctx, self._ctx_key = ctx, key
            self._kv_tokens = []
            if self._batch is None or self._batch.capacity < ctx.n_batch:
                if self._batch is not None:  # no live stream uses it (_claim): free it now, not at GC
                    self._batch.close()
                self._batch = LlamaBatch(ctx.n_batch)
        return ctx

    # -- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the context and the model. Idempotent; a running generation is cancelled first."""
        if self._closed:
            return
        self._closed = True
        self.cancel()
        stream = self._active() if self._active is not None else None
        if isinstance(stream, _Stream):
            with stream._step_lock:
                stream._superseded = True
            stream._await_running_chunk()
        if self._batch is not None:
            self._batch.close()
        self.model.close()  # closes the context first
        self._ctx = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<LLM {self.model_name}{' closed' if self._closed else ''}>"


class _Claiming:
    """Placeholder owner while a new generation sets itself up."""

    _live = True


_CLAIMING = _Claiming()


def _claiming_ref() -> _Claiming:
    return _CLAIMING


def _build_sampler(config: GenerationConfig, n_vocab: int) -> LlamaSampler:
    sampler = LlamaSampler()
    seed = None if config.seed is None or config.seed < 0 else config.seed
    if config.repeat_penalty != 1.0 or config.frequency_penalty or config.presence_penalty:
        sampler.add_penalties(config.penalty_last_n, config.repeat_penalty, config.frequency_penalty,
                              config.presence_penalty)
    if config.temperature <= 0:
        return sampler.add_greedy()
    if config.mirostat == 1:
        return sampler.add_temp(config.temperature).add_mirostat(n_vocab, config.mirostat_tau,
                                                                 config.mirostat_eta, seed=seed)
    if config.mirostat == 2:
        return sampler.add_temp(config.temperature).add_mirostat_v2(config.mirostat_tau, config.mirostat_eta,
                                                                    seed=seed)
    if config.top_k > 0:
        sampler.add_top_k(config.top_k)
    if config.top_p < 1.0:
        sampler.add_top_p(config.top_p)
    if config.min_p > 0.0:
        sampler.add_min_p(config.min_p)
    return sampler.add_temp(config.temperature).add_dist(seed)


class _Stream:
    """One generation: an iterator of text chunks that owns the LLM's context while live."""

    def __init__(self, llm: LLM, ctx: LlamaContext, prompt_tokens: List[int], config: GenerationConfig,
                 on_token: Optional[TokenCallback]) -> None:
        self._llm = llm
        self._ctx = ctx
        self._batch = llm._batch
        self._prompt = prompt_tokens
        self._config = config
        self._on_token = on_token
        self._sampler = _build_sampler(config, llm.vocab.n_tokens)
        self._assembler = TextAssembler(config.stop_sequences)
        self._step_lock = threading.Lock()
        self._started = False
        self._done = False
        self._closing = False
        self._superseded = False
        self._pending: List[str] = []
        self.generated: List[int] = []
        self.finish_reason: Optional[str] = None
        self.stats = GenerationStats(prompt_tokens=len(prompt_tokens))
        self._t_start = time.perf_counter()
        self._t_prompt_done = 0.0
        self._prefilled = False
        self._steps: Optional[Iterator[None]] = None
        self._running_chunk: Optional[BackgroundDecode] = None  # a prefill chunk this stream stopped waiting for
        self._running_thread: Optional[threading.Thread] = None  # the thread that decodes it

    @property
    def _live(self) -> bool:
        """Still owns the LLM: not finished, not closed, not cancelled."""
        return not (self._done or self._closing or self._superseded or self._llm._cancel_event.is_set())

    def __iter__(self) -> "_Stream":
        return self

    def __next__(self) -> str:
        with self._step_lock:
            if self._running_chunk is not None and not self._done:
                self._await_running_chunk()  # after an exception left a prefill chunk running
            while not self._pending:
                if self._done:
                    raise StopIteration
                if self._superseded or self._closing:
                    self._finish("cancelled", flush=not self._superseded)
                    continue
                try:
                    if self._steps is None:
                        self._start_steps()
                    else:
                        next(self._steps, None)  # runs the loop to its next pause
                except BaseException as error:
                    self._steps = None  # a retry starts a new loop from the state as it is now
                    if not isinstance(error, ClosedError):
                        raise
                    self._finish("cancelled")  # closed under us (LLM.close() elsewhere, interpreter exit)
            chunk = self._pending.pop(0)
        if self._on_token is not None:
            self._on_token(chunk)
        return chunk

    def close(self) -> None:
        """Stop this stream; the LLM is free for the next call at once."""
        self._closing = True
        llm = self._llm
        if not self._done and llm._active is not None and llm._active() is self:
            try:
                self._ctx.cancel = True  # an in-flight decode in another thread stops now
            except ClosedError:  # the LLM was closed: nothing is running on the context
                pass
            wake = llm._prefill_wake
            if wake is not None:
                wake.set()
        with self._step_lock:
            if not self._done:
                self._finish("cancelled", flush=False)

    def __enter__(self) -> "_Stream":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- the generation loop ------------------------------------------------------------------
    def _start_steps(self) -> None:
        """Prefill (once), then make the token loop that ``__next__`` resumes.

        Also the way back after an exception escaped a step (a ``ContextBusyError``, a
        ``KeyboardInterrupt`` raised when a decode had returned but before its tokens were put on
        record): the KV cache is cut back to what ``LLM._kv_tokens`` records, and the prefill or
        the token loop carries on from there, so nothing is decoded, sampled or emitted twice.
        """
        if self._started:  # a retry: the KV cache may hold a decode that is not on record
            self._ctx.memory_seq_rm(0, len(self._llm._kv_tokens), -1)
        if not self._prefilled and not self._prefill():
            return
        self._steps = self._token_loop()

    def _token_loop(self) -> Iterator[None]:
        """Sample and decode, pausing whenever there is text to emit; every exit finishes.

        A generator, so that what each token needs is looked up once per generation and
        stays in local variables between tokens. The Python part of a token runs right after
        a decode has streamed the weights through the CPU caches, where each attribute lookup
        and method call is a cache miss: measured in the default model's greedy stream, ~60 us
        a token (1 % of it) with a method per step, against ~15 us for the bare C calls.
        """
        llm = self._llm
        ctx = self._ctx
        vocab = llm.vocab
        is_cancelled = llm._cancel_event.is_set
        check_cancel = llm._cancel_machinery
        batch = self._batch
        sample = self._sampler.sample
        # A greedy-only chain picks the next token in the decode's own C call (the chain's
        # accept() is a no-op for it); other chains sample after the decode.
        argmax_out = ffi.new("int32_t *") if self._sampler._greedy_only else None
        chosen = -1  # the next token when the decode already picked it
        eog = vocab._eog  # is_eog() and piece_bytes() memoise here; their dicts, inlined
        pieces = vocab._pieces
        assembler = self._assembler
        feed = assembler.feed
        pending = self._pending
        generated = self.generated
        kv_tokens = llm._kv_tokens
        decode_token = ctx.decode_token
        max_tokens = self._config.max_tokens
        # llama.cpp may round the context up; an explicit n_ctx is the user's limit.
        n_ctx = min(ctx.n_ctx, self._config.n_ctx or ctx.n_ctx)
        # kv_tokens is the prompt plus every generated token decoded so far; a generated token
        # beyond it was emitted by a loop an exception ended before its decode: decoded first.
        undecoded = len(generated) - (len(kv_tokens) - len(self._prompt))
        token = generated[-1] if undecoded > 0 else None
        while True:
            if token is None:
                if check_cancel and (is_cancelled() or self._closing):
                    self._finish("cancelled")
                    return
                if len(generated) >= max_tokens:
                    self._finish("length")
                    return
                token = chosen if chosen >= 0 else sample(ctx)
                is_end = eog.get(token)
                if is_end is None:
                    is_end = vocab.is_eog(token)  # first time this token is seen
                if is_end:
                    self._finish("stop")
                    return
                generated.append(token)
                piece = pieces.get(token)
                text = feed(piece if piece is not None else vocab.piece_bytes(token))
                if text:
                    pending.append(text)
                if assembler.stopped:
                    self._finish("stop")
                    return
                if len(kv_tokens) >= n_ctx or len(generated) >= max_tokens:
                    self._finish("length")
                    return
                if pending:
                    # The text goes out before its token's decode: the first chunk follows the
                    # prefill at once, and a consumer that stops here pays for no extra decode.
                    yield
                    if check_cancel and (is_cancelled() or self._closing):
                        self._finish("cancelled")
                        return
            try:
                decode_token(batch, token, len(kv_tokens), argmax_out)
            except DecodeAborted as aborted:
                del kv_tokens[aborted.n_past:]
                self._finish("cancelled")
                return
            kv_tokens.append(token)
            if argmax_out is not None:
                chosen = argmax_out[0]
            token = None

    def _prefill(self) -> bool:
        """Feed the prompt in n_ubatch chunks, checking for cancellation between chunks.

        Each chunk is decoded on a helper thread (:mod:`.background`) while this one waits on an
        event that ``cancel()`` and ``close()`` also set: a cancel ends the stream at once, even
        when the running graph node still has a hundred milliseconds to go; the decode stops at
        its next node and the helper records what reached the KV cache. The next generation
        waits for that (``_claim``). After an exception (see ``_start_steps``) the prefill
        resumes at the first chunk not on record.
        """
        llm = self._llm
        ctx = self._ctx
        batch = self._batch
        if not self._started:
            ctx.memory_clear()
            llm._kv_tokens = []
            self._started = True
        self._running_chunk = self._running_thread = None  # a retry has awaited any chunk left running
        worker = DecodeWorker()
        try:
            return self._prefill_chunks(worker)
        finally:  # a chunk left running ends its thread when it returns; else the thread ends now
            thread = worker.stop(wait=self._running_chunk is None)
            if self._running_chunk is not None:
                self._running_thread = thread

    def _prefill_chunks(self, worker: DecodeWorker) -> bool:
        llm = self._llm
        ctx = self._ctx
        batch = self._batch
        tokens = self._prompt
        chunk = max(1, min(ctx.n_ubatch, ctx.n_batch))
        for start in range(len(llm._kv_tokens), len(tokens), chunk):
            wake = llm._prefill_wake = threading.Event()  # published before the check: no cancel is missed
            if llm._cancel_event.is_set() or self._closing:
                llm._prefill_wake = None
                self._finish("cancelled")
                return False
            piece = tokens[start:start + chunk]
            batch.set_tokens(piece, start, logits_last=start + chunk >= len(tokens))
            job = BackgroundDecode(lambda: ctx.decode(batch), wake)
            worker.submit(job)
            try:
                wake.wait()
            except BaseException:  # e.g. KeyboardInterrupt: raise now, the helper records the chunk
                if not self._leave_running(job, piece):
                    self._record_chunk(piece, job.error)
                raise
            finally:
                llm._prefill_wake = None
            if not job.finished:  # woken by cancel() or close() while the decode runs
                # Finished first, so that the helper, seeing it, releases the LLM when the decode is over.
                self._finish("cancelled", release=False)
                if not self._leave_running(job, piece):  # it returned meanwhile after all
                    self._record_chunk(piece, job.error)
                    llm._release(self)
                return False
            self._record_chunk(piece, job.error)
            if isinstance(job.error, DecodeAborted):
                self._finish("cancelled")
                return False
            if job.error is not None:
                raise job.error
        self._t_prompt_done = time.perf_counter()
        self._prefilled = True
        return True

    def _record_chunk(self, piece: List[int], error: Optional[BaseException]) -> None:
        """Put what a prefill chunk's decode left in the KV cache on record."""
        llm = self._llm
        if error is None:
            llm._kv_tokens.extend(piece)
        elif isinstance(error, DecodeAborted):  # the cache was trimmed to the ubatches that completed
            llm._kv_tokens = self._prompt[:error.n_past]
        # Any other error: a retry cuts the cache back to the record, a new generation clears it.

    def _leave_running(self, job: BackgroundDecode, piece: List[int]) -> bool:
        """Stop waiting for a chunk's decode; False when it has returned already."""
        def on_done(error: Optional[BaseException]) -> None:
            self._record_chunk(piece, error)
            if self._done:
                self._llm._release(self)

        self._running_chunk = job
        if job.leave(on_done):
            return True
        self._running_chunk = None
        return False

    def _await_running_chunk(self) -> None:
        """Wait until a prefill chunk this stream stopped waiting for has returned and is on record."""
        job = self._running_chunk
        if job is not None:
            job.done.wait()
            thread = self._running_thread
            if thread is not None and thread is not threading.current_thread():
                thread.join()  # its OpenMP pool goes with it (see background.DecodeWorker)

    def _finish(self, reason: str, flush: bool = True, release: bool = True) -> None:
        if self._done:
            return
        self._done = True
        tail = self._assembler.finish()
        if tail and flush:
            self._pending.append(tail)
        self.finish_reason = reason
        now = time.perf_counter()
        prompt_done = self._t_prompt_done or now
        stats = self.stats
        stats.generated_tokens = len(self.generated)
        stats.total_time = now - self._t_start
        stats.prompt_time = prompt_done - self._t_start
        stats.generation_time = now - prompt_done
        stats.tokens_per_second = (stats.generated_tokens / stats.generation_time
                                   if stats.generation_time > 0 else 0.0)
        llm = self._llm
        if not self._superseded:
            llm.last_stats = stats
            llm.last_finish_reason = reason
            llm.last_finished_at = now
        self._sampler.close()
        if release:
            llm._release(self)
