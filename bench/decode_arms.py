"""Where a decode gap comes from: the binding, the Python process, or the machine.

    python bench/decode_arms.py                 # 24 rounds of four arms, then the in-process split
    python bench/decode_arms.py --rounds 40 --json bench/results/decode-arms.json

Why: on a shared VM one sample of ``tg128`` moves by ±15 %, and the ``decode`` row of
bench/run.py (binding vs native, paired) lands anywhere within a few percent of 1.0 from run to
run. This script separates the candidates, every sample a fresh process, arms in rotation:

- ``native``: ``llama-bench -p 0 -n 128``, one repetition (what the decode row compares with);
- ``llama-bench in Python``: the same llama-bench code (its ``libllama-bench-impl.so``, the
  ``llama_bench(int, char**)`` entry point) called through ctypes inside a Python process: the
  process is Python's, the work is llama-bench's;
- ``bare cffi loop``: llama-bench's ``tg128`` calls (128 one-token ``llama_decode`` calls of
  random tokens from position 0) made from Python through this package's cffi module;
- ``LLM``: the decode row's binding side (128 greedy tokens through ``LLM`` streaming);
- with ``--llama-cpp-python PYTHON`` (an interpreter that has ``llama-cpp-python`` installed,
  e.g. built from the same pinned sdist, see docs/performance.md): that binding streaming the
  same greedy completion, and ``LLM`` timed the same way from outside (tokens after the first
  over the time from the first streamed chunk to the last), so the two bindings compare like
  for like.

Then, in one process and token by token (the drift between whole runs swamps a percent): a bare
``llama_decode`` against the shim's one-call step with its greedy argmax
(``LlamaContext.decode_token``), alternating on one context, and the ``LLM`` stream's own work
per step (the time of its ``next()`` outside the ``decode_token`` call: the choice bookkeeping,
the text, the cancel checks, the generator).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.run import (DECODE_PROMPT, binding_decode, machine_info, make_llm, native_bench_binary,  # noqa: E402
                       run_llama_bench, sample_in_fresh_process, summary, write_results)

N_GEN = 128

# Both bindings timed from outside the same way: 128 greedy tokens streamed, tokens after the
# first over the time from the first chunk to the 128th (each chunk is one token here;
# llama-cpp-python adds an empty closing chunk). argv: model, threads, binding ("llama-cpp-python" or "cyllama_cffi").
STREAM_TIMING_CHILD = r"""
import sys, time
model, threads, binding = sys.argv[1], int(sys.argv[2]), sys.argv[3]
prompt = sys.argv[4]
if binding == "llama-cpp-python":
    from llama_cpp import Llama
    # flash_attn: llama.cpp's default (auto) turns it on for this model on a CPU, llama-cpp-python's
    # default turns it off; on, both bindings run the same kernels and stream the same tokens.
    llm = Llama(model_path=model, n_threads=threads, n_threads_batch=threads, n_ctx=256, verbose=False,
                flash_attn=True)
    def chunks():
        return llm.create_completion(prompt, max_tokens=%(n)d, temperature=0.0, stream=True)
else:
    sys.path.insert(0, sys.argv[5])
    from cyllama_cffi import LLM
    llm = LLM(model, temperature=0.0, n_threads=threads, max_tokens=%(n)d, n_ctx=256)
    def chunks():
        return llm.stream(prompt)
def run():
    stamps = [time.perf_counter() for _ in chunks()]
    assert len(stamps) >= %(n)d, len(stamps)  # llama-cpp-python ends with an empty chunk
    stamps = stamps[:%(n)d]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])
run()
print(run())
""" % {"n": N_GEN}


def llama_bench_in_python(library: str, args: List[str]) -> int:
    """Child: run llama-bench's entry point inside this (Python) process."""
    entry = ctypes.CDLL(library)["_Z11llama_benchiPPc"]  # llama_bench(int, char**), C++-mangled
    entry.restype = ctypes.c_int
    argv = [b"llama-bench"] + [arg.encode() for arg in args]
    return entry(len(argv), (ctypes.c_char_p * (len(argv) + 1))(*argv, None))


def bare_loop_tokens_per_second(model: Path, threads: int) -> float:
    """Child: llama-bench's tg calls through cffi; a one-token warm-up, as llama-bench's."""
    from cyllama_cffi import LlamaContext, LlamaModel, ffi, lib

    llama_model = LlamaModel(model)
    ctx = LlamaContext(llama_model, n_ctx=N_GEN, n_threads=threads, n_threads_batch=threads)
    n_vocab = llama_model.vocab.n_tokens
    token = ffi.new("llama_token[1]")
    memory = lib.llama_get_memory(ctx._ptr)

    def run(n: int) -> float:
        lib.llama_memory_clear(memory, True)
        token[0] = llama_model.vocab.bos
        started = time.perf_counter()
        for _ in range(n):
            lib.llama_decode(ctx._ptr, lib.llama_batch_get_one(token, 1))
            lib.llama_synchronize(ctx._ptr)
            token[0] = random.randrange(n_vocab)
        return n / (time.perf_counter() - started)

    run(1)
    value = run(N_GEN)
    ctx.close()
    llama_model.close()
    return value


def stream_timed(python: str, model: Path, threads: int, binding: str) -> float:
    out = subprocess.run([python, "-c", STREAM_TIMING_CHILD, str(model), str(threads), binding, DECODE_PROMPT,
                          str(REPO)], capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def fresh_process_arms(model: Path, threads: int, llama_cpp_python: Optional[str] = None
                       ) -> Dict[str, Callable[[], float]]:
    binary = native_bench_binary()
    library = binary.parent / "libllama-bench-impl.so"
    bench_args = ["-m", str(model), "-t", str(threads), "-p", "0", "-n", str(N_GEN), "-r", "1", "-o", "json"]
    me = [sys.executable, str(Path(__file__).resolve())]

    def in_python() -> float:
        out = subprocess.run(me + ["--child", "llama-bench", str(library)] + bench_args,
                             capture_output=True, text=True, check=True).stdout
        return float(json.loads(out)[0]["avg_ts"])

    def bare() -> float:
        out = subprocess.run(me + ["--child", "bare", str(model), str(threads)],
                             capture_output=True, text=True, check=True).stdout
        return float(out.split()[-1])

    arms = {"native": lambda: run_llama_bench(binary, model, threads, 0, N_GEN),
            "llama-bench in Python": in_python,
            "bare cffi loop": bare,
            "LLM": lambda: sample_in_fresh_process(model, threads, "decode")}
    if not library.is_file():  # a llama.cpp tree whose llama-bench is one executable
        del arms["llama-bench in Python"]
    if llama_cpp_python:
        arms["llama-cpp-python (stream timed)"] = lambda: stream_timed(llama_cpp_python, model, threads,
                                                                        "llama-cpp-python")
        arms["LLM (stream timed)"] = lambda: stream_timed(sys.executable, model, threads, "cyllama_cffi")
    return arms


def rotate(arms: Dict[str, Callable[[], float]], rounds: int) -> Dict[str, List[float]]:
    """Each round runs every arm once, the starting arm moving by one per round."""
    names = list(arms)
    values: Dict[str, List[float]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            values[name].append(arms[name]())
    return values


def in_process_split(model: Path, threads: int, sequences: int) -> Dict[str, List[float]]:
    """Microseconds per decoded token of each layer, measured token by token in one process.

    Whole runs drift by percents on a shared VM, so nothing here compares runs: a bare
    ``llama_decode`` and the shim's step alternate token by token on one context (who goes first
    alternating per sequence), and the stream's own work is timed inside each of its steps, as
    the time of ``next()`` outside its ``decode_token`` call.
    """
    from cyllama_cffi import LlamaBatch, ffi, lib

    llm = make_llm(model, threads)
    config = llm.config.replace(max_tokens=N_GEN, n_ctx=None)
    binding_decode(llm, n_ctx=None)  # creates the context and warms up
    ctx = llm._seq.ctx
    prompt = llm.tokenize(DECODE_PROMPT)
    prompt_buffer = ffi.new("llama_token[]", prompt)
    memory = lib.llama_get_memory(ctx._ptr)
    token = ffi.new("llama_token[1]")
    batch = LlamaBatch(1)
    chosen = ffi.new("int32_t *")
    clock = time.perf_counter
    values: Dict[str, List[float]] = {"bare llama_decode": [], "decode_token (shim step, argmax)": [],
                                      "LLM stream step outside decode_token": []}
    for sequence in range(sequences):
        lib.llama_memory_clear(memory, True)
        lib.llama_decode(ctx._ptr, lib.llama_batch_get_one(prompt_buffer, len(prompt)))
        next_token = prompt[-1]
        for position in range(len(prompt), N_GEN):
            if position % 2 == sequence % 2:
                token[0] = next_token
                started = clock()
                lib.llama_decode(ctx._ptr, lib.llama_batch_get_one(token, 1))
                values["bare llama_decode"].append((clock() - started) * 1e6)
                next_token = random.randrange(llm.vocab.n_tokens)
            else:
                started = clock()
                ctx.decode_token(batch, next_token, position, chosen)
                values["decode_token (shim step, argmax)"].append((clock() - started) * 1e6)
                next_token = chosen[0]

    inside: List[float] = []
    step = ctx.decode_token

    def timed_step(*args: Any) -> None:  # the stream looks decode_token up once per stream
        started = clock()
        try:
            step(*args)
        finally:
            inside.append(clock() - started)

    ctx.decode_token = timed_step
    for _ in range(sequences):
        stream = iter(llm.stream(DECODE_PROMPT, config=config))
        while True:
            inside.clear()
            started = clock()
            try:
                next(stream)
            except StopIteration:
                break
            if len(inside) == 1:  # one decode in this step (some steps emit no text: two)
                values["LLM stream step outside decode_token"].append((clock() - started - inside[0]) * 1e6)
    del ctx.decode_token
    batch.close()
    llm.close()
    return values


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        if sys.argv[2] == "llama-bench":
            return llama_bench_in_python(sys.argv[3], sys.argv[4:])
        print(bare_loop_tokens_per_second(Path(sys.argv[3]), int(sys.argv[4])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="GGUF (default: the default model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=24, help="rounds of the fresh-process arms")
    parser.add_argument("--split-sequences", type=int, default=40, help="sequences of the in-process split")
    parser.add_argument("--llama-cpp-python", metavar="PYTHON",
                        help="an interpreter with llama-cpp-python installed: adds that binding's arm")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "decode-arms.json"))
    args = parser.parse_args()

    from cyllama_cffi.models import default_model_path

    model = default_model_path(args.model)
    results: Dict[str, Any] = {"machine": machine_info(), "threads": args.threads, "model": model.name,
                               "command": " ".join([Path(sys.executable).name] + sys.argv)}
    if args.rounds:  # 0: the in-process split only
        values = rotate(fresh_process_arms(model, args.threads, args.llama_cpp_python), args.rounds)
        native = values["native"]
        print(f"tg{N_GEN}, fresh processes, {args.rounds} rounds in rotation")
        print(f"{'arm':30} {'median tok/s':>12} {'min':>7} {'of native':>10} {'paired':>8}")
        for name, samples in values.items():
            row = summary(samples)
            row["of_native"] = statistics.median(samples) / statistics.median(native)
            row["paired"] = statistics.median(mine / theirs for mine, theirs in zip(samples, native))
            results[name] = row
            print(f"{name:30} {row['median']:12.1f} {row['min']:7.1f} {row['of_native']:10.3f} {row['paired']:8.3f}")

    if args.split_sequences:  # 0: the fresh-process arms only
        split = in_process_split(model, args.threads, args.split_sequences)
        bare = statistics.median(split["bare llama_decode"])
        step = statistics.median(split["decode_token (shim step, argmax)"])
        own = statistics.median(split["LLM stream step outside decode_token"])
        rows = {"bare llama_decode": (bare, 0.0), "decode_token (shim step, argmax)": (step, step - bare),
                "LLM stream step outside decode_token": (own, own)}
        print(f"\nin one process, token by token ({args.split_sequences} sequences each)")
        print(f"{'layer':38} {'median us':>10} {'adds us':>9} {'of a bare decode':>17} {'n':>6}")
        for name, (median, adds) in rows.items():
            results[f"in-process {name}"] = {"unit": "us", **summary(split[name]), "adds_us": adds}
            print(f"{name:38} {median:10.1f} {adds:9.1f} {adds / bare * 100:16.2f}% {len(split[name]):6d}")
        print(f"binding per token over a bare decode: {(step - bare + own) / bare * 100:.2f} %")
    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
