"""``KVSequence``: one sequence of a context's KV cache, and the record of what it holds.

The record (``tokens``) is what lets a generation know what is in the cache without asking
llama.cpp: the prompt, then every generated token whose decode returned. Whoever decodes into
the sequence updates the record right after the decode (a prompt chunk on its helper thread,
a generated token in the token loop); an exception in between leaves a cell the record does
not list, and :meth:`settle`, called before each generation, cuts it off. A prompt chunk that its
stream stopped waiting for (a cancel, a ``KeyboardInterrupt``) is left running here:
:meth:`settle` waits for it before anyone touches the context again.
"""

from __future__ import annotations

import threading
from typing import List, Optional, Sequence

from ._background import Job
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
        self._running: Optional[Job] = None
        self._running_thread: Optional[threading.Thread] = None

    def decode_chunk(self, tokens: Sequence[int], logits_last: bool) -> None:
        """Decode ``tokens`` at the end of the sequence and put what reached the cache on record."""
        start = len(self.tokens)
        self.batch.set_tokens(tokens, start, self.seq_id, logits_last=logits_last)
        try:
            self.ctx.decode(self.batch)
        except DecodeAborted as aborted:  # the ubatches that completed stay in the cache
            self.tokens.extend(tokens[:max(0, aborted.n_past - start)])
            raise
        except BaseException:
            self.sync()
            raise
        self.tokens.extend(tokens)

    def clear(self) -> None:
        """Empty the sequence (its cache cells and its record)."""
        self.settle()
        self.ctx.memory_seq_rm(self.seq_id, -1, -1)
        self.tokens = []

    def sync(self) -> None:
        """Cut the cache back to the record, unless a decode left running still owns it."""
        if self._running is None:
            self.ctx.memory_seq_rm(self.seq_id, len(self.tokens), -1)

    def leave_running(self, job: Job, thread: Optional[threading.Thread]) -> None:
        """A prompt chunk's decode goes on without its stream; :meth:`settle` waits for it."""
        self._running, self._running_thread = job, thread

    def settle(self) -> None:
        """Make the cache match the record: wait for a decode left running (at most one graph
        node after a cancel), then cut off what is not on record."""
        job, thread = self._running, self._running_thread
        if job is not None:
            job.done.wait()
            if thread is not None and thread is not threading.current_thread():
                thread.join()  # its OpenMP pool goes with it (see _background.HelperThread)
            self._running = self._running_thread = None
        self.sync()  # an exception between a decode and its record left a cell off the record
