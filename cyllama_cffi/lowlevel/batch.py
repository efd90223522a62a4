"""``LlamaBatch``: owns the C arrays of one ``llama_batch`` (``llama_batch_init``).

Filling a prefill chunk is one ``memmove`` per array (from an ``array('i')``),
and the single-token batch of the generation loop is reused without any
allocation. numpy is deliberately not used here: importing it would double
the package's import time. The arrays live as long as the batch object;
``LlamaContext.decode`` keeps the batch referenced while it runs.
"""

from __future__ import annotations

from array import array
from typing import Sequence

from .._ffi import ffi, lib
from ._handle import CHandle


def _free_batch(holder) -> None:
    lib.llama_batch_free(holder[0])


class LlamaBatch(CHandle):
    """A token batch with room for ``capacity`` tokens, each in up to ``n_seq_max`` sequences."""

    _kind = "batch"

    def __init__(self, capacity: int, n_seq_max: int = 1) -> None:
        if capacity <= 0:
            raise ValueError(f"batch capacity must be positive, got {capacity}")
        if n_seq_max <= 0:
            raise ValueError(f"n_seq_max must be positive, got {n_seq_max}")
        holder = ffi.new("struct llama_batch *", lib.llama_batch_init(capacity, 0, n_seq_max))
        if holder.token == ffi.NULL:
            raise MemoryError("llama_batch_init failed")
        super().__init__(holder, _free_batch)
        self.capacity = capacity
        self.n_seq_max = n_seq_max
        ffi.memmove(holder.n_seq_id, array("i", [1]) * capacity, 4 * capacity)
        for index in range(capacity):
            holder.seq_id[index][0] = 0
        self._default_seq = True

    @property
    def n_tokens(self) -> int:
        return self.ptr.n_tokens

    def clear(self) -> None:
        self.ptr.n_tokens = 0

    def set_tokens(self, tokens: Sequence[int], start_pos: int, seq_id: int = 0,
                   logits_last: bool = True) -> None:
        """Fill the batch with consecutive positions of one sequence (a prefill chunk)."""
        holder = self.ptr
        count = len(tokens)
        if count > self.capacity:
            raise ValueError(f"{count} tokens do not fit a batch of capacity {self.capacity}")
        try:
            values = array("i", tokens)
        except OverflowError:
            raise ValueError("token ids must fit in int32") from None
        ffi.memmove(holder.token, values, 4 * count)
        ffi.memmove(holder.pos, array("i", range(start_pos, start_pos + count)), 4 * count)
        ffi.memmove(holder.logits, bytes(count), count)
        if count and logits_last:
            holder.logits[count - 1] = 1
        self._use_single_sequence(holder, seq_id, count)
        holder.n_tokens = count

    def set_single(self, token: int, pos: int) -> None:
        """The generation-loop fast path: one token of sequence 0, with logits."""
        holder = self.ptr
        if not self._default_seq:
            self._use_single_sequence(holder, 0, self.capacity)
        holder.token[0] = token
        holder.pos[0] = pos
        holder.logits[0] = 1
        holder.n_tokens = 1

    def add(self, token: int, pos: int, seq_ids: Sequence[int] = (0,), logits: bool = False) -> None:
        """Append one token (general form: any positions and sequences)."""
        holder = self.ptr
        index = holder.n_tokens
        if index >= self.capacity:
            raise IndexError(f"batch is full ({self.capacity} tokens)")
        if not 1 <= len(seq_ids) <= self.n_seq_max:
            raise ValueError(f"a token belongs to 1..{self.n_seq_max} sequences, got {len(seq_ids)}")
        holder.token[index] = token
        holder.pos[index] = pos
        holder.n_seq_id[index] = len(seq_ids)
        for slot, seq in enumerate(seq_ids):
            holder.seq_id[index][slot] = seq
        holder.logits[index] = 1 if logits else 0
        holder.n_tokens = index + 1
        if len(seq_ids) != 1 or seq_ids[0] != 0:
            self._default_seq = False

    def token_list(self) -> list:
        """The token ids currently in the batch."""
        holder = self.ptr
        return ffi.unpack(holder.token, holder.n_tokens)

    def logit_rows(self) -> list:
        """Indices of the rows whose logits will be computed."""
        holder = self.ptr
        flags = ffi.unpack(holder.logits, holder.n_tokens)
        return [index for index, flag in enumerate(flags) if flag]

    def _use_single_sequence(self, holder, seq_id: int, count: int) -> None:
        if seq_id == 0 and self._default_seq:
            return
        ffi.memmove(holder.n_seq_id, array("i", [1]) * count, 4 * count)
        for index in range(count):
            holder.seq_id[index][0] = seq_id
        self._default_seq = seq_id == 0 and count == self.capacity
