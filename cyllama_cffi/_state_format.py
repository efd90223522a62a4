"""The saved-state file format: our header, the token record, llama.cpp's sequence data.

Layout (little-endian)::

    b"CYLSTATE"            8 bytes, magic
    version                u32 (1)
    header_len             u32, then that many bytes of JSON (model identity, context size)
    n_tokens               u32, then n_tokens int32 token ids (the sequence's record)
    body_len               u64, then that many bytes from llama_state_seq_get_data
    sha256                 32 bytes over everything before it

Why a checksum over everything: llama.cpp checks much of its own data but can still abort on
some corrupt bodies, and it clears the sequence before it finds a problem. A state whose bytes
are not exactly those written is refused here, before llama.cpp sees anything. Pure Python: no
compiled module needed.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, Dict, List, NamedTuple, Sequence

from .errors import StateError

MAGIC = b"CYLSTATE"
VERSION = 1
_DIGEST = 32
_MAX_HEADER = 1 << 16


class SavedState(NamedTuple):
    header: Dict[str, Any]   # "model": identity dict, "n_ctx": the context's size when saved
    tokens: List[int]        # what the sequence's cache holds, in position order
    body: bytes              # llama.cpp's sequence data


def encode(header: Dict[str, Any], tokens: Sequence[int], body: bytes) -> bytes:
    head = json.dumps(header, sort_keys=True).encode("utf-8")
    parts = [MAGIC, struct.pack("<II", VERSION, len(head)), head,
             struct.pack("<I", len(tokens)), struct.pack(f"<{len(tokens)}i", *tokens),
             struct.pack("<Q", len(body)), body]
    data = b"".join(parts)
    return data + hashlib.sha256(data).digest()


def decode(data: bytes) -> SavedState:
    """Parse and check a saved state; :class:`StateError` (a ``ValueError``) names what is wrong."""
    view = memoryview(data)
    if len(view) < len(MAGIC) or bytes(view[:len(MAGIC)]) != MAGIC:
        raise StateError("not a saved state of this package (wrong magic bytes)")
    if len(view) < len(MAGIC) + 8 + _DIGEST:
        raise StateError(f"the saved state is truncated ({len(view)} bytes)")
    if hashlib.sha256(view[:-_DIGEST]).digest() != bytes(view[-_DIGEST:]):
        raise StateError("the saved state is corrupted or truncated (its checksum does not match)")
    end = len(view) - _DIGEST
    offset = len(MAGIC)
    version, head_len = struct.unpack_from("<II", view, offset)
    offset += 8
    if version != VERSION:
        raise StateError(f"saved state version {version} is not supported (this package reads {VERSION})")
    if head_len > _MAX_HEADER or offset + head_len + 4 > end:
        raise StateError("the saved state's header length is out of range")
    try:
        header = json.loads(bytes(view[offset:offset + head_len]).decode("utf-8"))
    except ValueError as error:
        raise StateError(f"the saved state's header is not valid JSON: {error}") from None
    if not isinstance(header, dict) or not isinstance(header.get("model"), dict) \
            or not _is_int(header.get("n_ctx")):
        raise StateError("the saved state's header lacks the model identity or the context size")
    offset += head_len
    (n_tokens,) = struct.unpack_from("<I", view, offset)
    offset += 4
    if offset + 4 * n_tokens + 8 > end:
        raise StateError(f"the saved state's token count ({n_tokens}) is out of range")
    tokens = list(struct.unpack_from(f"<{n_tokens}i", view, offset))
    offset += 4 * n_tokens
    (body_len,) = struct.unpack_from("<Q", view, offset)
    offset += 8
    if offset + body_len != end:
        raise StateError(f"the saved state's data length ({body_len}) does not match its size")
    return SavedState(header, tokens, bytes(view[offset:end]))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
