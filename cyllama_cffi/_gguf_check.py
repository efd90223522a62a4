"""Validate a GGUF file's structure in Python before llama.cpp opens it.

llama.cpp checks many things itself, but some malformed files still take the
process down; a binding embedded in a server cannot allow that. This walks the
header (magic, version, counts), every metadata key/value and every tensor
descriptor, checking each length and offset against the real file size, and
raises ``InvalidGGUFError`` (a ``ValueError``) naming the first problem.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import Dict, List, NamedTuple, Tuple, Union

from .errors import InvalidGGUFError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_NAME = 64  # GGML_MAX_NAME, including the terminating NUL
MAX_DIMS = 4
TENSOR_ALIGNMENT = 32  # ggml-backend's TENSOR_ALIGNMENT: mapped tensor data must start on it

# GGUF value types -> struct format of one scalar (None: variable length)
_SCALARS: Dict[int, str] = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
                            10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


class _Array(NamedTuple):
    """An array value: its element type, length and where its elements start."""

    element_type: int
    count: int
    start: int


class TensorInfo(NamedTuple):
    """One tensor descriptor: name, ggml dims (``ne[0]`` first), ggml type, data offset."""

    name: str
    dims: Tuple[int, ...]
    ggml_type: int
    offset: int


class GGUFInfo(NamedTuple):
    """What :func:`inspect_gguf` read: the summary, the metadata and the tensor descriptors.

    ``metadata`` maps each key to ``(value type, value)``: scalars as Python values, strings as
    bytes; array values only say their element type and length (their data is not kept).
    """

    summary: Dict[str, object]
    metadata: Dict[str, Tuple[int, object]]
    tensors: List[TensorInfo]


class _Reader:
    def __init__(self, data: Union[bytes, mmap.mmap], path: str) -> None:
        self.data = data
        self.size = len(data)
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> InvalidGGUFError:
        return InvalidGGUFError(f"{self.path}: {what} (at byte {self.pos} of {self.size})")

    def need(self, count: int, what: str) -> None:
        if count < 0 or self.pos + count > self.size:
            raise self.fail(f"truncated: {what} needs {count} bytes")

    def scalar(self, fmt: str, what: str):
        width = struct.calcsize("<" + fmt)
        self.need(width, what)
        (value,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += width
        return value

    def string(self, what: str) -> bytes:
        length = self.scalar("Q", f"length of {what}")
        self.need(length, what)
        value = bytes(self.data[self.pos:self.pos + length])
        self.pos += length
        return value


def _skip_value(reader: _Reader, value_type: int, key: str, depth: int = 0) -> object:
    if value_type in _SCALARS:
        return reader.scalar(_SCALARS[value_type], f"value of {key}")
    if value_type == _STRING:
        return reader.string(f"value of {key}")
    if value_type == _ARRAY:
        if depth > 0:
            raise reader.fail(f"nested array in {key}")
        element_type = reader.scalar("I", f"array type of {key}")
        count = reader.scalar("Q", f"array length of {key}")
        array = _Array(element_type, count, reader.pos)
        if element_type in _SCALARS:
            width = struct.calcsize("<" + _SCALARS[element_type])
            if count > (reader.size - reader.pos) // max(width, 1):
                raise reader.fail(f"array {key} claims {count} elements, more than the file holds")
            reader.pos += count * width
        elif element_type == _STRING:
            if count > (reader.size - reader.pos) // 8:
                raise reader.fail(f"array {key} claims {count} strings, more than the file holds")
            # the hot loop of the check (a vocabulary has 10^5 strings): no helper calls
            unpack, data, size, pos = _U64.unpack_from, reader.data, reader.size, reader.pos
            for _ in range(count):
                if pos + 8 > size:
                    reader.pos = pos
                    raise reader.fail(f"truncated: string length in {key} needs 8 bytes")
                (length,) = unpack(data, pos)
                pos += 8
                if pos + length > size:
                    reader.pos = pos
                    raise reader.fail(f"truncated: string in {key} needs {length} bytes")
                pos += length
            reader.pos = pos
        else:
            raise reader.fail(f"array {key} has invalid element type {element_type}")
        return array
    raise reader.fail(f"key {key} has invalid value type {value_type}")


def _tensor_nbytes(ggml_type: int, dims: Tuple[int, ...], name: str, reader: _Reader) -> int:
    from ._ffi import ffi, lib  # the type table lives in ggml
    from .system import cpu_can_compute

    if not 0 <= ggml_type < lib.GGML_TYPE_COUNT:
        raise reader.fail(f"tensor {name} has invalid type {ggml_type}")
    block = lib.ggml_blck_size(ggml_type)
    type_size = lib.ggml_type_size(ggml_type)
    if block <= 0 or type_size <= 0:
        raise reader.fail(f"tensor {name} uses removed type {ggml_type}")
    if not cpu_can_compute(ggml_type):
        # I8..I64, F64, Q8_1, Q8_K: llama.cpp loads them, then the first decode
        # segfaults or aborts in the CPU backend, which cannot compute with them.
        type_name = ffi.string(lib.ggml_type_name(ggml_type)).decode()
        raise reader.fail(f"tensor {name} has type {type_name}, which llama.cpp cannot compute with")
    if dims[0] % block:
        raise reader.fail(f"tensor {name}: first dimension {dims[0]} is not a multiple of block size {block}")
    nbytes = dims[0] // block * type_size
    for dim in dims[1:]:
        nbytes *= dim
    return nbytes


def check_gguf(path: Union[str, os.PathLike]) -> Dict[str, object]:
    """Raise ``InvalidGGUFError`` unless ``path`` is a structurally sound GGUF file.

    Returns a small summary (version, tensor and key counts). Callers should
    check existence and type first to give ``FileNotFoundError`` and friends.
    """
    return inspect_gguf(path).summary


def inspect_gguf(path: Union[str, os.PathLike], semantics: bool = True) -> GGUFInfo:
    """``check_gguf``, returning the metadata and tensor descriptors it read as well.

    ``semantics=False`` skips the model-value rules of ``_gguf_semantics`` (for a file that
    only the tensor shapes are wanted from, such as a model an adapter is checked against).
    """
    display = str(path)
    size = Path(path).stat().st_size
    if size < 24:
        raise InvalidGGUFError(f"{display}: not a GGUF file ({size} bytes, too short for a GGUF header)")
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            return _check(_Reader(mapped, display), semantics)
        finally:
            mapped.close()


def _check(reader: _Reader, semantics: bool) -> GGUFInfo:
    magic = bytes(reader.data[0:4])
    if magic != GGUF_MAGIC:
        raise InvalidGGUFError(f"{reader.path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    reader.pos = 4
    version = reader.scalar("I", "version")
    if version not in SUPPORTED_VERSIONS:
        raise reader.fail(f"unsupported GGUF version {version}")
    n_tensors = reader.scalar("Q", "tensor count")
    n_kv = reader.scalar("Q", "metadata count")
    # every key/value needs >= 8+4+1 bytes, every tensor info >= 8+4+4+8 bytes
    if n_kv > reader.size // 13 or n_tensors > reader.size // 24:
        raise reader.fail(f"counts too large for the file: {n_tensors} tensors, {n_kv} keys")

    alignment = DEFAULT_ALIGNMENT
    keys = set()
    metadata: Dict[str, Tuple[int, object]] = {}
    for _ in range(n_kv):
        key = reader.string("metadata key")
        try:
            key_text = key.decode("utf-8")
        except UnicodeDecodeError:
            raise reader.fail(f"metadata key {key!r} is not UTF-8") from None
        if key_text in keys:
            raise reader.fail(f"duplicate metadata key {key_text}")
        keys.add(key_text)
        value_type = reader.scalar("I", f"type of {key_text}")
        value = _skip_value(reader, value_type, key_text)
        # llama.cpp looks keys up as C strings: "a\0b" answers for "a", and the first one wins
        metadata.setdefault(key_text.split("\0", 1)[0], (value_type, value))
        if key_text == "general.alignment":
            if value_type != 4 or not isinstance(value, int) or value == 0 or value & (value - 1):
                raise reader.fail(f"general.alignment must be a power-of-two uint32, got {value!r}")
            alignment = value

    tensors = []
    names = set()
    for _ in range(n_tensors):
        name_bytes = reader.string("tensor name")
        name = name_bytes.decode("utf-8", "replace")
        if len(name_bytes) >= MAX_NAME:
            raise reader.fail(f"tensor name {name!r} is longer than {MAX_NAME - 1} bytes")
        if name in names:
            raise reader.fail(f"duplicate tensor {name}")
        names.add(name)
        n_dims = reader.scalar("I", f"dimension count of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise reader.fail(f"tensor {name} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
        dims = tuple(reader.scalar("q", f"dimension of {name}") for _ in range(n_dims))
        if any(d < 0 for d in dims):
            raise reader.fail(f"tensor {name} has a negative dimension {dims}")
        ggml_type = reader.scalar("I", f"type of {name}")
        offset = reader.scalar("Q", f"offset of {name}")
        tensors.append(TensorInfo(name, dims, ggml_type, offset))

    data_start = -(-reader.pos // alignment) * alignment
    data_size = reader.size - data_start
    if n_tensors and data_size < 0:
        raise reader.fail("no room for tensor data after the header")
    for name, dims, ggml_type, offset in tensors:
        if offset % alignment:
            raise reader.fail(f"tensor {name} offset {offset} is not aligned to {alignment}")
        if (data_start + offset) % TENSOR_ALIGNMENT:
            # llama.cpp maps the file and hands the CPU backend pointers into it:
            # GGML_ASSERT(ptr % TENSOR_ALIGNMENT == 0) in ggml_backend_cpu_buffer_from_ptr.
            raise reader.fail(f"tensor {name} data starts at file byte {data_start + offset}, not a multiple "
                              f"of {TENSOR_ALIGNMENT} (general.alignment {alignment} is too small)")
        nbytes = _tensor_nbytes(ggml_type, dims, name, reader)
        if offset + nbytes > data_size:
            raise reader.fail(f"tensor {name} needs bytes {offset}..{offset + nbytes} "
                              f"but the data section holds {data_size}")
    if semantics:
        from ._gguf_semantics import check_metadata  # what llama.cpp asserts on, beyond the structure

        check_metadata(reader.data, metadata, lambda what: InvalidGGUFError(f"{reader.path}: {what}"))
    summary: Dict[str, object] = {"version": version, "n_tensors": n_tensors, "n_kv": n_kv, "alignment": alignment}
    return GGUFInfo(summary, metadata, tensors)


def check_model_path(path: Union[str, os.PathLike]) -> Path:
    """The checks every model path gets before llama.cpp sees it."""
    resolved = Path(os.fspath(path)).expanduser()
    if not resolved.exists():
        raise FileNotFoundError(f"model file not found: {resolved}")
    if resolved.is_dir():
        raise IsADirectoryError(f"model path is a directory, not a GGUF file: {resolved}")
    if not os.access(resolved, os.R_OK):
        raise PermissionError(f"model file is not readable: {resolved}")
    check_gguf(resolved)
    return resolved
