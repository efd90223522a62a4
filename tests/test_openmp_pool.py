"""A prompt chunk decoded on a helper thread does not run beside its caller's idle OpenMP pool.

ggml-cpu's OpenMP build gives every thread that decodes a pool of ``n_threads - 1`` workers,
and libgomp stops spinning at ggml's per-node barriers once its pools hold more threads than
there are cores. So the thread that hands a prompt to a helper frees its own pool first
(``KVSequence.start_helper``). What is tested here is that the workers are gone; what it is
worth in milliseconds is measured by ``bench/prefix_reuse.py``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Set

import pytest

from conftest import require
from cyllama_cffi._ffi import lib
from cyllama_cffi._sequence import KVSequence
from cyllama_cffi.lowlevel.batch import LlamaBatch
from cyllama_cffi.lowlevel.context import LlamaContext

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="counts the process's threads in /proc/self/task (Linux only)")

N_THREADS = 3  # a pool of two workers: unlike the one helper thread that replaces it


def native_threads() -> Set[int]:
    """The process's threads that Python did not start: here, OpenMP's workers."""
    python = {thread.native_id for thread in threading.enumerate()}
    return {int(task) for task in os.listdir("/proc/self/task")} - python


def wait_until_gone(threads: Set[int], deadline_s: float = 10.0) -> Set[int]:
    """The ``threads`` still alive once they all ended or the deadline passed (a worker told to
    stop exits right after the barrier its pool waited at, so it may outlive the call briefly)."""
    end = time.monotonic() + deadline_s
    while (alive := threads & native_threads()) and time.monotonic() < end:
        time.sleep(0.01)
    return alive


@pytest.fixture
def decoding(model):
    """A context whose calling thread just decoded a chunk, and that chunk's workers."""
    require("libgomp" in Path("/proc/self/maps").read_text(),
            "this build of ggml-cpu has no OpenMP runtime (GGML_OPENMP off)")
    with LlamaContext(model, n_ctx=256, n_threads=N_THREADS) as ctx, LlamaBatch(64) as batch:
        seq = KVSequence(ctx, batch, flash_attn=True)
        lib.cyl_release_openmp_threads()  # a pool that earlier decodes on this thread left (maybe smaller)
        before = native_threads()
        seq.decode_chunk([1, 2, 3, 4, 5, 6, 7, 8], logits_last=True)
        workers = native_threads() - before
        yield seq, workers
        seq.settle()


def test_a_decode_leaves_its_callers_pool_of_workers(decoding):
    _, workers = decoding
    assert len(workers) >= N_THREADS - 1


def test_the_shim_frees_the_calling_threads_pool(decoding):
    _, workers = decoding
    assert lib.cyl_release_openmp_threads() == 1
    assert wait_until_gone(workers) == set()
    assert lib.cyl_release_openmp_threads() == 1  # no pool left: nothing to do, no error


def test_handing_a_prompt_to_a_helper_frees_the_callers_workers(decoding):
    seq, workers = decoding
    seq.start_helper()
    assert wait_until_gone(workers) == set()
    seq.end_helper(wait=True)
    # and the next decode on this thread makes a new pool and decodes as before
    seq.decode_chunk([9, 10], logits_last=True)
    assert seq.tokens == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]


@pytest.fixture
def worker():
    """A thread that stays alive between calls, as a thread pool's do."""
    from concurrent.futures import ThreadPoolExecutor

    require("libgomp" in Path("/proc/self/maps").read_text(),
            "this build of ggml-cpu has no OpenMP runtime (GGML_OPENMP off)")
    with ThreadPoolExecutor(1) as executor:
        executor.submit(lambda: None).result()  # the thread exists before the count
        yield executor


@pytest.mark.parametrize("flash_attn", [None, False], ids=["flash-attn-auto", "flash-attn-off"])
def test_a_generation_frees_the_pool_of_the_thread_that_ran_it(model_path, worker, flash_attn):
    """Callers of a shared LLM taking turns from a thread pool: the thread that generated last
    must not keep idle workers beside the next caller's (a re-read of the answer, with flash
    attention off, runs on a helper of its own, which is not counted here: it ends by itself)."""
    from cyllama_cffi import LLM, GenerationConfig

    config = GenerationConfig(n_threads=N_THREADS, max_tokens=6, temperature=0.0, flash_attn=flash_attn)
    with LLM(model_path, config=config) as llm:
        before = native_threads()
        text = worker.submit(lambda: "".join(llm.stream("The capital of France is"))).result()
        assert text
        if llm._seq is not None:
            llm._seq.settle(finish_reread=True)  # the helper's own pool goes with its thread
        assert wait_until_gone(native_threads() - before) == set()


def test_an_embedding_frees_the_pool_of_the_thread_that_ran_it(model_path, worker):
    import numpy  # noqa: F401  (its BLAS starts threads of its own when first imported)

    from cyllama_cffi import Embedder

    with Embedder(model_path, n_threads=N_THREADS) as embedder:
        before = native_threads()
        vectors = worker.submit(embedder.embed, ["a first text", "and a second one"]).result()
        assert vectors.shape[0] == 2
        assert wait_until_gone(native_threads() - before) == set()


def test_a_batch_frees_the_pool_of_the_thread_that_ran_it(model_path, worker):
    from cyllama_cffi import BatchGenerator, GenerationConfig

    with BatchGenerator(model_path, n_ctx=512, n_seq_max=2, n_threads=N_THREADS) as generator:
        before = native_threads()
        config = GenerationConfig(max_tokens=4, temperature=0.0)
        responses = worker.submit(generator.generate_batch, ["The capital of France is", "Water boils at"],
                                  config).result()
        assert all(response.text for response in responses)
        assert wait_until_gone(native_threads() - before) == set()
