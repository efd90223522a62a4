"""The metadata *values* llama.cpp trusts so much that a bad one aborts the process.

``_gguf_check`` proves a file is structurally sound; llama.cpp's own GGUF
parser is careful too. But the model loader then asserts on some values
(``GGML_ASSERT`` is ``abort()``), and some tokenizer paths throw C++
exceptions straight through the C API (``std::terminate``, also an abort).
Found by mutating a tiny model (``tests/test_robustness.py``); each rule
mirrors one place of the pinned llama.cpp source:

* ``<arch>.block_count`` outside ``1..512``, ``nextn_predict_layers`` above it,
  inconsistent expert counts: ``GGML_ASSERT`` in ``llama_model_base::load_hparams``.
* ``<arch>.rope.scaling.type`` not one of none/linear/yarn/longrope: same.
* a norm epsilon (``<arch>.attention.layer_norm_rms_epsilon`` & co.) that is
  negative or NaN: ``GGML_ASSERT(eps >= 0.0f)`` in the CPU norm ops, at the first decode.
* two tokens with the same text (read as a C string, up to the first NUL; an
  empty text counts as ``[EMPTY_<id>]``):
  ``GGML_ASSERT(id_to_token.size() == token_to_id.size())`` in the vocab loader.
* a BYTE-type token in a WordPiece (``bert``) vocabulary: ``GGML_ABORT`` in
  ``token_to_byte`` while the loader builds its token-to-piece cache.
* a SentencePiece (``llama``) vocabulary without a token for some byte that
  UTF-8 text can contain (``<0xXX>`` or the raw byte): ``llama_tokenize``
  then throws ``std::out_of_range`` from ``byte_to_token`` for text that needs
  it. (``LlamaVocab.tokenize`` only passes valid UTF-8, so the bytes C0, C1
  and F5..FF never reach it.)
* BOS/EOS/SEP that tokenization would add but that does not exist in the
  vocabulary: ``GGML_ASSERT(special_bos_id != LLAMA_TOKEN_NULL)`` & co. in
  ``llama_vocab::impl::tokenize``.
* no vocabulary at all (``tokenizer.ggml.model`` ``none``/``no_vocab``):
  llama.cpp builds no tokenizer, and every ``llama_tokenize`` call asserts.

Rules only fire when the value has the type llama.cpp reads; a value of
another type makes llama.cpp throw a clean load error itself.
"""

from __future__ import annotations

import math
import struct
from array import array
from typing import Any, Callable, Dict, List, Optional, Tuple

MAX_LAYERS = 512    # LLAMA_MAX_LAYERS (src/llama-hparams.h)
MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")

_UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY = 4, 5, 6, 7, 8, 9
_EPSILON_SUFFIXES = ("_epsilon", ".epsilon", "_eps", ".eps")
_UTF8_BYTES = [b for b in range(256) if b not in (0xC0, 0xC1) and b < 0xF5]  # bytes valid UTF-8 can hold
_TOKEN_TYPE_BYTE = 6
_NULL = -1

# tokenizer.ggml.model -> (vocab type, default BOS, EOS, SEP ids); llama_vocab::impl::load
_VOCAB_DEFAULTS: Dict[str, Tuple[str, int, int, int]] = {
    "llama": ("spm", 1, 2, _NULL),
    "bert": ("wpm", 101, _NULL, 102),
    "gpt2": ("bpe", 11, 11, _NULL),
    "hybriddna": ("bpe", 11, 11, _NULL),
    "whitespace": ("bpe", 11, 11, _NULL),
    "gemma4": ("bpe", _NULL, _NULL, _NULL),
    "t5": ("ugm", _NULL, 1, _NULL),
    "rwkv": ("rwkv", _NULL, _NULL, _NULL),
    "test": ("test", _NULL, _NULL, _NULL),
    "plamo2": ("plamo2", 1, 2, _NULL),
}
# (add_bos, add_eos) before the GGUF keys; None = "may be True" (BPE pre-tokenizers set it)
_ADD_DEFAULTS: Dict[str, Tuple[Optional[bool], bool]] = {
    "spm": (True, False), "wpm": (True, False), "ugm": (False, True), "rwkv": (False, False),
    "bpe": (None, False), "test": (False, False), "plamo2": (False, False),
}

Fail = Callable[[str], Exception]
Metadata = Dict[str, Tuple[int, Any]]


def check_metadata(data: Any, metadata: Metadata, fail: Fail) -> None:
    """Raise ``fail(message)`` for the first value that would make llama.cpp abort."""
    _check_hparams(data, metadata, fail)
    _check_vocab(data, metadata, fail)


# -- hyperparameters -----------------------------------------------------------------------

def _scalar(metadata: Metadata, key: str, value_type: int) -> Any:
    """The value of ``key`` if it has ``value_type``; strings as llama.cpp sees them (up to a NUL)."""
    entry = metadata.get(key)
    if entry is None or entry[0] != value_type:
        return None
    value = entry[1]
    return value.split(b"\0", 1)[0].decode("utf-8", "replace") if value_type == _STRING else value


def _check_hparams(data: Any, metadata: Metadata, fail: Fail) -> None:
    arch = _scalar(metadata, "general.architecture", _STRING)
    if arch is None:
        return  # llama.cpp refuses the file itself (missing or mistyped key)
    n_layer = _scalar(metadata, f"{arch}.block_count", _UINT32)
    if n_layer is not None and not 1 <= n_layer <= MAX_LAYERS:
        raise fail(f"{arch}.block_count is {n_layer}; llama.cpp aborts unless it is in 1..{MAX_LAYERS}")
    nextn = _scalar(metadata, f"{arch}.nextn_predict_layers", _UINT32)
    if nextn is not None and n_layer is not None and nextn > n_layer:
        raise fail(f"{arch}.nextn_predict_layers ({nextn}) exceeds block_count ({n_layer}); llama.cpp aborts")
    rope = _scalar(metadata, f"{arch}.rope.scaling.type", _STRING)
    if rope is not None and rope not in ROPE_SCALING_TYPES:
        raise fail(f"{arch}.rope.scaling.type is {rope!r}; llama.cpp aborts unless it is one of "
                   f"{', '.join(ROPE_SCALING_TYPES)}")
    _check_experts(data, metadata, arch, n_layer, fail)
    for key, (value_type, value) in metadata.items():
        # every norm op asserts eps >= 0 (ggml-cpu/ops.cpp); NaN fails that too
        if value_type == _FLOAT32 and key.startswith(arch + ".") and key.endswith(_EPSILON_SUFFIXES) \
                and not (math.isfinite(value) and value >= 0):
            raise fail(f"{key} is {value!r}; ggml aborts unless a norm epsilon is finite and >= 0")


def _check_experts(data: Any, metadata: Metadata, arch: str, n_layer: Optional[int], fail: Fail) -> None:
    n_expert = _scalar(metadata, f"{arch}.expert_count", _UINT32) or 0
    used = _expert_used(data, metadata, f"{arch}.expert_used_count", n_layer)
    if used is None:
        return  # mistyped or wrong length: llama.cpp throws a clean error
    groups = _scalar(metadata, f"{arch}.expert_group_count", _UINT32) or 0
    group_used = _scalar(metadata, f"{arch}.expert_group_used_count", _UINT32) or 0
    if arch in ("hunyuan_vl", "hunyuan-dense") and n_expert <= 1:
        n_expert, used = 0, 0  # llama.cpp resets these for the dense Hunyuan models
    problem = None
    if n_expert > MAX_EXPERTS:
        problem = f"expert_count {n_expert} > {MAX_EXPERTS}"
    elif used > n_expert:
        problem = f"expert_used_count {used} > expert_count {n_expert}"
    elif n_expert > 0:
        if used == 0:
            problem = "expert_used_count is 0 with experts present"
        elif groups >= n_expert:
            problem = f"expert_group_count {groups} >= expert_count {n_expert}"
        elif groups > 1 and (n_expert % groups or group_used == 0 or group_used >= groups):
            problem = f"expert groups inconsistent ({n_expert} experts, {groups} groups, {group_used} used)"
    elif used or groups:
        problem = "expert_used_count or expert_group_count set without experts"
    if problem:
        raise fail(f"{arch}: {problem}; llama.cpp aborts")


def _expert_used(data: Any, metadata: Metadata, key: str, n_layer: Optional[int]) -> Optional[int]:
    """The largest per-layer expert_used_count (a scalar or a per-layer array); None if unreadable."""
    entry = metadata.get(key)
    if entry is None:
        return 0
    value_type, value = entry
    if value_type == _UINT32:
        return value
    if value_type == _ARRAY and value.element_type in (_UINT32, _INT32) and value.count == n_layer:
        values = _int32s(data, value.start, value.count)
        return max((v & 0xFFFFFFFF for v in values), default=0)
    return None


# -- vocabulary ------------------------------------------------------------------------------

def _strings(data: Any, start: int, count: int) -> List[bytes]:
    out = []
    pos = start
    unpack = struct.Struct("<Q").unpack_from
    for _ in range(count):
        (length,) = unpack(data, pos)
        pos += 8
        out.append(bytes(data[pos:pos + length]))
        pos += length
    return out


def _int32s(data: Any, start: int, count: int) -> "array[int]":
    values = array("i")
    values.frombytes(bytes(data[start:start + 4 * count]))
    return values


def _check_vocab(data: Any, metadata: Metadata, fail: Fail) -> None:
    model = _scalar(metadata, "tokenizer.ggml.model", _STRING)
    if model is None:
        return  # missing or mistyped: llama.cpp throws a clean error
    if model in ("none", "no_vocab"):
        raise fail(f"tokenizer.ggml.model is {model!r}: a model without a vocabulary cannot be used here "
                   "(llama.cpp aborts on every llama_tokenize call)")
    if model not in _VOCAB_DEFAULTS:
        return  # unknown tokenizer: llama.cpp throws a clean error
    kind, bos, eos, sep = _VOCAB_DEFAULTS[model]
    entry = metadata.get("tokenizer.ggml.tokens")
    if entry is None or entry[0] != _ARRAY or entry[1].element_type != _STRING:
        return  # llama.cpp throws a clean error
    tokens = _strings(data, entry[1].start, entry[1].count)
    n_tokens = len(tokens)
    # llama.cpp reads each token as a C string (gguf_get_arr_str): it ends at the first NUL
    texts = [text.split(b"\0", 1)[0] or f"[EMPTY_{index}]".encode() for index, text in enumerate(tokens)]
    seen: Dict[bytes, int] = {}
    for index, text in enumerate(texts):
        if text in seen:
            raise fail(f"tokens {seen[text]} and {index} have the same text {text[:40]!r}; "
                       "llama.cpp aborts on a vocabulary with duplicate tokens")
        seen[text] = index
    if kind == "wpm":
        _check_wordpiece_byte_tokens(data, metadata, texts, fail)
    if kind == "spm":
        # llama.cpp falls back to the raw byte as a C string, so byte 0 can only be <0x00>
        missing = [b for b in _UTF8_BYTES
                   if f"<0x{b:02X}>".encode() not in seen and (b == 0 or bytes([b]) not in seen)]
        if missing:
            raise fail(f"SentencePiece vocabulary has no token for byte(s) {missing[:8]}; llama.cpp's "
                       "tokenizer throws (and the process aborts) on text that needs them")
    _check_special_tokens(metadata, model, kind, n_tokens, bos, eos, sep, fail)


def _check_wordpiece_byte_tokens(data: Any, metadata: Metadata, texts: List[bytes], fail: Fail) -> None:
    entry = metadata.get("tokenizer.ggml.token_type")
    if entry is None or entry[0] != _ARRAY or entry[1].element_type != _INT32 or entry[1].count < len(texts):
        return  # absent (all NORMAL) or mistyped / too short: llama.cpp throws a clean error
    for index, token_type in enumerate(_int32s(data, entry[1].start, len(texts))):
        if token_type == _TOKEN_TYPE_BYTE:
            raise fail(f"token {index} is a BYTE token in a WordPiece vocabulary; llama.cpp aborts on it")


def _check_special_tokens(metadata: Metadata, model: str, kind: str, n_tokens: int, bos: int, eos: int,
                          sep: int, fail: Fail) -> None:
    def resolve(default: int, key: str) -> int:
        token = default if 0 <= default < n_tokens else _NULL
        explicit = _scalar(metadata, key, _UINT32)
        if explicit is not None and explicit < n_tokens:
            token = explicit
        return token

    bos = resolve(bos, "tokenizer.ggml.bos_token_id")
    eos = resolve(eos, "tokenizer.ggml.eos_token_id")
    sep = resolve(sep, "tokenizer.ggml.seperator_token_id")
    add_bos, add_eos = _ADD_DEFAULTS.get(kind, (False, False))
    explicit_bos = _scalar(metadata, "tokenizer.ggml.add_bos_token", _BOOL)
    explicit_eos = _scalar(metadata, "tokenizer.ggml.add_eos_token", _BOOL)
    add_bos = explicit_bos if explicit_bos is not None else add_bos
    add_eos = explicit_eos if explicit_eos is not None else add_eos
    pre = _scalar(metadata, "tokenizer.ggml.pre", _STRING)
    if model == "gemma4" or (kind == "bpe" and pre == "gemma4"):
        add_bos = True  # llama.cpp forces it for Gemma 4
    needed = []
    if kind == "wpm":
        needed = [("BOS", bos), ("SEP", sep)]  # WordPiece always adds both
    elif kind in ("spm", "ugm", "bpe"):
        needed = ([("BOS", bos)] if add_bos is not False else []) + ([("EOS", eos)] if add_eos else [])
    for name, token in needed:
        if token == _NULL:
            raise fail(f"tokenization adds a {name} token but the vocabulary has none (bad or missing id); "
                       "llama.cpp aborts on it")
