"""The saved-state format on its own: every truncation and every bit flip is refused."""

from __future__ import annotations

import pytest

from cyllama_cffi._state_format import decode, encode
from cyllama_cffi.errors import LlamaError, StateError

HEADER = {"model": {"n_vocab": 10}, "n_ctx": 256, "n_prefilled": 2}


def test_round_trip():
    data = encode(HEADER, [1, 2, 3], b"body bytes")
    saved = decode(data)
    assert saved.header == HEADER and saved.tokens == [1, 2, 3] and saved.body == b"body bytes"
    assert issubclass(StateError, ValueError) and issubclass(StateError, LlamaError)


def test_every_truncation_and_every_bit_flip_is_refused():
    data = encode(HEADER, [5, 6], b"\x00\x01" * 20)
    for cut in range(len(data)):
        with pytest.raises(StateError):
            decode(data[:cut])
    for index in range(len(data)):
        for bit in range(8):
            mutant = bytearray(data)
            mutant[index] ^= 1 << bit
            with pytest.raises(StateError):
                decode(bytes(mutant))


@pytest.mark.parametrize("header", [{"n_ctx": 1}, {"model": {}, "n_ctx": "1"}, {"model": [], "n_ctx": 1}, [1]])
def test_a_header_without_identity_or_context_size_is_refused(header):
    with pytest.raises(StateError, match="lacks"):
        decode(encode(header, [], b""))
