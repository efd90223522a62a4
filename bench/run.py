"""Benchmarks: cyllama_cffi against native llama.cpp built from the same source.

    python bench/run.py                 # everything, default model, 2 threads
    python bench/run.py --quick         # fewer repeats
    python bench/run.py --only decode,prefill --json out.json

Native ``llama-bench`` (and this binding) run interleaved in one process tree
(A B, B A, A B, ...), so both see the same machine state; each row reports the
min and median of the repeats, the ratio of medians and the median of the paired
ratios (each sample against its neighbour of the other side). In the decode and prefill
rows every sample of either side is a fresh process with a warm-up run, as a
llama-bench repetition is (see ``sample_in_fresh_process``). Rows:

  decode    128 new tokens, greedy, through ``LLM`` streaming  vs  tg128, each at its defaults
            (both map the model file); then both with a private copy of the weights on huge
            pages (``decode-private``: ``use_mmap=False`` vs ``-lm none`` under glibc's
            huge-page tunable)
  prefill   512- and 4096-token prompts through ``LLM``        vs  pp512 / pp4096, and pp4096
            again with glibc's huge pages on both sides; the binding decodes llama-bench's
            own prompt tokens (bench/native_tokens.py)
  cancel    between tokens (stream suspended), at a random moment of decoding, mid-prefill
            (cancel() from another thread), SIGINT mid-prefill (real child process)
  machinery decode with the C abort callback vs the same LLM with it removed
  startup   import time (fresh process), model load time (mmap, and the private copy on huge pages)
  pypy      decode/prefill rows again under PyPy, when a PyPy venv with the package exists
  ubatch    pp4096 throughput for several n_ubatch values (fresh processes, in rotation) and the
            wait for ggml's next abort poll at a random moment of that prefill (node durations)

Output: a table on stdout and a JSON file (``bench/results/latest.json`` by default).
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.native_tokens import llama_bench_prompts  # noqa: E402  (needs REPO on the path)

LONG_UNIT = "The quick brown fox jumps over the lazy dog. "  # 10 tokens with SmolLM2
DECODE_PROMPT = "Once upon a time, in a land far away,"


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[index]


def summary(values: List[float]) -> Dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "p50": percentile(values, 50), "p99": percentile(values, 99), "n": len(values),
            "values": list(values)}  # in run order: the spread and the drift stay visible


# -- native llama-bench ---------------------------------------------------------------

def native_bench_binary() -> Path:
    import build_libllama

    native = build_libllama.build_native(targets=("llama", "llama-bench"))
    binary = native.bin_dir / "llama-bench" if native.bin_dir else None
    if binary is None or not binary.is_file():
        raise SystemExit("llama-bench was not built (a prebuilt CYLLAMA_LIBLLAMA_DIR has no llama-bench)")
    return binary


# glibc's malloc backs its big (mmap) chunks with transparent huge pages under this tunable; the
# KV cache and compute buffers are such chunks. See docs/performance.md (pp4096) for why a row
# runs both sides with it.
HUGEPAGES_ENV = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def run_llama_bench(binary: Path, model: Path, threads: int, n_prompt: int, n_gen: int,
                    n_ubatch: int = 512, env: Optional[Dict[str, str]] = None, extra: Sequence[str] = ()) -> float:
    """tokens/s of one llama-bench repetition (``env``: its environment, None: this one's)."""
    command = [str(binary), "-m", str(model), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
               "-r", "1", "-ub", str(n_ubatch), "-o", "json", *extra]
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    rows = json.loads(result.stdout)
    return float(rows[0]["avg_ts"])


# -- this binding ---------------------------------------------------------------------------

def make_llm(model: Path, threads: int, **overrides: Any):
    from cyllama_cffi import LLM

    return LLM(model, temperature=0.0, n_threads=threads, **overrides)


def long_prompt(llm, n_tokens: int) -> str:
    text = LONG_UNIT * (n_tokens // 10 + 2)
    tokens = llm.tokenize(text)[:n_tokens]
    return llm.detokenize(tokens)


def binding_decode(llm, n_gen: int = 128, n_ctx: Optional[int] = 1024) -> float:
    """Generation tokens/s of one 128-token greedy stream (``n_ctx`` None: sized to fit, as tg128's)."""
    config = llm.config.replace(max_tokens=n_gen, n_ctx=n_ctx)
    stream = llm.stream(DECODE_PROMPT, config=config)
    for _ in stream:
        pass
    stats = stream.stats
    if stats.generated_tokens != n_gen:
        raise RuntimeError(f"decode run produced {stats.generated_tokens} tokens, not {n_gen}")
    return stats.tokens_per_second


def native_prompts(llm, n_prompt: int) -> Tuple[List[int], List[int]]:
    """The tokens of llama-bench's warm-up and timed ``pp n_prompt`` runs (bench/native_tokens.py)."""
    vocab = llm.vocab
    warmup, timed = llama_bench_prompts(n_prompt, llm.config.n_batch, vocab.n_tokens, vocab.bos, vocab.add_bos)
    return warmup, timed  # noqa: RET504 - the unpacking checks there are exactly two runs


def prefill_stats(llm, prompt: Union[str, Sequence[int]], n_ubatch: Optional[int] = None, n_ctx: Optional[int] = 8192):
    """The stats of one ``llm(prompt)`` that only prefills (``n_ubatch`` None: the default's)."""
    config = llm.config.replace(max_tokens=1, n_ctx=n_ctx, n_ubatch=n_ubatch or llm.config.n_ubatch)
    return llm(prompt, config=config).stats


def binding_prefill(llm, prompt: Union[str, Sequence[int]], n_ubatch: Optional[int] = None, n_ctx: Optional[int] = 8192) -> float:
    """Prefill tokens/s of one ``llm(prompt)`` (``n_ubatch`` None: the default's)."""
    stats = prefill_stats(llm, prompt, n_ubatch, n_ctx)
    return stats.prompt_tokens / stats.prompt_time


def sample_in_fresh_process(model: Path, threads: int, kind: str, env: Optional[Dict[str, str]] = None) -> float:
    """One repetition the way ``llama-bench`` makes one: a new process, a warm-up run, the timed run.

    ``kind``: ``decode`` or ``prefillN``. Every llama-bench repetition is a new process with new
    KV and compute buffers, and on a VM the speed of a long prefill
    depends on that allocation: with identical code and settings, one context runs 4096-token
    prefills at ~310 tok/s and the next at ~350, every time (bimodal, same virtual addresses).
    A row that reused one context compared one draw of that lottery with many; here both sides
    draw anew for every sample.
    """
    command = [sys.executable, str(Path(__file__).resolve()), "--model", str(model), "--threads", str(threads),
               "--sample", kind]
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return float(result.stdout.split()[-1])


def run_sample(model: Path, threads: int, kind: str) -> float:
    """The child side of :func:`sample_in_fresh_process`.

    A prefill of N is a prompt of N-1 tokens plus the one generated token in a context of exactly
    N cells: the same KV cache llama-bench's ``pp N`` decodes into, and the same tokens (those of
    llama-bench's warm-up run for the warm-up, of its timed run for the timed one). n_batch and
    n_ubatch are the binding's defaults (2048 and 512, as llama-bench's).
    """
    llm = make_llm(model, threads, **({"use_mmap": False} if kind == "decode-private" else {}))
    if kind.startswith("decode"):  # decode: the default load (mmap); decode-private: the private copy
        binding_decode(llm, n_ctx=None)  # warm-up, as llama-bench's
        value = binding_decode(llm, n_ctx=None)
    else:  # prefillN, or prefillN/U for n_ubatch U
        n_prompt_text, _, n_ubatch_text = kind[len("prefill"):].partition("/")
        n_prompt, n_ubatch = int(n_prompt_text), int(n_ubatch_text) if n_ubatch_text else None
        warmup, timed = native_prompts(llm, n_prompt)
        binding_prefill(llm, warmup[:n_prompt - 1], n_ubatch=n_ubatch, n_ctx=n_prompt)
        value = binding_prefill(llm, timed[:n_prompt - 1], n_ubatch=n_ubatch, n_ctx=n_prompt)
    llm.close()
    return value


def interleaved(name: str, repeats: int, native: Callable[[], float], ours: Callable[[], float],
                results: Dict[str, Any]) -> None:
    """``repeats`` pairs (rounded up to even), A B, B A, A B, ...: each side runs first equally
    often. Back-to-back runs on this VM drift by a percent or two with their place in a
    sequence, so an odd count would tilt the ratio toward the side that led more often."""
    native_values: List[float] = []
    our_values: List[float] = []
    for index in range(repeats + repeats % 2):
        if index % 2:
            our_values.append(ours())
            native_values.append(native())
        else:
            native_values.append(native())
            our_values.append(ours())
    # Paired: each sample against its neighbour of the other side, so drift of the machine
    # over the run (several percent on this VM) cancels out of every ratio.
    paired = [mine / theirs for mine, theirs in zip(our_values, native_values)]
    row = {"native": summary(native_values), "binding": summary(our_values),
           "ratio_median": statistics.median(our_values) / statistics.median(native_values),
           "ratio_paired_median": statistics.median(paired)}
    results[name] = row
    print(f"{name:<28} native {row['native']['median']:8.1f} tok/s (min {row['native']['min']:.1f})   "
          f"binding {row['binding']['median']:8.1f} tok/s (min {row['binding']['min']:.1f})   "
          f"ratio {row['ratio_median']:.3f}  paired {row['ratio_paired_median']:.3f}", flush=True)


# -- cancellation latency ----------------------------------------------------------------------

def cancel_between_tokens(llm, trials: int) -> List[float]:
    """The token-loop layer alone: ``cancel()`` from another thread while the stream is between
    tokens (the consumer holds a chunk), measured from the ``cancel()`` call to the end of the
    stream. This is the ``Event`` check plus the finish path, with no decode in flight."""
    latencies = []
    config = llm.config.replace(max_tokens=100000, n_ctx=2048)
    request, issued = threading.Event(), threading.Event()
    marks: Dict[str, float] = {}

    def canceller() -> None:
        while request.wait() and not marks.get("stop"):
            request.clear()
            marks["cancel"] = time.perf_counter()
            llm.cancel()
            issued.set()

    thread = threading.Thread(target=canceller, daemon=True)
    thread.start()
    try:
        for _ in range(trials):
            stream = llm.stream(DECODE_PROMPT, config=config)
            cut = random.randint(3, 60)
            for index, _ in enumerate(stream):
                if index == cut:
                    request.set()
                    issued.wait()  # suspended between tokens until the cancel is in
                    issued.clear()
            end = time.perf_counter()
            if stream.finish_reason != "cancelled" or len(stream.generated) > cut + 8:
                raise RuntimeError("generation did not stop at the cancel")
            latencies.append(end - marks["cancel"])
    finally:
        marks["stop"] = 1.0
        request.set()
        thread.join()
    return latencies


def cancel_by_timer(llm, stream, delay: float, marks: Optional[Dict[str, float]] = None) -> float:
    """Consume ``stream`` while a timer calls ``llm.cancel()`` after ``delay`` seconds; return the
    seconds from that ``cancel()`` call to the end of the stream (``marks["cancel"]``: its time)."""
    marks = {} if marks is None else marks

    def cancel() -> None:
        marks["cancel"] = time.perf_counter()
        llm.cancel()

    timer = threading.Timer(delay, cancel)
    timer.start()
    for _ in stream:
        pass
    end = time.perf_counter()
    timer.join()
    return end - marks["cancel"]


def cancel_during_decoding(llm, trials: int) -> List[float]:
    """``cancel()`` from a timer at a random moment of steady-state generation: nearly always it
    lands inside the single-token ``llama_decode`` and the C abort callback ends it at the next
    graph node, so the tail is the longest node of the graph (the output projection)."""
    latencies = []
    config = llm.config.replace(max_tokens=100000, n_ctx=2048)
    for _ in range(trials):
        stream = llm.stream(DECODE_PROMPT, config=config)
        latency = cancel_by_timer(llm, stream, random.uniform(0.05, 0.4))
        if stream.finish_reason != "cancelled":
            raise RuntimeError("generation ended before the cancel")
        latencies.append(latency)
    return latencies


def prefill_seconds(llm, prompt: str, n_ubatch: Optional[int] = None) -> float:
    """How long one prefill of ``prompt`` takes here: the span a random cancel moment is drawn from."""
    return prefill_stats(llm, prompt, n_ubatch).prompt_time


def random_moments(duration: float, trials: int) -> List[float]:
    """``trials`` moments drawn uniformly over the middle 96 % of a prefill of ``duration`` seconds.

    Uniform over the *whole* prefill: graph nodes grow with the KV cache (attention over n_kv
    positions), so the late part of a long prompt has the longest nodes; a draw from its first
    seconds only would measure the short early nodes.
    """
    return [random.uniform(0.02, 0.98) * duration for _ in range(trials)]


def cancel_mid_prefill(llm, trials: int, n_tokens: int = 4000,
                       n_ubatch: Optional[int] = None) -> Tuple[List[float], List[float]]:
    """``cancel()`` from a timer at a uniformly random moment of a long prefill (``n_ubatch``: the
    default's). Returns two latencies per trial, both from the ``cancel()`` call: to the end of
    the stream (the caller has control back), and to the return of the prefill chunk's
    ``llama_decode`` (the cores are free; ggml stops at its next graph node)."""
    stream_ends, decode_returns = [], []
    prompt = long_prompt(llm, n_tokens)
    config = llm.config.replace(max_tokens=4, n_ctx=8192, n_ubatch=n_ubatch or llm.config.n_ubatch)
    for delay in random_moments(prefill_seconds(llm, prompt, n_ubatch), trials):
        stream = llm.stream(prompt, config=config)
        marks: Dict[str, float] = {}
        latency = cancel_by_timer(llm, stream, delay, marks)
        helper = llm._seq._helper  # the prompt's helper thread, if the chunk is still decoding
        if helper is not None:
            helper.join()  # returns when the chunk's decode has (at once if it had)
        decode_returns.append(time.perf_counter() - marks["cancel"])
        if stream.finish_reason != "cancelled" or stream.stats.generated_tokens:
            raise RuntimeError("prefill finished before the cancel; use a longer prompt")
        stream_ends.append(latency)
    return stream_ends, decode_returns


SIGINT_CHILD = r"""
import sys, time
from cyllama_cffi import LLM
llm = LLM(sys.argv[1], temperature=0.0, max_tokens=4, n_threads=int(sys.argv[2]))
handle = llm.install_sigint_handler()
stream = llm(sys.argv[3], stream=True)
print("PREFILL", flush=True)
for _ in stream:
    pass
print("BACK", time.monotonic(), llm.last_finish_reason, flush=True)
"""


def sigint_mid_prefill(model: Path, threads: int, trials: int, prompt: str, duration: float) -> List[float]:
    """SIGINT to a real child at a uniformly random moment of its prefill (``duration``: one
    prefill of ``prompt`` measured in this process with the same settings)."""
    latencies = []
    for delay in random_moments(duration, trials):
        child = subprocess.Popen([sys.executable, "-c", SIGINT_CHILD, str(model), str(threads), prompt],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().startswith("PREFILL")
            time.sleep(delay)
            sent = time.monotonic()
            child.send_signal(signal.SIGINT)
            line = child.stdout.readline().split()
            if len(line) < 3 or line[2] != "cancelled":
                raise RuntimeError(f"child did not report a cancelled prefill: {line}")
            latencies.append(float(line[1]) - sent)
        finally:
            child.kill()
            child.wait()
    return latencies


def latency_row(name: str, values: List[float], results: Dict[str, Any]) -> None:
    row = summary([v * 1000 for v in values])
    results[name] = {"unit": "ms", **row}
    print(f"{name:<28} p50 {row['p50']:7.2f} ms   p99 {row['p99']:7.2f} ms   max {row['max']:7.2f} ms   "
          f"(n={row['n']})", flush=True)


# -- n_ubatch: throughput against the length of graph nodes ---------------------------------------

UBATCH_SIZES = (128, 256, 512)


def abort_poll_times(model: Path, threads: int, tokens: Sequence[int], n_ubatch: int) -> List[float]:
    """The moments ggml polled the abort callback during one prefill of ``tokens``.

    ggml's CPU backend polls once per graph node (after thread 0's share of it), so the gaps
    are the node durations: a cancel landing inside a gap waits for the rest of it. A Python
    callback stamps each poll (~1 us each against nodes of milliseconds)."""
    from cyllama_cffi.lowlevel.batch import LlamaBatch
    from cyllama_cffi.lowlevel.context import LlamaContext
    from cyllama_cffi.lowlevel.model import LlamaModel

    stamps: List[float] = []
    clock = time.perf_counter
    with LlamaModel(str(model)) as llama_model, \
            LlamaContext(llama_model, n_ctx=len(tokens) + 1, n_ubatch=n_ubatch, n_threads=threads) as ctx, \
            LlamaBatch(ctx.n_batch) as batch:
        ctx.set_abort_callback(lambda: stamps.append(clock()) and False)
        for start in range(0, len(tokens), n_ubatch):
            batch.set_tokens(tokens[start:start + n_ubatch], start, logits_last=start + n_ubatch >= len(tokens))
            ctx.decode(batch)
    return stamps


def wait_at_random_moments(stamps: Sequence[float], samples: int = 20000) -> List[float]:
    """Seconds from uniformly random moments between the first and last poll to the next poll."""
    draw = random.Random(7)
    waits = []
    for _ in range(samples):
        moment = draw.uniform(stamps[0], stamps[-1])
        waits.append(stamps[min(bisect.bisect_right(stamps, moment), len(stamps) - 1)] - moment)
    return waits


def ubatch_sweep(model: Path, threads: int, rounds: int) -> Dict[str, Any]:
    """pp4096 throughput for each n_ubatch in fresh processes, sizes in rotation (so drift hits
    all alike), and what each size implies for a cancel at a random moment of that prefill:
    the wait for ggml's next abort poll, from the node durations of one measured prefill."""
    speeds: Dict[int, List[float]] = {size: [] for size in UBATCH_SIZES}
    for round_index in range(rounds):
        order = UBATCH_SIZES if round_index % 2 == 0 else tuple(reversed(UBATCH_SIZES))
        for size in order:
            speeds[size].append(sample_in_fresh_process(model, threads, f"prefill4096/{size}"))
    with make_llm(model, threads) as llm:  # leaving the block frees the model too
        tokens = native_prompts(llm, 4096)[1][:4095]
    sweep: Dict[str, Any] = {}
    fastest = max(statistics.median(values) for values in speeds.values())
    for size in UBATCH_SIZES:
        stamps = abort_poll_times(model, threads, tokens, size)
        gaps = [later - earlier for earlier, later in zip(stamps, stamps[1:])]
        waits = summary([wait * 1000 for wait in wait_at_random_moments(stamps)])
        del waits["values"]  # 20,000 draws: the percentiles are the result
        speed = statistics.median(speeds[size])
        sweep[str(size)] = {"prefill_tok_s": summary(speeds[size]), "prefill_vs_fastest": speed / fastest,
                            "samples": speeds[size], "longest_node_ms": max(gaps) * 1000,
                            "abort_wait_at_random_moment_ms": waits}
        print(f"n_ubatch {size:<5} pp4096 {speed:7.1f} tok/s ({speed / fastest:.3f} of the fastest, "
              f"{len(speeds[size])} fresh processes)   abort wait at a random moment p50 {waits['p50']:.1f} ms "
              f"p99 {waits['p99']:.1f} ms   longest node {max(gaps) * 1000:.1f} ms", flush=True)
    return sweep


# -- startup ---------------------------------------------------------------------------------------

def import_time(python: str, repeats: int, bare: bool = False) -> List[float]:
    """Seconds ``import cyllama_cffi`` takes in a fresh process, its bytecode cached.

    Cached because an installed package's is (pip compiles it on install); a process started
    with ``PYTHONDONTWRITEBYTECODE=1`` and no cache would time the compiler instead (about twice
    the figure on the machine of docs/performance.md). ``bare``: with ``-S``, so that nothing
    ``site`` imports (an editable install's finder brings pathlib, re, typing...) is there yet:
    everything the package needs is charged to it.
    """
    # Also the warm-up: this first import writes the bytecode cache the timed ones read.
    package_dirs = subprocess.run(
        [python, "-c", "import os, _cffi_backend, cyllama_cffi as c; "
                       "print(os.path.dirname(os.path.dirname(c.__file__)), os.path.dirname(_cffi_backend.__file__))"],
        capture_output=True, text=True, check=True, cwd="/", env=_bytecode_env()).stdout.split()
    prefix = f"import sys; sys.path[:0] = {package_dirs!r}; " if bare else ""
    code = prefix + "import time; t = time.perf_counter(); import cyllama_cffi; print(time.perf_counter() - t)"
    command = [python] + (["-S"] if bare else []) + ["-c", code]
    values = []
    for _ in range(repeats):
        out = subprocess.run(command, capture_output=True, text=True, check=True, cwd="/", env=_bytecode_env())
        values.append(float(out.stdout))
    return values


def _bytecode_env() -> Dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}


def load_time(model: Path, repeats: int, use_mmap: bool = True) -> List[float]:
    from cyllama_cffi import LlamaModel

    values = []
    for _ in range(repeats):
        started = time.perf_counter()
        LlamaModel(model, use_mmap=use_mmap).close()
        values.append(time.perf_counter() - started)
    return values


# -- PyPy -------------------------------------------------------------------------------------------

def find_pypy() -> Optional[str]:
    for candidate in (REPO / ".venv-pypy" / "bin" / "python", Path(os.environ.get("CYLLAMA_PYPY", "/nonexistent"))):
        if candidate.is_file():
            return str(candidate)
    return None


PYPY_WORKER = (
    "import json, sys; sys.path.insert(0, sys.argv[1]); from bench import run as b; from pathlib import Path\n"
    "llm = b.make_llm(Path(sys.argv[2]), int(sys.argv[3]))\n"
    "b.binding_decode(llm)  # warm-up: context, JIT\n"
    "for line in sys.stdin:\n"
    "    kind = line.strip()\n"
    "    value = b.binding_decode(llm) if kind == 'decode' else b.binding_prefill(llm, b.native_prompts(llm, 512)[1])\n"
    "    print(json.dumps(value), flush=True)\n"
)


def pypy_rows(pypy: str, model: Path, threads: int, repeats: int, binary: Path, llm) -> Dict[str, Any]:
    """Decode and prefill-512 under PyPy, interleaved with native llama-bench and CPython.

    One PyPy process stays up (its JIT warm) and measures one row per request, so each
    repeat is native, CPython, PyPy back to back and the ratios share the machine's state.
    """
    worker = subprocess.Popen([pypy, "-c", PYPY_WORKER, str(REPO), str(model), str(threads)], cwd=str(REPO),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def on_pypy(kind: str) -> float:
        worker.stdin.write(kind + "\n")
        worker.stdin.flush()
        line = worker.stdout.readline()
        if not line:
            raise RuntimeError(worker.stderr.read()[-2000:])
        return float(line)

    prompt512 = native_prompts(llm, 512)[1]
    measures = {
        "decode": (lambda: run_llama_bench(binary, model, threads, 0, 128), lambda: binding_decode(llm)),
        "prefill512": (lambda: run_llama_bench(binary, model, threads, 512, 0),
                       lambda: binding_prefill(llm, prompt512)),
    }
    rows: Dict[str, Any] = {}
    try:
        for kind, (native, cpython) in measures.items():
            values: Dict[str, List[float]] = {"native": [], "cpython": [], "pypy": []}
            on_pypy(kind)  # warm-up of this row's code path
            for _ in range(repeats):
                values["native"].append(native())
                values["cpython"].append(cpython())
                values["pypy"].append(on_pypy(kind))
            rows[kind] = {name: summary(series) for name, series in values.items()}
            rows[kind]["pypy_vs_native"] = statistics.median(values["pypy"]) / statistics.median(values["native"])
            rows[kind]["pypy_vs_cpython"] = statistics.median(values["pypy"]) / statistics.median(values["cpython"])
    except Exception as error:  # noqa: BLE001 - reported in the table, the other rows still count
        return {"error": str(error)}
    finally:
        worker.stdin.close()
        worker.wait(timeout=60)
    return rows


# -- main ---------------------------------------------------------------------------------------------

def machine_info() -> Dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores_usable": len(os.sched_getaffinity(0)), "python": sys.version.split()[0],
            "implementation": platform.python_implementation(), "platform": platform.platform()}


def write_results(path: str, results: Dict[str, Any]) -> None:
    """The run's JSON file (its directory made if missing), and where it went."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"results written to {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="GGUF (default: the default model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=16)
    parser.add_argument("--long-repeats", type=int, default=10,
                        help="repeats of the pp4096 row, whose samples spread the most (see sample_in_fresh_process)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and trials")
    parser.add_argument("--sample", help=argparse.SUPPRESS)  # child of sample_in_fresh_process
    parser.add_argument("--only", default="decode,prefill,cancel,machinery,startup,pypy,ubatch",
                        help="comma-separated rows; decode is decode-default,decode-private and "
                             "prefill is pp512,pp4096,pp4096-hugepages, each also on its own")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "latest.json"))
    args = parser.parse_args()

    from cyllama_cffi.models import default_model_path

    model = default_model_path(args.model)
    if args.sample:
        print(run_sample(model, args.threads, args.sample))
        return 0
    parts = set(args.only.split(","))
    if "prefill" in parts:
        parts |= {"pp512", "pp4096", "pp4096-hugepages"}
    if "decode" in parts:
        parts |= {"decode-default", "decode-private"}
    repeats = 2 if args.quick else args.repeats
    if args.quick:
        args.long_repeats = 2
    results: Dict[str, Any] = {"machine": machine_info(), "threads": args.threads, "model": model.name,
                               "command": " ".join([Path(sys.executable).name] + sys.argv)}
    print(f"machine: {results['machine']}  threads: {args.threads}  model: {model.name}", flush=True)

    llm = make_llm(model, args.threads)
    if parts & {"decode-default", "decode-private", "pp512", "pp4096", "pp4096-hugepages", "ubatch"}:
        binary = native_bench_binary()
    if "decode-default" in parts:  # each side as a user gets it
        interleaved("decode tg128", repeats, lambda: run_llama_bench(binary, model, args.threads, 0, 128),
                    lambda: sample_in_fresh_process(model, args.threads, "decode"), results)
    if "decode-private" in parts:  # llama-bench's weights read into memory that glibc puts on huge pages
        interleaved("decode tg128 private+huge", repeats,
                    lambda: run_llama_bench(binary, model, args.threads, 0, 128, env=HUGEPAGES_ENV, extra=("-lm", "none")),
                    lambda: sample_in_fresh_process(model, args.threads, "decode-private", env=HUGEPAGES_ENV),
                    results)
    for n_prompt, row_repeats in ((512, repeats), (4096, args.long_repeats)):
        if f"pp{n_prompt}" in parts:
            interleaved(f"prefill pp{n_prompt}", row_repeats,
                        lambda: run_llama_bench(binary, model, args.threads, n_prompt, 0),
                        lambda: sample_in_fresh_process(model, args.threads, f"prefill{n_prompt}"), results)
    if "pp4096-hugepages" in parts:
        # Page placement decides much of a long prefill's speed on a VM (docs/performance.md);
        # huge pages on both sides take most of that lottery out of the comparison.
        interleaved("prefill pp4096 hugepages", args.long_repeats,
                    lambda: run_llama_bench(binary, model, args.threads, 4096, 0, env=HUGEPAGES_ENV),
                    lambda: sample_in_fresh_process(model, args.threads, "prefill4096", env=HUGEPAGES_ENV), results)
    if "cancel" in parts:
        latency_row("cancel between tokens", cancel_between_tokens(llm, 10 if args.quick else 40), results)
        latency_row("cancel during decoding", cancel_during_decoding(llm, 10 if args.quick else 60), results)
        stream_ends, decode_returns = cancel_mid_prefill(llm, 5 if args.quick else 12)
        latency_row("cancel mid-prefill", stream_ends, results)
        latency_row("  its llama_decode returned", decode_returns, results)
        prompt4000 = long_prompt(llm, 4000)
        latency_row("SIGINT mid-prefill", sigint_mid_prefill(model, args.threads, 5 if args.quick else 12, prompt4000,
                                                             prefill_seconds(llm, prompt4000)), results)
    if "machinery" in parts:
        # Back-to-back pairs, the order alternating, and the median of the per-pair ratios: the
        # machine's drift between pairs (several % on a shared VM) cancels out of each ratio.
        # "Without": the same LLM with its context's abort callback removed from outside, so
        # ggml polls nothing per graph node (the per-token Event check stays: a few ns).
        from cyllama_cffi import ffi, lib

        plain = make_llm(model, args.threads)
        with_values, without_values, ratios = [], [], []
        binding_decode(plain)  # creates the context, which the same config keeps reusing
        lib.llama_set_abort_callback(plain._seq.ctx.ptr, ffi.NULL, ffi.NULL)
        for index in range(repeats * 4):
            if index % 2:
                without_values.append(binding_decode(plain))
                with_values.append(binding_decode(llm))
            else:
                with_values.append(binding_decode(llm))
                without_values.append(binding_decode(plain))
            ratios.append(with_values[-1] / without_values[-1])
        plain.close()
        cost = 1 - statistics.median(ratios)
        results["machinery"] = {"with": summary(with_values), "without": summary(without_values), "cost": cost,
                                "pairs": len(ratios)}
        print(f"{'cancellation machinery':<28} with {statistics.median(with_values):8.1f} tok/s   without "
              f"{statistics.median(without_values):8.1f} tok/s   cost {cost * 100:+.2f} % "
              f"(median of {len(ratios)} paired ratios)", flush=True)
    if "startup" in parts:
        latency_row("import (fresh process)", import_time(sys.executable, repeats * 2), results)
        latency_row("import (fresh process, -S)", import_time(sys.executable, repeats * 2, bare=True), results)
        latency_row("model load", load_time(model, repeats), results)
        latency_row("model load (private, huge pages)", load_time(model, repeats, use_mmap=False), results)
    if "pypy" in parts:
        pypy = find_pypy()
        if pypy is None:
            print("pypy: no .venv-pypy (create it as in the README) - rows skipped", flush=True)
        else:
            rows = pypy_rows(pypy, model, args.threads, repeats, native_bench_binary(), llm)
            results["pypy"] = rows
            if "error" in rows:
                print(f"pypy: failed: {rows['error']}", flush=True)
            for kind, row in rows.items():
                if kind == "error":
                    continue
                print(f"{'PyPy ' + kind:<28} native {row['native']['median']:8.1f}   CPython "
                      f"{row['cpython']['median']:8.1f}   PyPy {row['pypy']['median']:8.1f} tok/s   "
                      f"PyPy/native {row['pypy_vs_native']:.3f}   PyPy/CPython {row['pypy_vs_cpython']:.3f}",
                      flush=True)
    if "ubatch" in parts:
        results["ubatch_sweep"] = ubatch_sweep(model, args.threads, max(2, args.long_repeats // 2))
    llm.close()

    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
