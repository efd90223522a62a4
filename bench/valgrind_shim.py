"""Exercise the C shim under valgrind: cancel flag, abort callbacks, SIGINT hook, log sink.

    python tests/tiny_gguf.py /tmp/tiny.gguf      # written outside valgrind (numpy, gguf)
    # valgrind 3.19 has no AVX-512: on such CPUs use a CYLLAMA_NATIVE=0 build (docs/reliability.md)
    PYTHONMALLOC=malloc valgrind --error-exitcode=99 --leak-check=full --show-leak-kinds=definite \\
        --errors-for-leak-kinds=definite --track-origins=yes python3.11 bench/valgrind_shim.py /tmp/tiny.gguf

Why: the shim is the only C code of this project, and it runs where Python's
safety does not reach - on ggml's worker threads (the abort callback, the log
sink) and inside a signal handler (the SIGINT hook). valgrind checks every
memory access of the shim, of libllama and of the cffi glue while this script
drives each path; ``--error-exitcode`` turns any invalid read/write, use of
uninitialised memory or definite leak into a non-zero exit. The model is the
tiny one of tests/tiny_gguf.py, so the run takes minutes, not hours. The
script imports nothing but cyllama_cffi and the standard library (no numpy,
no random numbers), so whatever valgrind reports is about this code.
Result and exact command: docs/reliability.md.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time


def main(path: str) -> int:
    from cyllama_cffi import LLM, DecodeAborted, LlamaBatch, LlamaContext, LlamaModel, set_verbose

    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[assignment]
    logging.getLogger("cyllama_cffi.llama").addHandler(handler)
    logging.getLogger("cyllama_cffi.llama").setLevel(logging.DEBUG)
    set_verbose(True)  # the log sink forwards every line, from whatever thread logs it

    model = LlamaModel(path)
    assert len(lines) > 20, "the log sink forwarded nothing"
    set_verbose(False)

    # 1. the C cancel flag, read by the C abort callback on ggml's threads
    with LlamaContext(model, n_ctx=256, n_threads=2) as ctx, LlamaBatch(256) as batch:
        batch.set_tokens(list(range(3, 131)), 0)
        ctx.cancel = True
        try:
            ctx.decode(batch)
            raise AssertionError("decode was not aborted")
        except DecodeAborted as aborted:
            assert aborted.n_past == 0
        ctx.cancel = False
        ctx.decode(batch)

        # 2. a Python abort callback, called from ggml's worker threads
        calls = []
        ctx.set_abort_callback(lambda: calls.append(1) or len(calls) > 3)
        ctx.memory_clear()
        try:
            ctx.decode(batch)
        except DecodeAborted:
            pass
        assert calls

        def broken() -> bool:
            raise KeyError("raised inside the abort callback")

        logging.getLogger("cyllama_cffi").disabled = True  # the logged traceback is expected
        ctx.set_abort_callback(broken)
        ctx.memory_clear()
        try:
            ctx.decode(batch)
        except DecodeAborted:
            pass
        logging.getLogger("cyllama_cffi").disabled = False
        ctx.set_abort_callback(None)
        ctx.memory_clear()
        ctx.decode(batch)
    model.close()

    # 3. cancel() from another thread, mid-prefill and between tokens
    llm = LLM(path, temperature=0.0, max_tokens=40, n_ctx=256, n_threads=2, n_ubatch=16)
    prompt = "the cat sat on the mat " * 12  # ~200 of the 256 positions
    reference = llm("the cat sat").text
    for delay in (0.001, 0.01, 0.05, 0.3):
        timer = threading.Timer(delay, llm.cancel)
        timer.start()
        list(llm.stream(prompt))
        timer.join()
        assert llm("the cat sat").text == reference

    # 4. the SIGINT hook: a real SIGINT while llama_decode runs, then the Python handler
    with llm.install_sigint_handler():
        for delay in (0.001, 0.01, 0.05, 0.3):
            stream = llm.stream(prompt)  # started first: a SIGINT before the start would be forgotten
            timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))
            timer.start()
            list(stream)
            timer.join()  # the signal was sent; valgrind delivers it at its next poll
            deadline = time.monotonic() + 10.0
            while not llm.cancel_requested and time.monotonic() < deadline:
                time.sleep(0.01)  # the Python-level handler runs between these bytecodes
            assert llm.cancel_requested
            assert llm("the cat sat").text == reference
    llm.close()

    # 5. the greedy fast path (the shim's argmax) against llama.cpp's own greedy sampler
    from cyllama_cffi import ClosedError, LlamaSampler

    model = LlamaModel(path)
    with LlamaContext(model, n_ctx=64, n_threads=2) as ctx, LlamaBatch(64) as batch:
        batch.set_tokens(list(range(3, 40)), 0)
        ctx.decode(batch)
        fast, slow = LlamaSampler().add_greedy(), LlamaSampler().add_top_k(0).add_greedy()
        assert fast.sample(ctx) == slow.sample(ctx)
        fast.close()
        slow.close()

    # 6. the cancel state outlives close(): a cancel racing with close() writes into live memory
    ctx = LlamaContext(model, n_ctx=64, n_threads=2)
    ctx.close()
    try:
        ctx.cancel = True
        raise AssertionError("cancel after close() did not raise")
    except ClosedError:
        pass
    del ctx

    # 7. interpreter exit with a daemon thread inside llama_decode: the exit hook aborts it
    llm = LLM(path, temperature=0.0, max_tokens=100000, n_ctx=4096, n_threads=2)
    started = threading.Event()

    def decode_forever() -> None:
        for index, _ in enumerate(llm.stream("the cat sat")):
            if index == 2:
                started.set()

    threading.Thread(target=decode_forever, daemon=True).start()
    started.wait()
    print("valgrind_shim: all paths exercised", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
