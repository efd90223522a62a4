"""The generation path: the prompt's prefill, then the token loop, yielding text.

:func:`generate` is a generator: what it yields is what the stream's consumer gets, and its
return value is the :class:`FinishReason`. It owns no state beyond its local variables and its
sampler: what the KV cache holds is on the :class:`KVSequence`'s record, what was generated is
appended to the ``generated`` list its caller passes in, and cancellation is read from the
LLM's :class:`Cancellation`. It never cleans up the context: an exception between a decode and
its record leaves a cell the record does not list, and the next generation cuts the cache back
to the record (``KVSequence.settle``) before it starts, in its own thread, when nothing else
runs. So a stream abandoned anywhere, even one the garbage collector finalizes later, never
touches the context again.
"""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Callable, Generator, List, Optional, Sequence

from ._background import Job
from ._ffi import ffi, lib
from ._cancel import Cancellation
from ._sequence import KVSequence, prefill_plan
from ._text import TextAssembler
from .errors import DecodeAborted
from .lowlevel.sampler import LlamaSampler
from .response import FinishReason

if TYPE_CHECKING:
    from ._logprobs import TokenLogprob
    from .lowlevel.context import LlamaContext


class Progress:
    """What a running generation has done so far, for its stream's stats.

    ``logprobs`` (``n_logprobs`` > 0 only) has an entry for each token of ``generated``.
    """

    __slots__ = ("generated", "prompt_done_at", "n_logprobs", "logprobs")

    def __init__(self, n_logprobs: Optional[int] = None) -> None:
        self.generated: List[int] = []
        self.prompt_done_at = 0.0  # time.perf_counter() when the prompt was in the cache
        self.n_logprobs = n_logprobs or 0
        self.logprobs: Optional[List["TokenLogprob"]] = [] if self.n_logprobs else None


def generate(seq: KVSequence, prompt: Sequence[int], make_sampler: Callable[[], LlamaSampler],
             stop_sequences: Sequence[str],
             max_tokens: int, n_ctx: int, cancel: Cancellation,
             progress: Progress, then: Sequence[int] = ()) -> Generator[str, None, FinishReason]:
    """Decode ``prompt`` into ``seq`` (which must hold a prefix of it), then generate.

    ``n_ctx``: how many positions the sequence may use in all. ``then``: the tokens a follow-up
    is expected to hold after the answer (``KVSequence.reread_generated``). The sampler chain is
    made when the generation starts and closed when it ends, however it ends: a stream closed
    before its first step never makes one.
    """
    assembler = TextAssembler(stop_sequences)
    sampler = make_sampler()
    try:
        if not prefill(seq, prompt, cancel):
            return FinishReason.CANCELLED
        progress.prompt_done_at = time.perf_counter()
        record = _logprob_recorder(seq.ctx, progress) if progress.n_logprobs else progress.generated.append
        reason = yield from _tokens(seq, sampler, assembler, max_tokens, n_ctx, cancel, progress.generated, record)
        if reason is not FinishReason.CANCELLED:
            # Without flash attention only: so a follow-up reuses the answer. An answer cut at
            # max_tokens ends on a token that was picked, not decoded: its text holds it.
            rest = progress.generated[-1:] if reason is FinishReason.LENGTH else []
            seq.reread_generated([*rest, *then][:max(0, n_ctx - len(seq.tokens))])
    finally:
        sampler.close()  # the generation owns its sampler chain
        # The token decodes made this thread a pool of OpenMP workers. Left idle, it would count
        # against the cores while another thread decodes (the next caller of a shared LLM),
        # and libgomp would make that thread's barriers sleep instead of spin. The next
        # generation's prompt starts on a helper thread anyway, so keeping it buys nothing.
        lib.cyl_release_openmp_threads()
    tail = assembler.finish()  # held back: a partial character, a prefix of a stop sequence
    if tail:
        yield tail
    return reason


def prefill(seq: KVSequence, prompt: Sequence[int], cancel: Cancellation) -> bool:
    """Decode the prompt tokens the sequence does not hold yet; False when cancelled.

    At most a micro-batch (``n_ubatch`` tokens) at a time (``prefill_plan``), each on a helper thread while this one waits
    in ``cancel.wait``: a cancel returns at once, even while a graph node runs for a hundred
    milliseconds more; the chunk's decode stops at ggml's next node, on its own, and puts what
    reached the cache on record. If this thread stops waiting (a cancel, a
    ``KeyboardInterrupt``), the chunk goes on; the sequence, which has its helper on record,
    waits for it before the context is used again.
    """
    helper = seq.start_helper()
    job = None
    try:
        # The chunks KVSequence.keep_prefix expects: a fresh context's, for what it reuses.
        for start, end in prefill_plan(len(seq.tokens), len(prompt), seq.step):
            if cancel.is_requested():
                return False
            chunk = functools.partial(seq.decode_chunk, prompt[start:end], end >= len(prompt))
            job = helper.submit(Job(chunk))
            cancel.wait(job)
            if not job.finished:  # woken by a cancel: the decode stops on its own
                return False
            if isinstance(job.error, DecodeAborted):
                return False
            if job.error is not None:
                raise job.error
        return True
    finally:
        seq.end_helper(wait=job is None or job.finished)


def _tokens(seq: KVSequence, sampler: LlamaSampler, assembler: TextAssembler, max_tokens: int, n_ctx: int,
            cancel: Cancellation, generated: List[int], record: Callable[[int], None]
            ) -> Generator[str, None, FinishReason]:
    """Sample, emit, decode; one iteration a token. ``record`` appends a token to ``generated``.

    Everything a token needs is looked up once, before the loop: the Python part of a token
    runs right after a decode has streamed the weights through the CPU caches, where every
    attribute lookup is a cache miss.
    """
    ctx = seq.ctx
    batch = seq.batch
    kv_tokens = seq.tokens
    cancelled = cancel.is_requested
    is_eog = ctx.vocab.is_eog
    piece_bytes = ctx.vocab.piece_bytes
    feed = assembler.feed
    decode_token = ctx.decode_token
    # A greedy chain picks the next token inside the decode's own C call; others sample after it.
    chosen = ffi.new("int32_t *") if sampler.greedy_only else None
    if max_tokens <= 0:
        return FinishReason.LENGTH
    token = sampler.sample(ctx)
    while True:
        if cancelled():
            return FinishReason.CANCELLED
        if is_eog(token):
            return FinishReason.STOP
        record(token)  # before the decode below overwrites the logits it was chosen from
        text = feed(piece_bytes(token))
        if text:
            # Out before its token's decode: the first chunk follows the prefill at once, and
            # a consumer that stops here pays for no extra decode.
            yield text
        if assembler.stopped:
            return FinishReason.STOP
        if len(generated) >= max_tokens or len(kv_tokens) >= n_ctx:
            return FinishReason.LENGTH
        if cancelled():
            return FinishReason.CANCELLED
        try:
            decode_token(batch, token, len(kv_tokens), chosen)
        except DecodeAborted:
            return FinishReason.CANCELLED
        kv_tokens.append(token)
        token = chosen[0] if chosen is not None and chosen[0] >= 0 else sampler.sample(ctx)


def _logprob_recorder(ctx: "LlamaContext", progress: Progress) -> Callable[[int], None]:
    """``record`` for a generation that keeps log-probabilities (``progress.n_logprobs`` > 0).

    Each token's entry comes from the logits row it was chosen from: the last decode's (row -1,
    as the sampler and the shim's greedy pick read it), before the token's own decode replaces
    them. The entry goes in first, so an exception leaves the two lists the same length.
    """
    import numpy as np

    from ._logprobs import token_logprob

    row = np.empty(ctx.vocab.n_tokens, dtype=np.float64)  # reused: the logits copied (and widened) here
    n, generated, logprobs = progress.n_logprobs, progress.generated, progress.logprobs
    piece_bytes = ctx.vocab.piece_bytes
    assert logprobs is not None

    def record(token: int) -> None:
        logprobs.append(token_logprob(ctx.copy_logits(-1, row), token, n, piece_bytes))
        generated.append(token)

    return record
