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

from typing import List, Optional, Sequence

from ._background import HelperThread
from .errors import DecodeAborted
from .lowlevel.batch import LlamaBatch
from .lowlevel.context import LlamaContext


class KVSequence:
    """Sequence ``seq_id`` of ``ctx``: its token record, its batch, and a decode left running."""

    def __init__(self, ctx: LlamaContext, batch: LlamaBatch, seq_id: int = 0) -> None:
        self.ctx = ctx
        self.batch = batch
        self.seq_id = seq_id
        self.tokens: List[int] = []  # tokens whose K/V are in the cache, in position order
        # How many of them, from the start, were decoded as prompt chunks. Only those are reused:
        # a generated token's K/V come from a one-token decode, whose sums differ in the last
        # bits from a prompt chunk's, and greedy output after them was measured to differ.
        self.n_prefilled = 0
        self._helper: Optional[HelperThread] = None  # decodes the prompt's chunks; see settle()

    def decode_chunk(self, tokens: Sequence[int], logits_last: bool) -> None:
        """Decode ``tokens`` at the end of the sequence and put what reached the cache on record."""
        start = len(self.tokens)
        self.batch.set_tokens(tokens, start, self.seq_id, logits_last=logits_last)
        try:
            self.ctx.decode(self.batch)
        except DecodeAborted as aborted:  # the ubatches that completed stay in the cache
            self.tokens.extend(tokens[:max(0, aborted.n_past - start)])
            self._prefilled(start)
            raise
        self.tokens.extend(tokens)
        self._prefilled(start)

    def _prefilled(self, start: int) -> None:
        if self.n_prefilled == start:  # contiguous with the prompt chunks before it
            self.n_prefilled = len(self.tokens)

    def clear(self) -> None:
        """Empty the sequence (its cache cells and its record)."""
        self.settle()
        self.ctx.memory_seq_rm(self.seq_id, -1, -1)
        self.tokens = []
        self.n_prefilled = 0

    def keep_prefix(self, prompt: Sequence[int]) -> int:
        """Keep the longest prefix of the cache that ``prompt`` starts with; cut the rest. Returns its length.

        At least the prompt's last token is left to decode (its logits pick the first token).
        Only what a fresh context would compute the same way is kept, so that greedy output is
        the same token for token: tokens decoded as prompt chunks (``n_prefilled``), cut to a
        multiple of the micro-batch size, so that the rest is decoded in the same micro-batches
        as from an empty cache (llama.cpp's sums depend on the split; see ``docs/state.md``).
        """
        self.settle()
        record = self.tokens
        limit = min(self.n_prefilled, len(prompt) - 1)
        keep = 0
        while keep < limit and record[keep] == prompt[keep]:
            keep += 1
        keep -= keep % max(1, min(self.ctx.n_ubatch, self.ctx.n_batch))  # prefill()'s step
        if keep < len(record):
            self.ctx.memory_seq_rm(self.seq_id, keep, -1)
            del record[keep:]
        self.n_prefilled = keep
        return keep

    def sync(self) -> None:
        """Cut the cache back to the record, unless a prompt chunk may still be decoding."""
        if self._helper is None:
            self.ctx.memory_seq_rm(self.seq_id, len(self.tokens), -1)
            self.n_prefilled = min(self.n_prefilled, len(self.tokens))

    def start_helper(self) -> HelperThread:
        """A helper thread for the prompt's chunks, on record here before it runs anything."""
        self._join_helper()
        helper = self._helper = HelperThread()
        return helper

    def end_helper(self, wait: bool) -> None:
        """The prompt is done with its helper: ``wait`` joins it now (nothing left running);
        otherwise its thread ends after the chunk it decodes and :meth:`settle` joins it."""
        if wait:
            self._join_helper()
        elif self._helper is not None:
            self._helper.stop()

    def settle(self) -> None:
        """Make the cache match the record before anyone else uses the context.

        A chunk left decoding is stopped (the C flag: at most one graph node) and waited for;
        a busy lock that an interrupted call left held is released (nothing else can use the
        context now); then what is not on record is cut off.
        """
        if self._helper is not None and self._helper.is_alive():
            self.ctx.cancel = True  # its result is not wanted; the next generation clears the flag
        self._join_helper()
        self.ctx.release_stale_busy()
        self.sync()

    def _join_helper(self) -> None:
        helper = self._helper
        if helper is not None:
            helper.join()
            self._helper = None
