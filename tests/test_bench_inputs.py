"""bench/native_tokens.py reproduces the prompt tokens native llama-bench decodes."""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def load_native_tokens():
    spec = importlib.util.spec_from_file_location("native_tokens", REPO / "bench" / "native_tokens.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


native_tokens = load_native_tokens()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="llama-bench's draws are glibc's rand(); "
                    "only Linux has glibc to compare against")
@pytest.mark.parametrize("seed", [1, 7, 2**31 - 2])
def test_glibc_rand_matches_the_c_library(seed):
    # rand()'s state is process-wide and a runtime may draw from it too (PyPy does, between our
    # calls); random_r() runs the same generator on a private state, as srand()/rand() do.
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    state = ctypes.create_string_buffer(128)  # 128 bytes: the TYPE_3 generator that rand() uses
    data = ctypes.create_string_buffer(64)  # struct random_data (48 bytes on LP64), zeroed
    assert libc.initstate_r(ctypes.c_uint(seed), state, ctypes.c_size_t(128), data) == 0
    value = ctypes.c_int32()

    def c_rand() -> int:
        assert libc.random_r(data, ctypes.byref(value)) == 0
        return value.value

    ours = native_tokens.glibc_rand(seed)
    assert [next(ours) for _ in range(5000)] == [c_rand() for _ in range(5000)]


def test_prompts_are_drawn_per_batch_as_llama_bench_draws_them():
    draws = native_tokens.glibc_rand()
    expected_start = [next(draws) % 49152 for _ in range(3)]
    warmup, timed = native_tokens.llama_bench_prompts(4096, 2048, 49152, bos=1, add_bos=False)
    assert len(warmup) == len(timed) == 4096 and warmup != timed
    assert warmup[:3] == expected_start and all(0 <= t < 49152 for t in warmup + timed)

    # With a BOS-adding vocabulary only the first token of a run is BOS, not each batch's first.
    warmup, timed = native_tokens.llama_bench_prompts(4096, 2048, 49152, bos=1, add_bos=True)
    assert warmup[0] == timed[0] == 1
    assert warmup[1] == expected_start[0] and warmup[2048] != 1
