"""The multi-sequence engine: several generations in one context, one ``llama_decode`` a step.

:class:`Engine` owns a context of ``n_seq_max`` sequences. Each :class:`EngineSequence` is one
generation: its prompt, its own sampler chain, stop rules and limits. A :meth:`Engine.step`
builds one batch holding the next token of every sequence that is generating plus chunks of
prompts still to be read (at most ``prompt_budget`` prompt tokens a step, so a long prompt
does not freeze the others), decodes it, and picks every sequence's next token, all in one C
call (``cyl_decode_rows``): the step's Python cost does not grow with the number of rows,
only with the number of sequences whose text it hands out. Sequences join with :meth:`add` and
leave (finished, cancelled) between steps; their sequence id and KV cells are then free for
the next one. One thread drives the steps; :meth:`cancel` (any thread) stops them all, even
inside a running decode, and :meth:`EngineSequence.cancel` ends one at the next step.

A sequence made with ``logprobs=n`` also keeps a :class:`~cyllama_cffi.TokenLogprob` per
generated token (docs/logprobs.md), from the row of raw logits its token was picked from; the
rows of the others are never read.
"""

from __future__ import annotations

import time
from array import array
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from ._cancel import Cancellation
from ._ffi import ffi
from ._logprobs import MAX_LOGPROBS
from ._sequence import prefill_plan
from ._text import TextAssembler
from .errors import ClosedError, DecodeAborted
from .lowlevel.batch import LlamaBatch
from .lowlevel.context import LlamaContext
from .lowlevel.model import LlamaModel
from .lowlevel.sampler import LlamaSampler
from .response import FinishReason, GenerationStats

if TYPE_CHECKING:
    from ._logprobs import TokenLogprob

__all__ = ["Engine", "EngineSequence"]

TextSink = Callable[[str], None]


class EngineSequence:
    """One generation run by an :class:`Engine`: what it reads, how it samples, what it produced.

    ``on_text`` receives each piece of text as soon as it is final (whole characters, stop
    sequences held back and cut); without one the pieces collect in ``pieces``.
    ``finish_reason`` is None while it runs. ``logprobs=n`` (0 to 20; None, the default, is
    off) keeps in ``logprobs`` an entry per token of ``generated``, each with the ``n`` most
    likely alternatives (0: the token's own log-probability only); an entry is on record before
    its token's text reaches ``on_text``.
    """

    def __init__(self, prompt: Sequence[int], sampler: LlamaSampler, max_tokens: int,
                 stop_sequences: Sequence[str] = (), on_text: Optional[TextSink] = None,
                 logprobs: Optional[int] = None) -> None:
        if not prompt:
            raise ValueError("the prompt is empty; give at least one token")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an int between 0 and {MAX_LOGPROBS}, got {logprobs!r}")
        self.prompt = list(prompt)
        self.sampler = sampler
        self.max_tokens = max_tokens
        self.assembler = TextAssembler(stop_sequences)
        self.pieces: List[str] = []
        self.on_text: TextSink = on_text if on_text is not None else self.pieces.append
        self.generated: List[int] = []
        self.n_logprobs = logprobs
        self.logprobs: Optional[List["TokenLogprob"]] = [] if logprobs is not None else None
        self.cached: List[int] = []  # tokens whose K/V are in the cache, in position order
        self.seq_id = -1  # assigned when the engine takes it
        self.n_reused = 0  # prompt tokens whose cells were already in the sequence (prefix affinity)
        self._chunk_ends: Deque[int] = deque()  # where the prompt's chunks end (set by the engine)
        self.capacity = 0  # positions the sequence may use in all
        self.pending = -1  # sampled, emitted, not yet decoded
        self.finish_reason: Optional[FinishReason] = None
        self._cancel = False
        self.t_added = time.perf_counter()
        self.t_prompt_done = 0.0
        self.t_finished = 0.0

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """End this sequence at the next step (any thread); the others go on."""
        self._cancel = True

    @property
    def stats(self) -> GenerationStats:
        end = self.t_finished or time.perf_counter()
        prompt_done = self.t_prompt_done or end
        generation_time = end - prompt_done
        n = len(self.generated)
        return GenerationStats(prompt_tokens=len(self.prompt), generated_tokens=n, total_time=end - self.t_added,
                               prompt_time=prompt_done - self.t_added, generation_time=generation_time,
                               tokens_per_second=n / generation_time if generation_time > 0 else 0.0)

    # -- called by the engine's stepping thread --------------------------------------------
    def _take(self, token: int, is_eog: Callable[[int], bool], piece_bytes: Callable[[int], bytes]) -> None:
        """The token picked from this sequence's logits: emit it, or end here."""
        if is_eog(token):
            self._finish(FinishReason.STOP)
            return
        self.generated.append(token)
        text = self.assembler.feed(piece_bytes(token))
        if text:
            self.on_text(text)
        if self.assembler.stopped:
            self._finish(FinishReason.STOP)
        elif len(self.generated) >= self.max_tokens or len(self.cached) >= self.capacity:
            self._finish(FinishReason.LENGTH)
        else:
            self.pending = token

    def _finish(self, reason: FinishReason) -> None:
        self.finish_reason = reason
        self.pending = -1
        tail = self.assembler.finish()
        if tail:
            self.on_text(tail)
        self.sampler.close()  # the sequence owns its chain
        self.t_finished = time.perf_counter()


class Engine:
    """A context of ``n_seq_max`` sequences decoded together, one ``llama_decode`` a step.

    Each sequence holds at most ``n_ctx // n_seq_max`` cells (``seq_capacity``).
    ``kv_unified=False`` (llama.cpp's default) gives each its own cache of that size;
    ``True`` puts every sequence's cells in one cache (llama.cpp's ``kv_unified``), whose
    attention without flash attention generates faster on a CPU, but a sequence's sums then
    depend on where its cells lie among its neighbours' (logits differ by up to ~0.9 on the
    default model), so its greedy output is no longer what it gives alone. The share stays the
    same either way, so a step can never find a unified cache full: kept prefixes and running
    sequences together hold at most ``n_ctx`` cells.
    ``prompt_budget``: most prompt tokens one step reads (default: the whole batch). A prompt is
    read in the chunks ``prefill_plan`` gives it (even chunks of at most ``prompt_budget``, as
    ``LLM`` reads a prompt of micro-batches that size), whatever else the step holds, so how a
    prompt is split does not depend on its neighbours (llama.cpp's sums do depend on the
    split): a chunk that does not fit what is left of a step's budget waits for the next step,
    unless the step has no prompt rows yet. ``flash_attn=False``: a step in which no sequence is
    generating (nobody waits for it) reads as many whole chunks as the batch holds, and with
    ``step_time`` (seconds) a step beside generating sequences reads whole chunks while steps
    stay that short (never fewer than one chunk).

    ``keep_prefixes=True`` (prefix affinity, for servers): a sequence that finishes (not
    cancelled) leaves its cells and its token record behind; :meth:`add` gives a new sequence
    the free sequence id whose record shares the longest prefix with its prompt, cuts the cells
    past that prefix, and decodes only the rest of the prompt (``EngineSequence.n_reused``).
    """

    def __init__(self, model: LlamaModel, *, n_ctx: int, n_seq_max: int, n_batch: int = 2048,
                 n_ubatch: int = 512, n_threads: Optional[int] = None, kv_unified: bool = False,
                 prompt_budget: Optional[int] = None, keep_prefixes: bool = False,
                 flash_attn: Optional[bool] = None, step_time: Optional[float] = None) -> None:
        if n_seq_max < 1:
            raise ValueError(f"n_seq_max must be >= 1, got {n_seq_max}")
        self.ctx = LlamaContext(model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, n_threads=n_threads,
                                n_seq_max=n_seq_max, kv_unified=kv_unified, flash_attn=flash_attn)
        self.n_seq_max = n_seq_max
        self.seq_capacity = self.ctx.n_ctx // n_seq_max
        self.n_batch = self.ctx.n_batch
        self.prompt_budget = self.n_batch if prompt_budget is None else max(1, min(prompt_budget, self.n_batch))
        # Without flash attention a token's sums do not depend on the size of its chunk (two
        # tokens or more; bench/split_invariance.py), so a step may read several chunks of a
        # prompt at once. With it, chunks of 64 tokens or more take another code path.
        self._merge_chunks = flash_attn is False
        # step_time (seconds, with flash_attn=False): while sequences generate, a step may read more
        # than prompt_budget prompt tokens (whole chunks) as long as steps stay this short; the
        # rows it may read follow the time the last step with prompt rows took.
        self.step_time = step_time if self._merge_chunks else None
        self._prompt_rows = self.prompt_budget  # what the next step with generating sequences may read
        self._tokens_only_time = 0.0  # seconds the last step of generated tokens alone took
        self.batch = LlamaBatch(self.n_batch)
        self.cancellation = Cancellation()
        self.cancellation.attach(self.ctx)
        self._free_ids: Deque[int] = deque(range(n_seq_max))
        self.keep_prefixes = keep_prefixes
        # What each free sequence id still holds in its cells (keep_prefixes), in position order.
        self._kept: Dict[int, List[int]] = {}
        self._running: List[EngineSequence] = []  # in the order they joined
        # Row arrays handed to C each step; allocated once, at the largest size a step can have.
        self._tokens = ffi.new("int32_t[]", self.n_batch)
        self._positions = ffi.new("int32_t[]", self.n_batch)
        self._seq_ids = ffi.new("int32_t[]", self.n_batch)
        self._want_logits = ffi.new("int8_t[]", self.n_batch)
        self._pick_rows = ffi.new("int32_t[]", n_seq_max)
        self._samplers = ffi.new("struct llama_sampler *[]", n_seq_max)
        self._picked = ffi.new("int32_t[]", n_seq_max)
        self._logits_row: Any = None  # float64[n_vocab], made when a sequence first asks for logprobs

    # -- membership ---------------------------------------------------------------------------
    @property
    def running(self) -> List[EngineSequence]:
        """The sequences still running, in the order they joined."""
        return list(self._running)

    @property
    def has_room(self) -> bool:
        return bool(self._free_ids)

    def add(self, sequence: EngineSequence) -> EngineSequence:
        """Let ``sequence`` join at the next step; ValueError if its prompt cannot fit a sequence."""
        if not self._free_ids:
            raise ValueError(f"all {self.n_seq_max} sequences are in use")
        if len(sequence.prompt) >= self.seq_capacity:
            raise ValueError(f"the prompt has {len(sequence.prompt)} tokens but a sequence holds "
                             f"{self.seq_capacity}; shorten the prompt or raise n_ctx")
        self.ctx.vocab.check_tokens(sequence.prompt)
        seq_id, keep = self._pick_id(sequence.prompt)
        self._free_ids.remove(seq_id)
        kept = self._kept.pop(seq_id, [])
        if len(kept) > keep:
            self.ctx.memory_seq_rm(seq_id, keep, -1)
        sequence.seq_id = seq_id
        sequence.cached = list(sequence.prompt[:keep])
        sequence.n_reused = keep
        if keep:  # its first chunk is deep in the context: pace from one chunk again
            self._prompt_rows = self.prompt_budget
        sequence._chunk_ends = deque(end for _, end in prefill_plan(keep, len(sequence.prompt), self.prompt_budget))
        sequence.capacity = self.seq_capacity
        self._running.append(sequence)
        if sequence.max_tokens <= 0:
            self._end(sequence, FinishReason.LENGTH)
        return sequence

    def _pick_id(self, prompt: Sequence[int]) -> Tuple[int, int]:
        """The free id to give ``prompt``, and how many of its tokens that id's cells hold already.

        The longest common prefix wins, generated tokens included; without one, an id that holds
        nothing, else the one freed longest ago, so that the records most recently left are kept
        longest. At least the prompt's last two tokens are left to decode: a lone token takes
        other kernels than a chunk (its logits can differ by hundredths on some CPUs), and with
        flash attention off a chunk of two tokens or more gives each the sums of a fresh read,
        so a repeated prompt, or one sharing an earlier prompt's start, gets a fresh engine's
        logits. Unlike ``LLM``'s reuse this keeps generated tokens too, decoded one at a time
        where a fresh read decodes them in a chunk: a server wants the next turn's speed.
        """
        best, best_keep = -1, 0
        for seq_id in self._free_ids:
            kept = self._kept.get(seq_id)
            if not kept:
                continue
            limit = min(len(kept), len(prompt) - 2)
            n = 0
            while n < limit and kept[n] == prompt[n]:
                n += 1
            if n > best_keep:
                best, best_keep = seq_id, n
        if best >= 0:
            return best, best_keep
        for seq_id in self._free_ids:
            if not self._kept.get(seq_id):
                return seq_id, 0
        return self._free_ids[0], 0

    def cancel(self) -> None:
        """Stop every sequence soon, even inside a running decode; safe from any thread."""
        self.cancellation.request()

    def begin(self) -> None:
        """Forget an earlier cancel: call before the steps of new work start."""
        self.cancellation.begin()

    # -- the step -------------------------------------------------------------------------------
    def step(self) -> None:
        """One decode for all running sequences: each generating one's next token and prompt chunks.

        Sequences that finish leave at the end of the step. A cancel ends them all (CANCELLED).
        """
        cancelled = self.cancellation.is_requested()
        for sequence in [s for s in self._running if s._cancel or cancelled]:
            self._end(sequence, FinishReason.CANCELLED)
        if not self._running:
            return
        n_rows, generating, chunks, pickers = self._fill()
        started = time.perf_counter()
        try:
            self.ctx.decode_rows(self.batch, n_rows, self._tokens, self._positions, self._seq_ids,
                                 self._want_logits, len(pickers), self._pick_rows, self._samplers, self._picked)
        except DecodeAborted:  # a cancel (or Ctrl-C) stopped the decode: everything ends
            for sequence in list(self._running):
                self._end(sequence, FinishReason.CANCELLED)
            return
        if self.step_time is not None and generating:
            if chunks:
                self._pace(n_rows - len(generating), time.perf_counter() - started)
            else:
                self._tokens_only_time = time.perf_counter() - started
        for sequence in generating:  # what the step put in the cache goes on record
            sequence.cached.append(sequence.pending)
            sequence.pending = -1
        for sequence, count in chunks:
            start = len(sequence.cached)
            sequence.cached.extend(sequence.prompt[start:start + count])
        now = time.perf_counter()
        is_eog, piece_bytes = self.ctx.vocab.is_eog, self.ctx.vocab.piece_bytes
        for index, sequence in enumerate(pickers):
            if not sequence.t_prompt_done:
                sequence.t_prompt_done = now
            token = self._picked[index]
            if sequence.logprobs is not None and not is_eog(token):  # on record before its text goes out
                sequence.logprobs.append(self._token_logprob(self._pick_rows[index], token, sequence.n_logprobs))
            sequence._take(token, is_eog, piece_bytes)
        for sequence in [s for s in self._running if s.finished]:
            self._release(sequence)

    def _pace(self, prompt_rows: int, seconds: float) -> None:
        """Scale the prompt rows of the next step by how far this one was from ``step_time``:
        a prompt deeper in the context costs more a token, so the rows shrink as it is read.

        Only the prompt rows' share of a step scales with their number: the generated tokens'
        share (the last step without prompt rows) is taken off both sides, or steps longer than
        ``step_time`` would shrink too little and settle above it."""
        assert self.step_time is not None
        fixed = min(self._tokens_only_time, self.step_time / 2)
        wanted = int(prompt_rows * (self.step_time - fixed) / max(seconds - fixed, 1e-6))
        self._prompt_rows = max(self.prompt_budget, min(wanted, 2 * prompt_rows, self.n_batch))

    def _token_logprob(self, row: int, token: int, n: int) -> "TokenLogprob":
        """The entry of ``token``, picked from batch row ``row`` of the step just decoded."""
        from ._logprobs import token_logprob

        if self._logits_row is None:
            import numpy as np

            self._logits_row = np.empty(self.ctx.vocab.n_tokens, dtype=np.float64)
        return token_logprob(self.ctx.copy_logits(row, self._logits_row), token, n, self.ctx.vocab.piece_bytes)

    def _fill(self) -> Tuple[int, List[EngineSequence], List[Tuple[EngineSequence, int]], List[EngineSequence]]:
        """Write the step's rows into the C arrays: a token of each generating sequence first,
        then prompt chunks, oldest first, within the budget. Returns the row count, the
        generating sequences, the (sequence, rows) of each chunk, and the sequences whose next
        token the step picks (in ``_pick_rows`` order, with their samplers in ``_samplers``)."""
        tokens, positions, seq_ids, want = self._tokens, self._positions, self._seq_ids, self._want_logits
        generating = [s for s in self._running if s.pending >= 0]
        pickers = list(generating)
        for n, sequence in enumerate(generating):
            tokens[n] = sequence.pending
            positions[n] = len(sequence.cached)
            seq_ids[n] = sequence.seq_id
            want[n] = 1
            self._pick_rows[n] = n
        n = len(generating)
        chunks: List[Tuple[EngineSequence, int]] = []
        # The budget keeps generating sequences from waiting; a step with none reads what fits.
        budget = min(self._prompt_rows if generating or not self._merge_chunks else self.n_batch, self.n_batch - n)
        for sequence in self._running:
            start = len(sequence.cached)
            if budget <= 0 or sequence.pending >= 0 or start >= len(sequence.prompt):
                continue
            # The chunk ends where the prompt's plan says, so that the split is the same whatever
            # else runs; it waits if it does not fit, unless the step has no prompt rows yet (a
            # step always makes progress).
            while sequence._chunk_ends and sequence._chunk_ends[0] <= start:
                sequence._chunk_ends.popleft()
            end = sequence._chunk_ends[0] if sequence._chunk_ends else len(sequence.prompt)
            if self._merge_chunks:  # whole chunks of the plan, as many as fit
                for later in sequence._chunk_ends:
                    if later - start > budget:
                        break
                    end = later
            count = end - start
            if count > budget:
                if chunks:
                    continue
                count = budget
            ffi.memmove(tokens + n, array("i", sequence.prompt[start:start + count]), 4 * count)
            ffi.memmove(positions + n, array("i", range(start, start + count)), 4 * count)
            ffi.memmove(seq_ids + n, array("i", [sequence.seq_id]) * count, 4 * count)
            ffi.memmove(want + n, bytes(count), count)
            n += count
            budget -= count
            chunks.append((sequence, count))
            if start + count == len(sequence.prompt):  # the prompt's last row: pick its first token
                want[n - 1] = 1
                self._pick_rows[len(pickers)] = n - 1
                pickers.append(sequence)
        for index, sequence in enumerate(pickers):  # a greedy chain's choice is the argmax, made in C
            self._samplers[index] = ffi.NULL if sequence.sampler.greedy_only else sequence.sampler.ptr
        return n, generating, chunks, pickers

    def run(self) -> None:
        """Step until every running sequence has finished."""
        while self._running:
            self.step()

    # -- bookkeeping --------------------------------------------------------------------------------
    def drop(self, sequence: EngineSequence) -> None:
        """End ``sequence`` now (cancelled) and free its cells; from the stepping thread only."""
        if sequence in self._running:
            self._end(sequence, FinishReason.CANCELLED)

    def _end(self, sequence: EngineSequence, reason: FinishReason) -> None:
        if not sequence.finished:
            sequence._finish(reason)
        self._release(sequence)

    def _release(self, sequence: EngineSequence) -> None:
        """The sequence leaves: its id is free for the next one, and its cells too, unless
        ``keep_prefixes`` keeps what a finished (not cancelled) sequence left in them."""
        self._running.remove(sequence)
        if self.keep_prefixes and sequence.finish_reason is not FinishReason.CANCELLED and sequence.cached:
            self._kept[sequence.seq_id] = list(sequence.cached)
        else:
            self._kept.pop(sequence.seq_id, None)
            try:
                self.ctx.memory_seq_rm(sequence.seq_id, -1, -1)
            except ClosedError:
                pass
        self._free_ids.append(sequence.seq_id)

    def forget(self) -> None:
        """Empty the cells every free sequence id kept (``keep_prefixes``); stepping thread only."""
        for seq_id in list(self._kept):
            del self._kept[seq_id]
            self.ctx.memory_seq_rm(seq_id, -1, -1)

    def close(self) -> None:
        for sequence in list(self._running):
            self._end(sequence, FinishReason.CANCELLED)
        self.cancellation.attach(None)
        self.ctx.close()
        self.batch.close()
