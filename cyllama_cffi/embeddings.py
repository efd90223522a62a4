"""``Embedder``: text to vectors over an embedding-only context.

Many texts go through as parallel sequences: texts of similar lengths, as many as fit
``n_batch`` tokens and ``n_seq_max`` sequences, share one ``llama_decode``, each padded to the
longest (see :func:`._embed_plan.pack_even`); every token's embedding is read back, each
text's rows are pooled here ("mean", "cls" = first row, "last" = last row, or "none"), and the
KV cache is cleared for the next group.

Why each sequence gets a KV stream of its own (``kv_unified=False``, ``n_ctx`` cells each) and
why the pooling is done here rather than by llama.cpp (``llama_get_embeddings_seq``): in the
unified KV cache, a sequence's token rows past about the tenth position change (by ~5e-3 once
normalised) when another sequence of similar length shares the decode, so a text's vector
would depend on its neighbours. Separate streams keep each text's rows the same, to float32
rounding, alone or in any company; but llama.cpp then splits a decode into micro-batches of
equal pieces of each sequence, and its pooling, done per micro-batch, would pool pieces. Rows
pooled here do not care how the decode was split. Texts of unequal lengths would be split into
many micro-batches (slow), some pieces of one token, whose rows take other kernels and differ
in the last bits; padded to equal lengths, a group is one micro-batch, and a text's vector is
bit for bit the same alone or in any company (a causal model's rows do not see what follows).

Flash attention is off: on the CPU it computes in half precision along a path chosen by the
batch's size, which would also make a vector move with the texts packed beside it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Union

from ._embed_plan import check_pooling, check_texts, fit_lengths, pack, pack_even
from ._ffi import lib
from .errors import ClosedError
from .lowlevel.batch import LlamaBatch
from .lowlevel.context import LlamaContext
from .lowlevel.model import LlamaModel

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Embedder"]

Texts = Union[str, Sequence[str]]


class Embedder:
    """Embeddings of texts from a GGUF model.

    ``Embedder(model_path, n_ctx=512, n_seq_max=8, pooling="mean", normalize=True,
    n_threads=None)``. ``model_path`` may also be a loaded :class:`LlamaModel`, which is then
    borrowed (``close()`` leaves it loaded). ``n_ctx`` bounds one text's tokens and one decode's
    tokens together; ``n_seq_max`` how many texts share a decode. The KV cache has ``n_ctx``
    cells for each of the ``n_seq_max`` sequences.

    Use it as a context manager, or call ``close()``: the context (and a model it loaded) is
    freed at once rather than by the garbage collector.
    """

    def __init__(self, model_path: Union[str, "os.PathLike[str]", LlamaModel], n_ctx: int = 512,
                 n_seq_max: int = 8, pooling: str = "mean", normalize: bool = True,
                 n_threads: Optional[int] = None) -> None:
        self.pooling = check_pooling(pooling)
        self.normalize = bool(normalize)
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx <= 0:
            raise ValueError(f"n_ctx must be a positive int, got {n_ctx!r}")
        max_seq = lib.llama_max_parallel_sequences()
        if isinstance(n_seq_max, bool) or not isinstance(n_seq_max, int) or not 1 <= n_seq_max <= max_seq:
            raise ValueError(f"n_seq_max must be an int in 1..{max_seq}, got {n_seq_max!r}")
        if n_threads is not None and (isinstance(n_threads, bool) or not isinstance(n_threads, int)
                                      or n_threads <= 0):
            raise ValueError(f"n_threads must be a positive int or None, got {n_threads!r}")
        if isinstance(model_path, LlamaModel):
            self.model, self._owns_model = model_path, False
        else:
            self.model, self._owns_model = LlamaModel(model_path), True
        try:
            check_embedding_model(self.model)
        except BaseException:
            self._close_model()
            raise
        self.n_ctx = n_ctx
        self.n_seq_max = n_seq_max
        self.n_threads = n_threads
        self.n_embd = lib.llama_model_n_embd_out(self.model.ptr)
        self._ctx: Optional[LlamaContext] = None
        self._batch: Optional[LlamaBatch] = None
        self._closed = False

    # -- embedding --------------------------------------------------------------------
    def embed(self, texts: Texts, pooling: Optional[str] = None, normalize: Optional[bool] = None,
              truncate: bool = False) -> Any:
        """Vectors of ``texts`` (one str is one text).

        Pooling "mean", "cls" or "last": a float32 array of shape ``(len(texts), n_embd)``
        (``(1, n_embd)`` for one str). Pooling "none": a list with one ``(n_tokens, n_embd)``
        float32 array per text. ``normalize`` makes each vector (each row, for "none") of
        L2 norm 1. A text longer than ``n_ctx`` tokens is a ``ValueError`` naming it, or its
        first ``n_ctx`` tokens with ``truncate=True``. ``pooling``/``normalize`` default to
        the Embedder's.
        """
        import numpy as np

        pooling = check_pooling(self.pooling if pooling is None else pooling)
        normalize = self.normalize if normalize is None else bool(normalize)
        items = check_texts(texts)
        if self._closed:
            raise ClosedError("this Embedder is closed")
        if not items:
            return [] if pooling == "none" else np.zeros((0, self.n_embd), dtype=np.float32)
        vocab = self.model.vocab
        tokens = fit_lengths([vocab.tokenize(text, add_special=True) for text in items], self.n_ctx, truncate)
        ctx, batch = self._context()
        rows: List[Any] = [None] * len(items)
        lengths = [len(ids) for ids in tokens]
        if lib.llama_get_causal_attn(ctx.ptr):
            groups = pack_even(lengths, ctx.n_batch, self.n_seq_max)
        else:  # every row sees the whole text: nothing may follow it
            groups = [(group, 0) for group in pack(lengths, ctx.n_batch, self.n_seq_max)]
        try:
            for group, padded in groups:
                self._embed_group(ctx, batch, group, tokens, rows, padded)
        finally:
            # This thread's pool of OpenMP workers would stay behind, idle: beside another
            # thread's decodes (an LLM generating elsewhere) libgomp would then make their
            # barriers sleep instead of spin. Freed here; the next call makes a new one.
            lib.cyl_release_openmp_threads()
        if pooling == "none":
            return [_normalized(matrix) if normalize else matrix for matrix in rows]
        result = np.stack([_pool(matrix, pooling) for matrix in rows])
        return _normalized(result) if normalize else result

    def _embed_group(self, ctx: LlamaContext, batch: LlamaBatch, group: List[int],
                     tokens: List[List[int]], rows: List[Any], padded: int) -> None:
        """One decode of the texts in ``group``, sequence ``k`` for its ``k``-th text; fills ``rows``.

        Each text is followed by copies of its last token up to ``padded`` tokens (see
        ``pack_even``); their rows are decoded and dropped.
        """
        batch.clear()
        for seq_id, index in enumerate(group):
            ids = tokens[index]
            for pos, token in enumerate(ids + ids[-1:] * (padded - len(ids))):
                batch.add(token, pos, (seq_id,), logits=True)  # an embeddings context outputs every token
        ctx.memory_clear()
        ctx.decode(batch)
        matrix = ctx.get_embeddings(batch.n_tokens, self.n_embd)
        start = 0
        for index in group:
            count = len(tokens[index])
            rows[index] = matrix[start:start + count]
            start += max(count, padded)

    def _context(self) -> Any:
        """The embeddings context and its batch, made on first use."""
        if self._ctx is None:
            ctx = LlamaContext(self.model, n_ctx=self.n_ctx * self.n_seq_max, n_batch=self.n_ctx,
                               n_ubatch=self.n_ctx, n_threads=self.n_threads, n_seq_max=self.n_seq_max,
                               kv_unified=False, embeddings=True, pooling_type=lib.LLAMA_POOLING_TYPE_NONE,
                               flash_attn=False)  # see the module docstring
            self._ctx = ctx
            self._batch = LlamaBatch(ctx.n_batch, 1)
        return self._ctx, self._batch

    # -- lifetime ---------------------------------------------------------------------
    def _close_context(self) -> None:
        ctx, batch, self._ctx, self._batch = self._ctx, self._batch, None, None
        if ctx is not None:
            ctx.close()
        if batch is not None:
            batch.close()

    def _close_model(self) -> None:
        if self._owns_model:
            self.model.close()

    def close(self) -> None:
        """Free the context, and the model if this Embedder loaded it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._close_context()
        finally:
            self._close_model()

    def __enter__(self) -> "Embedder":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Embedder pooling={self.pooling!r} n_ctx={self.n_ctx}{' closed' if self._closed else ''}>"


def check_embedding_model(model: LlamaModel) -> None:
    """``ValueError`` for a model that cannot make embeddings, before llama.cpp sees it."""
    if model.vocab_only:
        raise ValueError("this model was loaded with vocab_only=True: it has no weights, so no embeddings")
    if lib.llama_model_n_embd_out(model.ptr) <= 0:
        raise ValueError("this model reports no embedding size, so it cannot make embeddings")
    if lib.llama_model_has_encoder(model.ptr) and lib.llama_model_has_decoder(model.ptr):
        raise ValueError("encoder-decoder models (such as T5) are not supported for embeddings")


def _pool(matrix: "np.ndarray", pooling: str) -> "np.ndarray":
    """One vector from a text's token rows."""
    if pooling == "mean":
        return matrix.mean(axis=0)
    return matrix[0] if pooling == "cls" else matrix[-1]


def _normalized(matrix: "np.ndarray") -> "np.ndarray":
    """Each row of ``matrix`` divided by its L2 norm (a zero row stays zero)."""
    import numpy as np

    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    return (matrix / np.where(norms > 0, norms, 1.0)).astype(np.float32, copy=False)
