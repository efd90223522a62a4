"""``KVSequence``: one sequence of a context's KV cache, and the record of what it holds.

The record (``tokens``) is what lets a generation know what is in the cache without asking
llama.cpp: the prompt, then every generated token whose decode returned. Whoever decodes into
the sequence updates the record right after the decode (a prompt chunk on its helper thread,
a generated token in the token loop); an exception in between leaves a cell the record does
not list, and :meth:`settle`, called before each generation, cuts it off. A prompt chunk that its
stream stopped waiting for (a cancel, a ``KeyboardInterrupt``) goes on, on a helper thread
that is on record here from before it started: :meth:`settle` stops and joins it before
anyone touches the context again.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from ._background import HelperThread, Job
from ._ffi import lib
from .errors import DecodeAborted
from .lowlevel.batch import LlamaBatch
from .lowlevel.context import LlamaContext


class KVSequence:
    """Sequence ``seq_id`` of ``ctx``: its token record, its batch, and a decode left running."""

    def __init__(self, ctx: LlamaContext, batch: LlamaBatch, seq_id: int = 0,
                 flash_attn: Optional[bool] = None) -> None:
        self.ctx = ctx
        self.batch = batch
        self.seq_id = seq_id
        # The size from which a chunk takes the tiled flash-attention path; None when the
        # context runs without flash attention, where every chunk of two or more is of one kind.
        self.flash_attn = flash_attn
        self.tiled: Optional[int] = None if flash_attn is False else TILED
        self.tokens: List[int] = []  # tokens whose K/V are in the cache, in position order
        # The kind of chunk (chunk_kind) each of the first tokens was decoded in as a prompt.
        # Only those tokens are reused: a generated token's K/V come from a one-token decode,
        # whose sums differ in the last bits from a prompt chunk's (see docs/state.md).
        self.kinds = bytearray()
        self._helper: Optional[HelperThread] = None  # decodes the prompt's chunks; see settle()
        # The record a re-read (reread_generated) on the helper is making, while it runs, and
        # the length of the record it started from.
        self._reread_target: Optional[List[int]] = None
        self._reread_from = 0

    @property
    def step(self) -> int:
        """The most tokens a prompt chunk has: one micro-batch."""
        return max(1, min(self.ctx.n_ubatch, self.ctx.n_batch))

    @property
    def n_prefilled(self) -> int:
        """How many tokens, from the start, were decoded as prompt chunks: what may be reused."""
        return len(self.kinds)

    @n_prefilled.setter
    def n_prefilled(self, count: int) -> None:
        """Cut the prompt record to ``count`` tokens; a longer one (a state saved without the
        kinds of its chunks) is taken to be ``prefill_plan``'s chunks from position 0."""
        if count <= len(self.kinds):
            del self.kinds[count:]
        else:
            self.kinds = plan_kinds(prefill_plan(0, count, self.step), self.tiled)

    def decode_chunk(self, tokens: Sequence[int], logits_last: bool) -> None:
        """Decode ``tokens`` at the end of the sequence and put what reached the cache on record."""
        start = len(self.tokens)
        self.batch.set_tokens(tokens, start, self.seq_id, logits_last=logits_last)
        try:
            self.ctx.decode(self.batch)
        except DecodeAborted as aborted:  # the ubatches that completed stay in the cache
            self.tokens.extend(tokens[:max(0, aborted.n_past - start)])
            self._prefilled(start, len(tokens))
            raise
        self.tokens.extend(tokens)
        self._prefilled(start, len(tokens))

    def _prefilled(self, start: int, chunk: int) -> None:
        if len(self.kinds) == start:  # contiguous with the prompt chunks before it
            self.kinds.extend(bytes([chunk_kind(chunk, self.tiled)]) * (len(self.tokens) - start))

    def clear(self) -> None:
        """Empty the sequence (its cache cells and its record)."""
        self.settle()
        self.ctx.memory_seq_rm(self.seq_id, -1, -1)
        self.tokens = []
        self.kinds = bytearray()

    def keep_prefix(self, prompt: Sequence[int]) -> int:
        """Keep the longest prefix of the cache that ``prompt`` starts with; cut the rest. Returns its length.

        Only what a fresh context would compute bit for bit the same is kept, so that the
        output is that of a fresh context: tokens decoded as prompt chunks, each in the same
        kind of chunk (``chunk_kind``) as ``prefill_plan`` puts it in when it decodes ``prompt``
        from position 0, and a prefix whose rest ``prefill_plan`` decodes in chunks of those
        same kinds. With the default micro-batch and flash attention that is the prompt's new
        tokens, at least 64 of them, or all of a prompt shorter than 64; without flash
        attention, the new tokens, at least two (see ``docs/state.md``).
        """
        self.settle(prompt)
        record = self.tokens
        keep = reusable_prefix(record, self.kinds, prompt, self.step, self.tiled)
        if keep < len(record):
            self.ctx.memory_seq_rm(self.seq_id, keep, -1)
            del record[keep:]
        del self.kinds[keep:]
        return keep

    def reread_generated(self, then: Sequence[int] = ()) -> None:
        """Without flash attention, decode the generated tokens again as prompt chunks, on a helper.

        A generated token's K/V come from a one-token decode, whose sums differ in the last bits
        from a prompt chunk's, so a follow-up would decode the answer again as part of its
        prompt. Re-read while the LLM is idle (a user reading the answer), the answer's cells
        become what a fresh decode of the follow-up computes (without flash attention every
        chunk of two tokens or more is of one kind), and the follow-up decodes only its own new
        tokens. The next generation waits for the re-read if its prompt holds some of it, and stops it
        otherwise (:meth:`settle`); the record stays exact throughout.

        ``then``: tokens a follow-up is expected to hold right after the answer (a chat
        template's end of turn and the next user turn's opening), read with it. A follow-up
        that holds other tokens there keeps the cache up to where they differ, bit-exact as
        any prefix: a wrong guess costs only the idle time spent on it.
        """
        start = len(self.kinds)
        answer = self.tokens[start:] + list(then)
        if self.tiled is not None or self._helper is not None or start == 0 or len(answer) < 2:
            return
        self._reread_target = self.tokens[:start] + answer
        self._reread_from = start
        self.ctx.memory_seq_rm(self.seq_id, start, -1)
        del self.tokens[start:]

        def reread() -> None:
            for a, b in prefill_plan(start, start + len(answer), self.step):
                self.decode_chunk(answer[a - start:b - start], logits_last=False)

        helper = self.start_helper()
        helper.submit(Job(reread))
        helper.stop()  # the thread ends after it

    def sync(self) -> None:
        """Cut the cache back to the record, unless a prompt chunk may still be decoding."""
        if self._helper is None:
            self.ctx.memory_seq_rm(self.seq_id, len(self.tokens), -1)
            del self.kinds[len(self.tokens):]

    def start_helper(self) -> HelperThread:
        """A helper thread for the prompt's chunks, on record here before it runs anything.

        The calling thread's OpenMP pool (its token decodes' workers) is freed first: beside
        the helper's own pool it would leave libgomp with more threads than cores, and libgomp
        then sleeps instead of spinning at ggml's per-node barriers, which on 2 cores makes a
        30-token chunk ~25 % slower. The next token decode makes a new pool (tens of
        microseconds).
        """
        self._join_helper()
        lib.cyl_release_openmp_threads()
        helper = self._helper = HelperThread()
        return helper

    def end_helper(self, wait: bool) -> None:
        """The prompt is done with its helper: ``wait`` joins it now (nothing left running);
        otherwise its thread ends after the chunk it decodes and :meth:`settle` joins it."""
        if wait:
            self._join_helper()
        elif self._helper is not None:
            self._helper.stop()

    def settle(self, prompt: Optional[Sequence[int]] = None, finish_reread: bool = False) -> None:
        """Make the cache match the record before anyone else uses the context.

        A chunk left decoding is stopped (the C flag: at most one graph node) and waited for;
        a busy lock that an interrupted call left held is released (nothing else can use the
        context now); then what is not on record is cut off. A re-read of generated tokens
        (:meth:`reread_generated`) is waited for instead when ``prompt`` starts with what it
        makes (some of it: what the prompt would decode anyway), or with ``finish_reread``.
        """
        target = self._reread_target
        wanted = finish_reread or (target is not None and prompt is not None
                                   and shared_length(prompt, target) > self._reread_from)
        stopping = self._helper is not None and self._helper.is_alive() and not (target is not None and wanted)
        if stopping:
            self.ctx.cancel = True  # its result is not wanted
        self._join_helper()
        if stopping:  # the flag stopped the helper's decode and must not stop the caller's
            self.ctx.cancel = False
        self._reread_target = None
        self.ctx.release_stale_busy()
        self.sync()

    def _join_helper(self) -> None:
        helper = self._helper
        if helper is not None:
            helper.join()
            self._helper = None


# ggml-cpu decodes a micro-batch of 64 tokens or more (GGML_FA_TILE_Q) with its tiled flash
# attention (F32 products) and a shorter one row by row (F16 products); a lone token takes yet
# other paths (the split-KV attention, the non-tiled matrix products). Within each kind a token's
# K/V do not depend on what else its micro-batch holds, so a prefix decoded in chunks of the
# same kinds gives the bits of a fresh decode (bench/split_invariance.py measures it). Without
# flash attention (the attention as matrix products) only the lone token stands apart.
TILED = 64
SINGLE, SHORT, LONG = 2, 1, 0


def shared_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens ``a`` and ``b`` have in common from the start."""
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


def chunk_kind(size: int, tiled: Optional[int] = TILED) -> int:
    """Which of ggml-cpu's code paths a prompt chunk of ``size`` tokens takes (``tiled``: None
    without flash attention)."""
    return LONG if tiled is not None and size >= tiled else SHORT if size > 1 else SINGLE


def prefill_plan(start: int, end: int, step: int) -> List[Tuple[int, int]]:
    """The [a, b) chunks in which a prompt's tokens ``start`` to ``end`` are decoded.

    As few chunks of at most ``step`` tokens as can be, of even sizes: so that with ``step``
    of 128 or more every chunk of 64 tokens or more has at least 64, and is of one kind.
    """
    total = end - start
    if total <= 0:
        return []
    count = -(-total // step)
    base, extra = divmod(total, count)
    bounds = [start]
    for index in range(count):
        bounds.append(bounds[-1] + base + (1 if index < extra else 0))
    return list(zip(bounds, bounds[1:]))


def reusable_prefix(record: Sequence[int], kinds: Sequence[int], prompt: Sequence[int], step: int,
                    tiled: Optional[int] = TILED) -> int:
    """How many of ``prompt``'s first tokens a cache holding ``record`` can keep, bit-exactly.

    ``kinds``: the chunk kind of each of the record's first tokens that were decoded as a
    prompt. A token is kept when it matches, was decoded in the chunk kind ``prefill_plan``
    (chunks of at most ``step``) gives it when ``prompt`` is decoded from position 0, and the
    plan of the rest decodes every remaining token in its fresh kind too.
    """
    fresh = plan_kinds(prefill_plan(0, len(prompt), step), tiled)
    limit = min(len(kinds), len(record), len(prompt) - 2)  # at least two: a lone token takes other paths
    keep = 0
    while keep < limit and record[keep] == prompt[keep] and kinds[keep] == fresh[keep]:
        keep += 1
    tries = 2 * step  # enough for any step >= 2 * TILED; past it, decoding all is exact too
    while keep > 0 and plan_kinds(prefill_plan(keep, len(prompt), step), tiled) != fresh[keep:]:
        keep = keep - 1 if tries > 0 else 0
        tries -= 1
    return keep


def plan_kinds(plan: Sequence[Tuple[int, int]], tiled: Optional[int] = TILED) -> bytearray:
    """The kind of chunk of each token of ``plan``."""
    kinds = bytearray()
    for start, end in plan:
        kinds.extend(bytes([chunk_kind(end - start, tiled)]) * (end - start))
    return kinds


def kinds_to_runs(kinds: Sequence[int]) -> List[List[int]]:
    """``[[kind, count], ...]``: the kinds of a token record, compactly, for a saved state."""
    runs: List[List[int]] = []
    for kind in kinds:
        if runs and runs[-1][0] == kind:
            runs[-1][1] += 1
        else:
            runs.append([kind, 1])
    return runs


def kinds_from_runs(runs: object, total: int) -> Optional[bytearray]:
    """The kinds of :func:`kinds_to_runs`; an empty record for ``None`` (a state saved before
    kinds were recorded), ``None`` for anything malformed or not ``total`` tokens long."""
    if runs is None:
        return bytearray()
    if not isinstance(runs, list):
        return None
    kinds = bytearray()
    for run in runs:
        if not (isinstance(run, list) and len(run) == 2 and all(type(v) is int for v in run)
                and run[0] in (LONG, SHORT, SINGLE) and 0 < run[1] <= total - len(kinds)):
            return None
        kinds.extend(bytes([run[0]]) * run[1])
    return kinds if len(kinds) == total else None
