"""Ctrl-C: a real SIGINT to a real child process interrupts a running prefill (an LLM's, a
BatchGenerator's)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cyllama_cffi import LLM, lib

CHILD = r"""
import sys, time
from cyllama_cffi import LLM
llm = LLM(sys.argv[1], temperature=0.0, max_tokens=8)
reference = llm("The capital of France is").text
handle = llm.install_sigint_handler()
if sys.argv[2] == "idle":
    print("IDLE", flush=True)
    sys.stdin.readline()          # the parent sends SIGINT while we wait here
stream = llm("The quick brown fox jumps over the lazy dog. " * 300, stream=True)
print("PREFILL", flush=True)
text = "".join(stream)
print("BACK", time.monotonic(), llm.last_finish_reason, len(text), flush=True)
again = llm("The capital of France is")
print("AGAIN", again.finish_reason, again.text == reference, flush=True)
handle.restore()
print("RESTORED", flush=True)
"""


def run_child(model_path: Path, mode: str):
    return subprocess.Popen([sys.executable, "-c", CHILD, str(model_path), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_line(process, prefix: str) -> str:
    line = process.stdout.readline()
    assert line.startswith(prefix), f"expected {prefix}, got {line!r}; stderr: {process.stderr.read()}"
    return line


def test_sigint_interrupts_a_running_prefill_within_100ms(model_path):
    child = run_child(model_path, "busy")
    try:
        read_line(child, "PREFILL")
        time.sleep(0.5)  # the child is now inside a ~10 s prefill
        sent = time.monotonic()
        child.send_signal(signal.SIGINT)
        back = read_line(child, "BACK").split()
        latency = float(back[1]) - sent
        assert back[2] == "cancelled"
        assert latency < 0.1, f"Ctrl-C took {latency * 1000:.1f} ms to stop the prefill"
        again = read_line(child, "AGAIN").split()
        assert again[2] == "True"  # the LLM generates again, same text as before the Ctrl-C
    finally:
        child.kill()
        child.wait()


BATCH_CHILD = r"""
import sys, time
from cyllama_cffi import BatchGenerator, GenerationConfig
config = GenerationConfig(temperature=0.0, max_tokens=8)
short = ["The capital of France is", "Water boils at"]
with BatchGenerator(sys.argv[1], batch_size=4096, n_ctx=8192, n_seq_max=2) as generator:
    reference = [r.text for r in generator.generate_batch(short, config)]
    with generator.install_sigint_handler():
        print("PREFILL", flush=True)  # one step reads both prompts: a ~10 s decode
        responses = generator.generate_batch(["The quick brown fox jumps over the lazy dog. " * 300, short[1]],
                                             config)
        print("BACK", time.monotonic(), *[r.finish_reason for r in responses], flush=True)
        print("AGAIN", [r.text for r in generator.generate_batch(short, config)] == reference, flush=True)
"""


def test_sigint_interrupts_a_batch_generators_decode_long_before_it_ends(model_path):
    child = subprocess.Popen([sys.executable, "-c", BATCH_CHILD, str(model_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        read_line(child, "PREFILL")
        time.sleep(0.5)  # the child is now inside the step's decode
        sent = time.monotonic()
        child.send_signal(signal.SIGINT)
        back = read_line(child, "BACK").split()
        latency = float(back[1]) - sent
        assert back[2:] == ["cancelled", "cancelled"]
        # ggml checks the abort flag between graph nodes; one node of this ~3,000-token
        # micro-batch takes ~100 ms on a 2-core CPU, while a decode that ignored the flag would
        # run its whole ~10 s.
        assert latency < 0.5, f"Ctrl-C took {latency * 1000:.1f} ms to stop the batch's decode"
        assert read_line(child, "AGAIN").split()[1] == "True"  # and the generator works as before
        assert child.wait(30) == 0
    finally:
        child.kill()
        child.wait()


def test_sigint_while_idle_does_not_cancel_the_next_generation(model_path):
    child = run_child(model_path, "idle")
    try:
        read_line(child, "IDLE")
        child.send_signal(signal.SIGINT)
        time.sleep(0.2)  # let the handler run before the generation starts
        child.stdin.write("go\n")
        child.stdin.flush()
        read_line(child, "PREFILL")
        time.sleep(0.5)
        child.send_signal(signal.SIGINT)
        back = read_line(child, "BACK").split()
        assert back[2] == "cancelled"
        again = read_line(child, "AGAIN").split()
        assert again[2] == "True"
        read_line(child, "RESTORED")
        assert child.wait(30) == 0
    finally:
        child.kill()
        child.wait()


def test_handler_restores_exactly_the_previous_one(model_path):
    with LLM(model_path, max_tokens=2) as llm:
        before = signal.getsignal(signal.SIGINT)
        outer = llm.install_sigint_handler()
        outer_python = signal.getsignal(signal.SIGINT)
        assert outer_python is not before and lib.cyl_sigint_hook_is_current()
        with llm.install_sigint_handler() as inner:
            assert inner.active and lib.cyl_sigint_hook_is_current()
        assert signal.getsignal(signal.SIGINT) is outer_python
        assert lib.cyl_sigint_hook_is_current()  # the outer handle's C hook is back on top
        outer.restore()
        outer.restore()  # idempotent
        assert signal.getsignal(signal.SIGINT) is before
        assert not lib.cyl_sigint_hook_is_current()


def test_handler_calls_cancel_instead_of_raising(model_path):
    with LLM(model_path, max_tokens=2) as llm:
        with llm.install_sigint_handler():
            signal.raise_signal(signal.SIGINT)
            time.sleep(0)  # let the Python-level handler run
            assert llm.cancel_requested


def test_install_off_the_main_thread_is_a_value_error(model_path):
    with LLM(model_path, max_tokens=2) as llm:
        errors = []

        def install():
            try:
                llm.install_sigint_handler()
            except ValueError as error:
                errors.append(error)

        worker = threading.Thread(target=install)
        worker.start()
        worker.join()
        assert len(errors) == 1 and "main thread" in str(errors[0])
