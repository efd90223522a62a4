"""``LlamaVocab``: tokenizer of a model (borrowed pointer; the model owns it).

Every token id is range-checked here: llama.cpp aborts the process for an id
outside ``[0, n_vocab)`` in ``llama_token_to_piece`` / ``llama_vocab_get_text``.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING, Dict, Iterable, List, Sequence, Union

from .._ffi import ffi, lib

if TYPE_CHECKING:
    from .model import LlamaModel

_INT32_MIN = -(2 ** 31)


def check_token_ids(tokens: Sequence[int], n_vocab: int) -> None:
    """Raise ``ValueError`` for the first id outside ``[0, n_vocab)``.

    The one range check of the package: llama.cpp aborts the process for such ids when it
    detokenizes or samples them, and rejects them only inside ``llama_decode`` otherwise.
    """
    if tokens and (min(tokens) < 0 or max(tokens) >= n_vocab):
        raise out_of_vocabulary(next(t for t in tokens if not 0 <= t < n_vocab), n_vocab)


def out_of_vocabulary(token: int, n_vocab: int) -> ValueError:
    """The error for one token id outside the vocabulary (for hot paths that compare inline)."""
    return ValueError(f"token id {token} is outside the vocabulary [0, {n_vocab})")


class LlamaVocab:
    """Tokenize, detokenize and inspect tokens of a model's vocabulary."""

    def __init__(self, model: "LlamaModel") -> None:
        self._model = model
        self.n_tokens = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model.ptr))
        # Memos for the generation loop (a vocabulary never changes): after a token is seen once,
        # its bytes and end-of-generation flag cost a dict lookup, not C calls and a buffer.
        self._pieces: Dict[int, bytes] = {}
        self._eog: Dict[int, bool] = {}

    @property
    def ptr(self):
        # Through the model each time, so a closed model gives ClosedError, not a crash.
        return lib.llama_model_get_vocab(self._model.ptr)

    def __len__(self) -> int:
        return self.n_tokens

    # -- special tokens ---------------------------------------------------
    @property
    def bos(self) -> int:
        return lib.llama_vocab_bos(self.ptr)

    @property
    def eos(self) -> int:
        return lib.llama_vocab_eos(self.ptr)

    @property
    def eot(self) -> int:
        return lib.llama_vocab_eot(self.ptr)

    @property
    def nl(self) -> int:
        return lib.llama_vocab_nl(self.ptr)

    @property
    def add_bos(self) -> bool:
        return bool(lib.llama_vocab_get_add_bos(self.ptr))

    @property
    def add_eos(self) -> bool:
        return bool(lib.llama_vocab_get_add_eos(self.ptr))

    @property
    def vocab_type(self) -> int:
        return lib.llama_vocab_type(self.ptr)

    def check_token(self, token: int) -> int:
        """Return ``token`` as int if it is a valid id, else raise ``ValueError``."""
        token = int(token)
        if not 0 <= token < self.n_tokens:
            raise out_of_vocabulary(token, self.n_tokens)
        return token

    def check_tokens(self, tokens: Iterable[int]) -> "array[int]":
        """Tokens as a contiguous int32 array, all ids checked."""
        values = [int(t) for t in tokens]
        check_token_ids(values, self.n_tokens)
        return array("i", values)

    def is_eog(self, token: int) -> bool:
        try:
            return self._eog[token]
        except KeyError:
            value = self._eog[token] = bool(lib.llama_vocab_is_eog(self.ptr, self.check_token(token)))
            return value

    def is_control(self, token: int) -> bool:
        return bool(lib.llama_vocab_is_control(self.ptr, self.check_token(token)))

    def get_text(self, token: int) -> str:
        text = lib.llama_vocab_get_text(self.ptr, self.check_token(token))
        return ffi.string(text).decode("utf-8", "replace")

    def get_score(self, token: int) -> float:
        return lib.llama_vocab_get_score(self.ptr, self.check_token(token))

    # -- text <-> tokens --------------------------------------------------
    def tokenize(self, text: Union[str, bytes], add_special: bool = True, parse_special: bool = False) -> List[int]:
        """Text to token ids. ``add_special`` adds BOS/EOS as the model wants them.

        ``bytes`` must be valid UTF-8 (``UnicodeDecodeError`` otherwise): some
        invalid sequences make llama.cpp throw a C++ exception that aborts the process.
        """
        if isinstance(text, str):
            data = text.encode("utf-8")
        else:
            data = bytes(text)
            data.decode("utf-8")  # strict: raises UnicodeDecodeError (a ValueError) on invalid input
        if len(data) >= 2 ** 31 - 1:
            raise ValueError("text too long to tokenize (more than 2 GiB)")
        capacity = len(data) + 8
        vocab = self.ptr
        while True:
            buffer = ffi.new("llama_token[]", capacity)
            count = lib.llama_tokenize(vocab, data, len(data), buffer, capacity, add_special, parse_special)
            if count == _INT32_MIN:
                raise ValueError("tokenization overflowed int32")
            if count >= 0:
                return list(ffi.unpack(buffer, count))
            capacity = -count

    def piece_bytes(self, token: int) -> bytes:
        """``token_to_bytes(token)``, memoised: the generation loop's per-token call."""
        try:
            return self._pieces[token]
        except KeyError:
            data = self._pieces[token] = self.token_to_bytes(token)
            return data

    def token_to_bytes(self, token: int, special: bool = False, lstrip: int = 0) -> bytes:
        """The raw bytes of one token (may be part of a multi-byte character)."""
        vocab = self.ptr
        token = self.check_token(token)
        buffer = ffi.new("char[]", 64)
        length = lib.llama_token_to_piece(vocab, token, buffer, 64, lstrip, special)
        if length < 0:
            buffer = ffi.new("char[]", -length)
            length = lib.llama_token_to_piece(vocab, token, buffer, -length, lstrip, special)
        return ffi.buffer(buffer, length)[:]

    def token_to_piece(self, token: int, special: bool = False, lstrip: int = 0) -> str:
        """One token as text (a partial UTF-8 sequence shows as U+FFFD)."""
        return self.token_to_bytes(token, special, lstrip).decode("utf-8", "replace")

    def detokenize_bytes(self, tokens: Iterable[int], remove_special: bool = False,
                         unparse_special: bool = False) -> bytes:
        values = self.check_tokens(tokens)
        vocab = self.ptr
        count = len(values)
        token_buffer = ffi.new("llama_token[]", count) if count else ffi.NULL
        if count:
            ffi.memmove(token_buffer, values, 4 * count)
        capacity = max(16, count * 8)
        while True:
            text = ffi.new("char[]", capacity)
            length = lib.llama_detokenize(vocab, token_buffer, count, text, capacity,
                                          remove_special, unparse_special)
            if length >= 0:
                return ffi.buffer(text, length)[:]
            capacity = -length

    def detokenize(self, tokens: Iterable[int], remove_special: bool = False, unparse_special: bool = False) -> str:
        """Token ids to text; invalid UTF-8 (a cut multi-byte character) shows as U+FFFD."""
        return self.detokenize_bytes(tokens, remove_special, unparse_special).decode("utf-8", "replace")
