"""``LlamaContext``: owns one ``llama_context*`` plus its cancel state.

Every context gets the shim's C abort callback at creation, reading a
per-context atomic flag: ``ctx.cancel = True`` (from any thread) makes a
running ``llama_decode`` return within one graph node. ``decode`` validates
its batch first (llama.cpp aborts the process for batches larger than
``n_batch``, and sampling needs logits that exist), maps return codes to
exceptions, and after an abort trims the KV cache to what was committed.

Lifetimes, so that no thread ever touches freed memory:

- the C cancel state lives as long as the Python object *and* the
  ``llama_context`` (which points at it), whichever goes last, so
  ``cancel = True`` racing with ``close()`` writes into live memory and
  raises ``ClosedError`` at worst;
- every call that uses the ``llama_context`` holds the context's busy lock,
  and ``close()`` takes that lock (after raising the abort flag, so a running
  decode returns within one graph node) before freeing anything;
- at interpreter exit, before the finalizers free anything, contexts are
  closed the same way, so a daemon thread inside ``llama_decode`` sees an
  abort instead of a freed context.
"""

from __future__ import annotations

import atexit
import functools
import os
import threading
import weakref
import math
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Tuple

from .._ffi import ffi, lib
from ._handle import CHandle
from .._logging import get_logger
from .adapter import LoraAdapter
from .batch import LlamaBatch
from ..errors import ClosedError, ContextBusyError, ContextFullError, DecodeAborted, DecodeError, LlamaError
from .model import LlamaModel
from .vocab import check_token_ids, out_of_vocabulary

if TYPE_CHECKING:
    import numpy as np


def usable_cores() -> int:
    """Cores this process may run on (affinity/cgroup aware), not llama.cpp's fixed 4."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - platforms without affinity
        return max(1, os.cpu_count() or 1)


def _log_callback_error(exc_type, exc_value, traceback) -> bool:
    get_logger().error("abort callback raised; aborting the decode", exc_info=(exc_type, exc_value, traceback))
    return True


@ffi.def_extern(onerror=_log_callback_error)
def cyl_py_abort(user_data: Any) -> bool:
    context: "LlamaContext" = ffi.from_handle(user_data)
    callback = context._py_abort
    return bool(callback()) if callback is not None else False


class LlamaContext(CHandle):
    """An inference context (KV cache, threads, logits) over a ``LlamaModel``."""

    _kind = "context"

    def __init__(
        self,
        model: LlamaModel,
        *,
        n_ctx: int = 0,
        n_batch: int = 2048,
        n_ubatch: int = 512,
        n_threads: Optional[int] = None,
        n_threads_batch: Optional[int] = None,
        n_seq_max: int = 1,
        kv_unified: bool = False,
        embeddings: bool = False,
        pooling_type: Optional[int] = None,
        flash_attn: Optional[bool] = None,
    ) -> None:
        if model.vocab_only:
            raise ValueError("cannot create a context for a vocab_only model (it has no weights)")
        for name, value in (("n_ctx", n_ctx), ("n_batch", n_batch), ("n_ubatch", n_ubatch)):
            if value < 0 or (name != "n_ctx" and value == 0):
                raise ValueError(f"{name} must be {'>= 0' if name == 'n_ctx' else '> 0'}, got {value}")
        threads = n_threads if n_threads is not None else usable_cores()
        threads_batch = n_threads_batch if n_threads_batch is not None else threads
        if threads <= 0 or threads_batch <= 0:
            raise ValueError("thread counts must be positive")
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = min(n_ubatch, n_batch)
        params.n_seq_max = n_seq_max
        params.kv_unified = kv_unified  # False: each sequence has n_ctx / n_seq_max cells of its own
        params.n_threads = threads
        params.n_threads_batch = threads_batch
        params.embeddings = embeddings
        if pooling_type is not None:  # a LLAMA_POOLING_TYPE_* value; None: the model's own
            params.pooling_type = pooling_type
        if flash_attn is not None:  # None: llama.cpp decides (on, for the CPU)
            params.flash_attn_type = (lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                      else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.no_perf = True
        raw_state = lib.cyl_cancel_new()
        if raw_state == ffi.NULL:
            raise MemoryError("could not allocate the cancel state")
        # Freed when the last reference goes: this object's and the context finalizer's.
        cancel_state = ffi.gc(raw_state, lib.cyl_cancel_free)
        params.abort_callback = ffi.addressof(lib, "cyl_abort_callback")
        params.abort_callback_data = cancel_state
        pointer = lib.llama_init_from_model(model.ptr, params)
        if pointer == ffi.NULL:
            raise LlamaError("llama.cpp could not create the context (see the cyllama_cffi.llama log)")
        # The finalizer holds cancel_state too: the context points at it until llama_free.
        super().__init__(pointer, functools.partial(_free_context, cancel_state=cancel_state))
        self._depend_on(model)
        self.model = model
        self.vocab = model.vocab
        self._n_vocab = self.vocab.n_tokens
        self._cancel_state = cancel_state
        self._py_abort: Optional[Callable[[], bool]] = None
        self._py_abort_handle: Any = None
        self._busy = threading.Lock()
        self._closing = False
        self._logit_rows: Any = ()  # batch rows that have logits after the last decode
        self._last_output = False
        self.n_ctx = lib.llama_n_ctx(pointer)
        self.n_batch = lib.llama_n_batch(pointer)
        self.n_ubatch = lib.llama_n_ubatch(pointer)
        self._memory = lib.llama_get_memory(pointer)
        self._lora: Tuple[Tuple[LoraAdapter, float], ...] = ()
        _register_for_exit(self)

    # -- cancellation -------------------------------------------------------
    @property
    def cancel(self) -> bool:
        """The C abort flag (True also after a SIGINT caught by the hook, see install_sigint_handler).

        Readable and writable from any thread; ``ClosedError`` after ``close()``.
        """
        self.ptr  # noqa: B018 - ClosedError when closed
        return bool(lib.cyl_cancel_get(self._cancel_state))

    @cancel.setter
    def cancel(self, value: bool) -> None:
        # The state outlives close() (see the module docstring): writing first and
        # checking after keeps a cancel racing with close() harmless.
        lib.cyl_cancel_set(self._cancel_state, bool(value))
        self.ptr  # noqa: B018 - ClosedError when closed

    def begin_generation(self) -> None:
        """Clear the flag and forget SIGINTs that arrived before now."""
        self.ptr  # noqa: B018
        lib.cyl_cancel_begin(self._cancel_state)

    def watch_sigint(self, watch: bool) -> None:
        """Whether a SIGINT caught by the C hook aborts this context's decodes."""
        self.ptr  # noqa: B018
        lib.cyl_cancel_watch_sigint(self._cancel_state, bool(watch))

    def set_abort_callback(self, callback: Optional[Callable[[], bool]]) -> None:
        """Replace the built-in C abort check with a Python callable (None restores it).

        The callable runs on ggml's worker threads once per graph node, so it
        should be fast; an exception in it is logged and aborts the decode.
        """
        pointer = self.ptr
        if callback is None:
            lib.llama_set_abort_callback(pointer, ffi.addressof(lib, "cyl_abort_callback"), self._cancel_state)
            self._py_abort = None
            self._py_abort_handle = None
            return
        if not callable(callback):
            raise TypeError("the abort callback must be callable or None")
        self._py_abort = callback
        self._py_abort_handle = ffi.new_handle(self)
        lib.llama_set_abort_callback(pointer, ffi.addressof(lib, "cyl_py_abort"), self._py_abort_handle)

    # -- exclusive use ---------------------------------------------------------
    def _acquire(self) -> Any:
        """Take the busy lock and return the live pointer; release with ``self._busy.release()``.

        ``ContextBusyError`` when another thread holds it, ``ClosedError`` when closed.
        """
        if not self._busy.acquire(blocking=False):
            if self._ptr is None or self._closing:
                raise ClosedError("this context is closed")
            raise ContextBusyError("this context is in use by another thread; "
                                   "llama.cpp contexts cannot be used concurrently")
        pointer = self._ptr
        if pointer is None:
            self._busy.release()
            raise ClosedError("this context is closed")
        return pointer

    def release_stale_busy(self) -> None:
        """Release the busy lock if an interrupted call left it held.

        A ``KeyboardInterrupt`` can arrive between taking the lock and the ``try`` that releases
        it. Only for an owner that knows no other thread can be using the context now (the
        ``LLM``, between generations, after its helper thread was joined).
        """
        if self._busy.locked() and not self._closing:
            try:
                self._busy.release()
            except RuntimeError:  # released meanwhile
                pass

    def _locked(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` holding the busy lock: never while a decode runs, never after close."""
        self._acquire()
        try:
            return function(*args)
        finally:
            self._busy.release()

    # -- decoding -----------------------------------------------------------

    def decode(self, batch: LlamaBatch) -> None:
        """Run ``llama_decode``; raise on anything but success.

        ``DecodeAborted`` (with ``n_past``) when the abort callback fired,
        ``ContextFullError`` when the KV cache has no room, ``ValueError`` for a
        batch llama.cpp would reject or abort on.
        """
        self.ptr  # noqa: B018 - ClosedError before anything else
        holder = batch.ptr
        count = holder.n_tokens
        if count <= 0:
            raise ValueError("cannot decode an empty batch")
        if count > self.n_batch:
            raise ValueError(f"batch has {count} tokens but the context's n_batch is {self.n_batch}")
        check_token_ids(batch.token_list(), self._n_vocab)
        pointer = self._acquire()
        try:
            self._logit_rows = ()
            code = lib.llama_decode(pointer, holder[0])
            if code == 0:
                if count == 1:
                    self._logit_rows = (0,) if holder.logits[0] else ()
                else:
                    self._logit_rows = frozenset(batch.logit_rows())
                return
            n_past = self._trim_locked(0)  # keep only what was really committed
        finally:
            self._busy.release()
        self._raise_for(code, n_past)

    def decode_token(self, batch: LlamaBatch, token: int, pos: int, argmax_out: Any = None) -> None:
        """Decode one token of sequence 0 at ``pos``, with logits: the generation loop's step.

        ``batch`` is overwritten with that one token. With ``argmax_out`` (an ``int32_t *``
        from ``ffi.new``), the first largest of the new logits is stored there in the same C
        call: the greedy choice of the next token (-1 if llama.cpp has none). The shim does
        it all in one call because the Python part of a token runs right after a decode has
        streamed the weights through the CPU caches, where each extra call is a cache miss.
        Raises as :meth:`decode` does.
        """
        if not 0 <= token < self._n_vocab:
            raise out_of_vocabulary(token, self._n_vocab)
        holder = batch.ptr
        pointer = self._acquire()
        try:
            self._logit_rows = ()
            code = lib.cyl_decode_token(pointer, holder, token, pos, self._n_vocab,
                                        ffi.NULL if argmax_out is None else argmax_out)
            if code == 0:
                self._logit_rows = (0,)
                return
            n_past = self._trim_locked(0)  # keep only what was really committed
        finally:
            self._busy.release()
        self._raise_for(code, n_past)

    def decode_rows(self, batch: LlamaBatch, n_rows: int, tokens: Any, positions: Any, seq_ids: Any,
                    want_logits: Any, n_pick: int, pick_rows: Any, samplers: Any, picked: Any) -> None:
        """Decode one step of several sequences and pick each listed row's next token, in one C call.

        The row arrays are C arrays (``int32_t``; ``int8_t`` for ``want_logits``) of at least
        ``n_rows`` entries, all token ids already checked against the vocabulary; ``samplers``
        holds a ``struct llama_sampler *`` per picked row (NULL: the first largest logit).
        ``picked`` receives the choices. On an abort, each sequence's cells past what was
        really committed are dropped, and ``DecodeAborted`` is raised (its ``n_past`` is -1:
        ask each sequence with :meth:`memory_seq_pos_max`). Raises as :meth:`decode` does.
        """
        if not 0 < n_rows <= self.n_batch:
            raise ValueError(f"a step needs 1..{self.n_batch} rows, got {n_rows}")
        pointer = self._acquire()
        try:
            self._logit_rows = ()
            code = lib.cyl_decode_rows(pointer, batch.ptr, n_rows, tokens, positions, seq_ids, want_logits,
                                       n_pick, pick_rows, samplers, self._n_vocab, picked)
            if code == 0:
                self._logit_rows = frozenset(pick_rows[i] for i in range(n_pick))
                return
            for seq_id in set(seq_ids[i] for i in range(n_rows)):
                self._trim_locked(seq_id)  # keep only what was really committed
        finally:
            self._busy.release()
        self._raise_for(code, -1)

    def _raise_for(self, code: int, n_past: int) -> None:
        if code == 2:
            raise DecodeAborted("llama_decode was aborted", n_past=n_past)
        if code == 1:
            raise ContextFullError(f"no KV-cache slot for the batch (context of {self.n_ctx} tokens is full)", code)
        if code == -1:
            raise ValueError("llama.cpp rejected the batch as invalid")
        raise DecodeError(f"llama_decode failed with code {code}", code)

    def trim_to_committed(self, seq_id: int = 0) -> int:
        """Drop anything past the last committed position of ``seq_id``; return how many remain."""
        return self._locked(self._trim_locked, seq_id)

    def _trim_locked(self, seq_id: int) -> int:
        pos_max = lib.llama_memory_seq_pos_max(self._memory, seq_id)
        lib.llama_memory_seq_rm(self._memory, seq_id, pos_max + 1, -1)
        return pos_max + 1

    def has_logits(self, index: int = -1) -> bool:
        rows = self._logit_rows
        if index == -1:
            return len(rows) > 0
        return index in rows

    # -- outputs --------------------------------------------------------------
    def get_logits_ith(self, index: int = -1) -> "np.ndarray":
        """Zero-copy float32 view of the logits of batch row ``index`` (valid until the next decode)."""
        if not self.has_logits(index):
            raise RuntimeError(f"no logits at batch index {index}: decode a batch with logits for that row first")
        pointer = lib.llama_get_logits_ith(self.ptr, index)
        if pointer == ffi.NULL:
            raise RuntimeError(f"llama.cpp has no logits at index {index}")
        import numpy as np  # only here: importing numpy would double the package's import time

        return np.frombuffer(ffi.buffer(pointer, self._n_vocab * 4), dtype=np.float32)

    def copy_logits(self, index: int, out: "np.ndarray") -> "np.ndarray":
        """Copy the logits of batch row ``index`` into ``out`` (``n_vocab`` floats of any dtype) and return it.

        Unlike :meth:`get_logits_ith`'s view, the copy is made holding the busy lock, so a
        ``close()`` from another thread cannot free the row while it is read, and it stays
        valid after the next decode. Copying into a float64 array converts in the same pass.
        """
        if not self.has_logits(index):
            raise RuntimeError(f"no logits at batch index {index}: decode a batch with logits for that row first")
        if out.shape != (self._n_vocab,):
            raise ValueError(f"out must have shape ({self._n_vocab},), got {out.shape}")
        import numpy as np

        pointer = self._acquire()
        try:
            row = lib.llama_get_logits_ith(pointer, index)
            if row == ffi.NULL:
                raise RuntimeError(f"llama.cpp has no logits at index {index}")
            np.copyto(out, np.frombuffer(ffi.buffer(row, self._n_vocab * 4), dtype=np.float32))
        finally:
            self._busy.release()
        return out

    def get_embeddings(self, n_rows: int, n_embd: int) -> "np.ndarray":
        """A copy of the ``(n_rows, n_embd)`` per-token embeddings of the last decode, in batch order.

        For a context with embeddings on and no pooling, where every token is an output.
        """
        if not 0 < n_rows <= self.n_batch:
            raise ValueError(f"n_rows must be in 1..{self.n_batch}, got {n_rows}")
        return self._locked(self._embedding_copy, lambda pointer, _: lib.llama_get_embeddings(pointer),
                            0, n_rows * n_embd).reshape(n_rows, n_embd)

    def get_embeddings_seq(self, seq_id: int, n_embd: int) -> "np.ndarray":
        """A copy of the pooled embedding of ``seq_id`` after the last decode (a pooling context)."""
        return self._locked(self._embedding_copy, lib.llama_get_embeddings_seq, seq_id, n_embd)

    def get_embeddings_ith(self, index: int, n_embd: int) -> "np.ndarray":
        """A copy of the embedding of batch row ``index`` after the last decode (no pooling)."""
        return self._locked(self._embedding_copy, lib.llama_get_embeddings_ith, index, n_embd)

    def _embedding_copy(self, getter: Callable[..., Any], key: int, n_embd: int) -> "np.ndarray":
        pointer = getter(self._ptr, key)
        if pointer == ffi.NULL:
            raise RuntimeError(f"llama.cpp has no embedding for {key}: decode with embeddings on first")
        import numpy as np

        # A copy: the buffer is reused by the next decode.
        return np.frombuffer(ffi.buffer(pointer, n_embd * 4), dtype=np.float32).copy()

    # -- memory (KV cache) ----------------------------------------------------
    def memory_clear(self, data: bool = True) -> None:
        self._locked(lib.llama_memory_clear, self._memory, data)
        self._logit_rows = ()

    def memory_seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        return bool(self._locked(lib.llama_memory_seq_rm, self._memory, seq_id, p0, p1))

    def memory_seq_pos_max(self, seq_id: int = 0) -> int:
        return self._locked(lib.llama_memory_seq_pos_max, self._memory, seq_id)

    def memory_seq_pos_min(self, seq_id: int = 0) -> int:
        return self._locked(lib.llama_memory_seq_pos_min, self._memory, seq_id)

    def seq_state_get(self, seq_id: int = 0) -> bytes:
        """Sequence ``seq_id``'s KV cache as llama.cpp serializes it (``llama_state_seq_get_data``)."""
        def read() -> bytes:
            size = lib.llama_state_seq_get_size(self._ptr, seq_id)
            buffer = ffi.new("uint8_t[]", max(size, 1))
            written = lib.llama_state_seq_get_data(self._ptr, buffer, size, seq_id)
            if written != size:
                raise LlamaError(f"llama.cpp wrote {written} bytes of sequence state, {size} expected")
            return bytes(ffi.buffer(buffer, size))
        return self._locked(read)

    def seq_state_set(self, data: bytes, seq_id: int = 0) -> bool:
        """Replace sequence ``seq_id`` with ``data`` from :meth:`seq_state_get`; False if llama.cpp refused it.

        llama.cpp empties the sequence before it reads, so after False the sequence is empty.
        Only give it data known to come from ``seq_state_get`` (llama.cpp does not check it all).
        """
        def write() -> bool:
            buffer = ffi.from_buffer("uint8_t[]", data)
            return lib.llama_state_seq_set_data(self._ptr, buffer, len(data), seq_id) == len(data)
        ok = bool(self._locked(write))
        self._logit_rows = ()
        return ok

    # -- LoRA adapters ------------------------------------------------------------
    @property
    def lora_adapters(self) -> Tuple[Tuple[LoraAdapter, float], ...]:
        """The adapters the next decodes apply, with their scales."""
        return self._lora

    def set_lora_adapters(self, adapters: Sequence[Tuple[LoraAdapter, float]]) -> None:
        """Apply ``adapters`` (``(adapter, scale)`` pairs) from the next decode on, replacing the previous set.

        An empty sequence removes them all. The KV cache is left as it is: what it holds was
        computed with the previous adapters (clear it for results of the new set). While this
        context uses an adapter, closing the adapter closes this context first.
        """
        pairs = []
        for item in adapters:
            if not isinstance(item, tuple) or len(item) != 2:
                raise TypeError(f"adapters must be (LoraAdapter, scale) pairs, got {item!r}")
            adapter, scale = item
            if not isinstance(adapter, LoraAdapter):
                raise TypeError(f"expected a LoraAdapter, got {type(adapter).__name__}")
            if adapter.model is not self.model:
                raise ValueError(f"{adapter!r} was loaded for another model")
            adapter.ptr  # ClosedError for a closed adapter
            if isinstance(scale, bool) or not isinstance(scale, (int, float)):
                raise TypeError(f"a LoRA scale must be a number, got {type(scale).__name__}")
            if not math.isfinite(scale):
                raise ValueError(f"a LoRA scale must be finite, got {scale}")
            pairs.append((adapter, float(scale)))
        if len({id(adapter) for adapter, _ in pairs}) != len(pairs):
            raise ValueError("the same adapter is listed twice")
        count = len(pairs)
        pointers = ffi.new("struct llama_adapter_lora *[]", [adapter.ptr for adapter, _ in pairs]) if count \
            else ffi.NULL
        scales = ffi.new("float[]", [scale for _, scale in pairs]) if count else ffi.NULL
        self._locked(lambda: lib.llama_set_adapters_lora(self._ptr, pointers, count, scales))
        kept = {id(adapter) for adapter, _ in pairs}
        for adapter, _ in self._lora:
            if id(adapter) not in kept:
                adapter._dependents.discard(self)
        for adapter, _ in pairs:
            self._depend_on(adapter)
        self._lora = tuple(pairs)

    # -- threads ----------------------------------------------------------------
    @property
    def n_threads(self) -> int:
        return lib.llama_n_threads(self.ptr)

    def set_n_threads(self, n_threads: int, n_threads_batch: Optional[int] = None) -> None:
        """Change the thread counts; ``ContextBusyError`` while a decode runs (it reads them)."""
        if n_threads <= 0 or (n_threads_batch is not None and n_threads_batch <= 0):
            raise ValueError("thread counts must be positive")
        self._locked(lambda: lib.llama_set_n_threads(self._ptr, n_threads, n_threads_batch or n_threads))

    # -- lifetime -----------------------------------------------------------------
    def close(self, timeout: Optional[float] = None) -> None:
        """Free the context. A decode running in another thread is aborted and waited for.

        With a ``timeout`` (seconds) and a decode that does not return in time (a
        backend that ignores the abort callback), the context is leaked rather
        than freed under the running decode.
        """
        if self._ptr is None:
            return
        self._closing = True  # from now on a decode attempt is ClosedError, not ContextBusyError
        lib.cyl_cancel_set(self._cancel_state, True)  # a running decode stops at its next graph node
        if not self._busy.acquire(timeout=-1 if timeout is None else timeout):
            get_logger().warning("a decode did not stop within %.1f s; leaking its context", timeout)
            self._ptr = None
            self._finalizer.detach()
            return
        try:
            super().close()
        finally:
            self._busy.release()


def _free_context(pointer: Any, cancel_state: Any) -> None:
    """Free the context; ``cancel_state`` is an argument only to keep it alive until then."""
    lib.llama_free(pointer)


# -- interpreter exit ----------------------------------------------------------------
_open_contexts: "weakref.WeakSet[LlamaContext]" = weakref.WeakSet()
_exit_hook_registered = False
_EXIT_WAIT_SECONDS = 10.0


def _register_for_exit(context: LlamaContext) -> None:
    """Track ``context`` so that interpreter exit closes it before the finalizers run.

    atexit runs hooks newest first, and ``weakref.finalize`` registered its own
    hook when the first handle was created, so registering here puts ours ahead.
    """
    global _exit_hook_registered
    _open_contexts.add(context)
    if not _exit_hook_registered:
        _exit_hook_registered = True
        atexit.register(_close_contexts_at_exit)


def _close_contexts_at_exit() -> None:
    """Abort decodes still running in daemon threads, then close their contexts."""
    contexts = list(_open_contexts)
    for context in contexts:  # raise every flag first: all decodes stop in parallel
        if context._ptr is not None:
            lib.cyl_cancel_set(context._cancel_state, True)
    for context in contexts:
        context.close(timeout=_EXIT_WAIT_SECONDS)
