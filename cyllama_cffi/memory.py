"""How much memory a model will take, read from its GGUF header without loading it.

``estimate_memory_usage`` gives the bytes llama.cpp allocates for the weights, the KV cache and
the compute graph; ``estimate_gpu_layers`` how many layers fit in a GPU's memory. Both read the
header in pure Python (no llama.cpp; the file is mapped, but only the header's pages are
read), so they answer in milliseconds for a model of any size.

What llama.cpp allocates on the CPU, and how close these come (checked by the tests):
- weights: the sum of the tensors' sizes, exact (llama.cpp's ``CPU_Mapped model buffer``);
- KV cache: ``cells x layers x (K width + V width) x element size``, with the cells rounded
  up to 256 as llama.cpp does: exact for transformers with ordinary attention (models with
  sliding-window or recurrent layers use less);
- compute graph: the logits and hidden states of one micro-batch
  (``n_ubatch x (n_vocab + 2 n_embd) x 4`` bytes), within 5 % of llama.cpp's measured
  compute buffer up to 8192 cells; the scheduler's exact peak depends on the backend.

The names and signatures are cyllama's (``cyllama.memory``); the numbers are computed from
the tensor table instead of guessed from the file type.
"""

from __future__ import annotations

import math
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ._gguf_check import GGUF_MAGIC, SUPPORTED_VERSIONS, _Array, _Reader, _skip_value

__all__ = ["MemoryEstimate", "estimate_gpu_layers", "estimate_memory_usage", "parse_gpu_memory"]

MiB = 1024 * 1024
KV_CELL_PADDING = 256  # llama.cpp rounds a context's cells up to a multiple of this
DEFAULT_N_UBATCH = 512  # llama.cpp's (and GenerationConfig's) micro-batch: the tokens one graph holds

# ggml type id -> (elements per block, bytes per block), from ggml's type traits.
_GGML_TYPES: Dict[int, Tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 36),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18), 42: (64, 18),
}

# KV cache element types llama.cpp accepts (--cache-type-k/-v), in bytes per element.
KV_CACHE_TYPES: Dict[str, float] = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
    "q4_1": 20 / 32, "q4_0": 18 / 32, "iq4_nl": 18 / 32,
}

_BLOCK = re.compile(r"^blk\.(\d+)\.")


@dataclass
class MemoryEstimate:
    """What fits on the GPU(s): cyllama's fields, in bytes except ``layers``.

    ``layers``: repeating layers to offload (``n_gpu_layers``); ``graph_size``: the compute
    buffer; ``vram``: the GPU memory those layers, their KV cache and the graph take;
    ``vram_kv``: their part of the KV cache; ``total_size``: all the model's weights;
    ``tensor_split``: layers per GPU when several were given.
    """

    layers: int
    graph_size: int
    vram: int
    vram_kv: int
    total_size: int
    tensor_split: Optional[List[int]] = None


@dataclass
class _ModelShape:
    architecture: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_vocab: int
    n_ctx_train: int
    kv_width: List[int]  # per layer: K width + V width, in elements per cell
    layer_bytes: List[int]  # per layer: the weights of blk.N.*
    other_bytes: int  # embeddings, output, final norm
    n_params: int

    @property
    def weights_bytes(self) -> int:
        return sum(self.layer_bytes) + self.other_bytes


# -- reading the header ---------------------------------------------------------------------------
def _read_shape(model_path: Union[str, "os.PathLike[str]"]) -> _ModelShape:
    path = Path(os.fspath(model_path)).expanduser()
    if not path.is_file():
        raise ValueError(f"model file not found: {path}")
    size = path.stat().st_size
    if size < 24:
        raise ValueError(f"{path}: not a GGUF file ({size} bytes)")
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            return _parse(_Reader(mapped, str(path)))
        finally:
            mapped.close()


def _parse(reader: _Reader) -> _ModelShape:
    if bytes(reader.data[0:4]) != GGUF_MAGIC:
        raise ValueError(f"{reader.path}: not a GGUF file (magic {bytes(reader.data[0:4])!r})")
    reader.pos = 4
    version = reader.scalar("I", "version")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"{reader.path}: unsupported GGUF version {version}")
    n_tensors = reader.scalar("Q", "tensor count")
    n_kv = reader.scalar("Q", "metadata count")
    if n_kv > reader.size // 13 or n_tensors > reader.size // 24:
        raise reader.fail(f"counts too large for the file: {n_tensors} tensors, {n_kv} keys")
    meta: Dict[str, Any] = {}
    for _ in range(n_kv):
        key = reader.string("metadata key").decode("utf-8", "replace")
        value_type = reader.scalar("I", f"type of {key}")
        meta.setdefault(key, _skip_value(reader, value_type, key))

    layer_bytes: Dict[int, int] = {}
    other_bytes = n_params = 0
    for _ in range(n_tensors):
        name = reader.string("tensor name").decode("utf-8", "replace")
        n_dims = reader.scalar("I", f"dimension count of {name}")
        if not 1 <= n_dims <= 4:
            raise reader.fail(f"tensor {name} has {n_dims} dimensions")
        dims = [reader.scalar("q", f"dimension of {name}") for _ in range(n_dims)]
        ggml_type = reader.scalar("I", f"type of {name}")
        reader.scalar("Q", f"offset of {name}")
        if ggml_type not in _GGML_TYPES or any(d < 0 for d in dims):
            raise reader.fail(f"tensor {name} has an unknown type {ggml_type} or a negative dimension")
        block, block_bytes = _GGML_TYPES[ggml_type]
        elements = math.prod(dims)
        nbytes = elements // block * block_bytes
        n_params += elements
        match = _BLOCK.match(name)
        if match:
            layer = int(match.group(1))
            layer_bytes[layer] = layer_bytes.get(layer, 0) + nbytes
        else:
            other_bytes += nbytes
    return _shape(reader.path, meta, layer_bytes, other_bytes, n_params)


def _int(meta: Dict[str, Any], key: str, path: str, default: Optional[int] = None) -> int:
    """A whole-model hyperparameter; some models store one per layer (an array), which is not supported."""
    value = meta.get(key, default)
    if value is None:
        raise ValueError(f"{path}: the GGUF metadata has no {key}")
    if isinstance(value, _Array) or isinstance(value, bytes):
        raise ValueError(f"{path}: {key} is not a single number (per-layer values are not supported)")
    return int(value)


def _shape(path: str, meta: Dict[str, Any], layer_bytes: Dict[int, int], other_bytes: int,
           n_params: int) -> _ModelShape:
    arch = meta.get("general.architecture")
    if not isinstance(arch, bytes):
        raise ValueError(f"{path}: the GGUF metadata has no general.architecture")
    name = arch.decode("utf-8", "replace")
    n_layer = _int(meta, f"{name}.block_count", path)
    n_embd = _int(meta, f"{name}.embedding_length", path)
    n_head = _int(meta, f"{name}.attention.head_count", path, 0)
    n_head_kv = _int(meta, f"{name}.attention.head_count_kv", path, n_head)
    head_k = _int(meta, f"{name}.attention.key_length", path, n_embd // n_head if n_head else 0)
    head_v = _int(meta, f"{name}.attention.value_length", path, head_k)
    tokens = meta.get("tokenizer.ggml.tokens")
    n_vocab = tokens.count if isinstance(tokens, _Array) else _int(meta, f"{name}.vocab_size", path, 0)
    return _ModelShape(
        architecture=name, n_layer=n_layer, n_embd=n_embd, n_ff=_int(meta, f"{name}.feed_forward_length", path, 0),
        n_head=n_head, n_vocab=n_vocab, n_ctx_train=_int(meta, f"{name}.context_length", path, 0),
        kv_width=[n_head_kv * (head_k + head_v)] * n_layer,
        layer_bytes=[layer_bytes.get(i, 0) for i in range(n_layer)],
        other_bytes=other_bytes + sum(b for i, b in layer_bytes.items() if i >= n_layer),
        n_params=n_params,
    )


# -- checking arguments ----------------------------------------------------------------------------
def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _kv_bytes(kv_cache_type: Any) -> float:
    if not isinstance(kv_cache_type, str) or kv_cache_type.lower() not in KV_CACHE_TYPES:
        raise ValueError(f"kv_cache_type must be one of {', '.join(KV_CACHE_TYPES)}, got {kv_cache_type!r}")
    return KV_CACHE_TYPES[kv_cache_type.lower()]


_UNITS = {"": 1, "m": 1, "mb": 1, "mib": 1, "g": 1024, "gb": 1024, "gib": 1024, "t": 1024 * 1024,
          "tb": 1024 * 1024, "tib": 1024 * 1024, "k": 1 / 1024, "kb": 1 / 1024, "kib": 1 / 1024}
_AMOUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_gpu_memory(spec: Union[str, int, Sequence[Union[str, int]]]) -> Union[int, List[int]]:
    """GPU memory in MB: ``"8192"`` -> 8192, ``"8GB"``/``"8 GiB"`` -> 8192, ``"4096,4096"`` -> [4096, 4096].

    As in cyllama, a bare number is MB and a comma-separated list is one amount per GPU; units
    (MB, GB, TB, with or without the "i") are accepted too, all of them powers of 1024, the
    way GPU memory is sold. Ints and lists are checked and passed through. Anything else, or
    an amount under 1 MB, raises ValueError.
    """
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ValueError("GPU memory list is empty")
        return [_one_amount(item) for item in spec]
    if isinstance(spec, str) and "," in spec:
        return [_one_amount(item) for item in spec.split(",")]
    return _one_amount(spec)


def _one_amount(spec: Any) -> int:
    if isinstance(spec, bool):
        raise ValueError(f"invalid GPU memory amount {spec!r}")
    if isinstance(spec, int):
        amount = spec
    elif isinstance(spec, str):
        match = _AMOUNT.match(spec)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"invalid GPU memory amount {spec!r}: give MB as a number, or a size such as '8GB'")
        amount = int(float(match.group(1)) * _UNITS[unit])
    else:
        raise ValueError(f"invalid GPU memory amount {spec!r}: give MB as an int, or a string such as '8GB'")
    if amount < 1:
        raise ValueError(f"GPU memory must be at least 1 MB, got {spec!r}")
    return amount


# -- the estimates -----------------------------------------------------------------------------------
def _cells(ctx_size: int, sequences: int) -> int:
    wanted = ctx_size * sequences
    return -(-wanted // KV_CELL_PADDING) * KV_CELL_PADDING


def _graph_bytes(shape: _ModelShape, n_cells: int, n_ubatch: int) -> int:
    """The compute buffer of one micro-batch: its logits and two hidden-state rows per token, in f32."""
    tokens = min(n_ubatch, n_cells)
    return tokens * (shape.n_vocab + 2 * shape.n_embd) * 4


def _kv_layer_bytes(shape: _ModelShape, layer: int, n_cells: int, element_bytes: float) -> int:
    return int(n_cells * shape.kv_width[layer] * element_bytes)


def estimate_memory_usage(model_path: Union[str, "os.PathLike[str]"], ctx_size: int = 2048, batch_size: int = 1,
                          verbose: bool = False) -> Dict[str, Any]:
    """The memory a model needs with ``batch_size`` sequences of ``ctx_size`` tokens, on one device.

    Returns a dict: ``weights_bytes``, ``kv_cache_bytes`` (f16, llama.cpp's default),
    ``graph_bytes`` and their sum ``total_bytes``; and cyllama's keys: ``model_size_mb`` (the
    weights at f32/f16/q4_0/q8_0, plus ``file`` as stored), ``kv_cache_mb`` (f16/f32),
    ``graph_mb`` and ``parameters`` (n_embd, n_layer, n_ff, n_vocab, total_params).
    """
    _positive_int(ctx_size, "ctx_size")
    _positive_int(batch_size, "batch_size")
    shape = _read_shape(model_path)
    n_cells = _cells(ctx_size, batch_size)
    kv_f16 = sum(_kv_layer_bytes(shape, i, n_cells, 2.0) for i in range(shape.n_layer))
    graph = _graph_bytes(shape, n_cells, DEFAULT_N_UBATCH)
    weights = shape.weights_bytes
    result: Dict[str, Any] = {
        "weights_bytes": weights,
        "kv_cache_bytes": kv_f16,
        "graph_bytes": graph,
        "total_bytes": weights + kv_f16 + graph,
        "model_size_mb": {"file": weights // MiB, "f32": shape.n_params * 4 // MiB,
                          "f16": shape.n_params * 2 // MiB, "q4_0": shape.n_params * 18 // 32 // MiB,
                          "q8_0": shape.n_params * 34 // 32 // MiB},
        "kv_cache_mb": {"f16": kv_f16 // MiB, "f32": kv_f16 * 2 // MiB},
        "graph_mb": graph // MiB,
        "parameters": {"n_embd": shape.n_embd, "n_layer": shape.n_layer, "n_ff": shape.n_ff,
                       "n_vocab": shape.n_vocab, "total_params": shape.n_params},
    }
    if verbose:
        print(f"Model: {model_path} ({shape.architecture}, {shape.n_params:,} parameters)")
        print(f"Weights: {weights / MiB:.2f} MiB; KV cache ({n_cells} cells, f16): {kv_f16 / MiB:.2f} MiB; "
              f"compute graph: {graph / MiB:.2f} MiB; total: {result['total_bytes'] / MiB:.2f} MiB")
    return result


def estimate_gpu_layers(model_path: Union[str, "os.PathLike[str]"], gpu_memory_mb: Union[int, str, List[int]],
                        ctx_size: int = 2048, batch_size: int = 1, n_parallel: int = 1, kv_cache_type: str = "f16",
                        use_mmap: bool = True, verbose: bool = False) -> MemoryEstimate:
    """How many layers (``n_gpu_layers``) fit in ``gpu_memory_mb`` (MB, or a list of MB per GPU).

    The compute graph goes to the first GPU; then whole layers, each with its weights and its
    part of the KV cache (``batch_size x n_parallel`` sequences of ``ctx_size`` tokens),
    until the memory is used up. ``use_mmap`` does not change what the GPU holds; it is
    accepted for cyllama's signature.
    """
    del use_mmap
    budgets = parse_gpu_memory(gpu_memory_mb)
    budget_list = budgets if isinstance(budgets, list) else [budgets]
    _positive_int(ctx_size, "ctx_size")
    _positive_int(batch_size, "batch_size")
    _positive_int(n_parallel, "n_parallel")
    element_bytes = _kv_bytes(kv_cache_type)
    shape = _read_shape(model_path)
    n_cells = _cells(ctx_size, batch_size * n_parallel)
    graph = _graph_bytes(shape, n_cells, DEFAULT_N_UBATCH)

    per_gpu: List[int] = []
    layer = 0
    used = kv_used = 0
    for index, mb in enumerate(budget_list):
        free = mb * MiB - (graph if index == 0 else 0)
        placed = 0
        while layer < shape.n_layer:
            cost = shape.layer_bytes[layer] + _kv_layer_bytes(shape, layer, n_cells, element_bytes)
            if cost > free:
                break
            free -= cost
            used += cost
            kv_used += _kv_layer_bytes(shape, layer, n_cells, element_bytes)
            layer += 1
            placed += 1
        per_gpu.append(placed)
    vram = used + graph if layer else 0
    estimate = MemoryEstimate(layers=layer, graph_size=graph, vram=vram, vram_kv=kv_used,
                              total_size=shape.weights_bytes,
                              tensor_split=per_gpu if isinstance(budgets, list) else None)
    if verbose:
        print(f"Model: {model_path} ({shape.architecture}, {shape.n_layer} layers)")
        print(f"GPU layers: {layer}/{shape.n_layer}; VRAM {vram / MiB:.1f} MiB "
              f"(KV {kv_used / MiB:.1f} MiB, graph {graph / MiB:.1f} MiB)")
    return estimate
