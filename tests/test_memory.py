"""Memory estimates against what llama.cpp itself allocates for the default model (its log lines)."""

from __future__ import annotations

import logging
import re
from typing import Dict, List

import pytest

from cyllama_cffi import estimate_gpu_layers, estimate_memory_usage, set_verbose
from cyllama_cffi.lowlevel.context import LlamaContext
from cyllama_cffi.lowlevel.model import LlamaModel

MiB = 1024 * 1024
BUFFER_LINE = re.compile(r"CPU(?:_Mapped)? (model|KV|compute) buffer size =\s+([\d.]+) MiB")


class BufferSizes(logging.Handler):
    """Collects llama.cpp's "<CPU> <kind> buffer size = N MiB" lines."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.sizes: Dict[str, List[float]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        match = BUFFER_LINE.search(record.getMessage())
        if match:
            self.sizes.setdefault(match.group(1), []).append(float(match.group(2)) * MiB)


@pytest.fixture
def allocations():
    logger = logging.getLogger("cyllama_cffi.llama")
    handler = BufferSizes()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    set_verbose(True)
    try:
        yield handler.sizes
    finally:
        set_verbose(False)
        logger.removeHandler(handler)
        logger.setLevel(level)


def relative_error(estimate: float, actual: float) -> float:
    return abs(estimate - actual) / actual


def test_weights_match_the_model_buffer_and_llama_model_size(model_path, allocations):
    model = LlamaModel(model_path)
    try:
        estimate = estimate_memory_usage(model_path)
        (mapped,) = allocations["model"]
        assert relative_error(estimate["weights_bytes"], mapped) < 0.001  # the log rounds to 0.01 MiB
        assert estimate["weights_bytes"] == model.size
        assert estimate["parameters"]["total_params"] == model.n_params
    finally:
        model.close()


@pytest.mark.parametrize("n_ctx", [512, 2048, 8192])
def test_kv_cache_and_graph_match_the_context_buffers(model, allocations, n_ctx):
    LlamaContext(model, n_ctx=n_ctx).close()
    estimate = estimate_memory_usage(model.path, ctx_size=n_ctx)
    (kv,) = allocations["KV"]
    compute = allocations["compute"][0]
    assert relative_error(estimate["kv_cache_bytes"], kv) < 0.001
    assert relative_error(estimate["graph_bytes"], compute) < 0.05, (estimate["graph_bytes"] / MiB, compute / MiB)


def test_a_context_that_is_not_a_multiple_of_256_is_rounded_up_like_llama_cpp(model, allocations):
    LlamaContext(model, n_ctx=700).close()
    (kv,) = allocations["KV"]
    assert relative_error(estimate_memory_usage(model.path, ctx_size=700)["kv_cache_bytes"], kv) < 0.001


def test_gpu_fit_uses_the_same_sizes(model_path):
    usage = estimate_memory_usage(model_path, ctx_size=2048)
    everything = estimate_gpu_layers(model_path, "8GB", ctx_size=2048)
    assert everything.layers == usage["parameters"]["n_layer"]
    assert everything.vram_kv == usage["kv_cache_bytes"] and everything.graph_size == usage["graph_bytes"]
    assert everything.total_size == usage["weights_bytes"]
    half = estimate_gpu_layers(model_path, (everything.vram // 2) // MiB, ctx_size=2048)
    assert 0 < half.layers < everything.layers and half.vram <= everything.vram // 2


def test_the_type_table_matches_ggml():
    """memory.py carries ggml's block sizes in pure Python; a llama.cpp upgrade that changes them fails here."""
    from cyllama_cffi._ffi import lib
    from cyllama_cffi.memory import _GGML_TYPES

    live = {t: (lib.ggml_blck_size(t), lib.ggml_type_size(t)) for t in range(lib.GGML_TYPE_COUNT)
            if lib.ggml_blck_size(t) > 0}
    assert _GGML_TYPES == live
