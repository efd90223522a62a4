"""Hand-made GGUF bytes, well-formed or broken on purpose, for the header checks.

Nothing here knows what the checker accepts: it writes exactly the fields it is given, in the
GGUF layout (little-endian; header, key/values, tensor infos, padding, data).
"""

from __future__ import annotations

import struct
from typing import Iterable, List, Optional, Sequence, Tuple, Union

UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_FORMATS = {UINT8: "B", INT8: "b", UINT16: "H", INT16: "h", UINT32: "I", INT32: "i", FLOAT32: "f", BOOL: "?",
            UINT64: "Q", INT64: "q", FLOAT64: "d"}

KeyValue = Union[bytes, Tuple[Union[str, bytes], int, object]]


def string(text: Union[str, bytes]) -> bytes:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def value(value_type: int, content: object) -> bytes:
    if value_type in _FORMATS:
        return struct.pack("<" + _FORMATS[value_type], content)
    if value_type == STRING:
        return string(content)  # type: ignore[arg-type]
    if value_type == ARRAY:
        element_type, items = content  # type: ignore[misc]
        return struct.pack("<IQ", element_type, len(items)) + b"".join(value(element_type, i) for i in items)
    raise ValueError(f"no encoding for value type {value_type}")


def key_value(key: Union[str, bytes], value_type: int, content: object) -> bytes:
    return string(key) + struct.pack("<I", value_type) + value(value_type, content)


def tensor_info(name: Union[str, bytes], dims: Sequence[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    return (string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<q", d) for d in dims)
            + struct.pack("<IQ", ggml_type, offset))


def header(n_tensors: int, n_kv: int, version: int = 3, magic: bytes = b"GGUF") -> bytes:
    return magic + struct.pack("<IQQ", version, n_tensors, n_kv)


def gguf(kvs: Iterable[KeyValue] = (), tensors: Iterable[bytes] = (), *, version: int = 3, magic: bytes = b"GGUF",
         n_kv: Optional[int] = None, n_tensors: Optional[int] = None, alignment: int = 32,
         data: bytes = b"") -> bytes:
    """A file: counts default to the items given; padding to ``alignment`` only before ``data``."""
    kv_bytes: List[bytes] = [kv if isinstance(kv, bytes) else key_value(*kv) for kv in kvs]
    tensor_bytes = list(tensors)
    out = header(len(tensor_bytes) if n_tensors is None else n_tensors,
                 len(kv_bytes) if n_kv is None else n_kv, version, magic)
    out += b"".join(kv_bytes) + b"".join(tensor_bytes)
    if data:
        out += b"\0" * (-len(out) % alignment) + data
    return out


def spm_tokens() -> List[str]:
    """A SentencePiece vocabulary llama.cpp can tokenize any text with: specials and 256 bytes."""
    return ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
