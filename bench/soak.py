"""Soak: hundreds of generations cancelled at random moments, each checked against a fresh LLM.

    python bench/soak.py --cycles 300               # the documented run (docs/reliability.md)
    python bench/soak.py --seconds 60 --json s.json # time-boxed (tests/test_soak.py)

Why: a cancel can land anywhere - between tokens, inside a prefill's
``llama_decode``, while a stream is being closed, from a signal - and each
must leave the KV cache and the LLM exactly as good as new, without leaking
memory, file descriptors or threads. One bad interleaving in a thousand is
still a production incident, so this runs many and checks every one.

Each cycle runs one generation and cancels it one way (kinds below), then
runs a greedy generation of a check prompt and compares it with what a fresh
LLM produced at the start. ``sigint`` cycles run in a child process that the
parent sends real SIGINTs to, at random moments. Reported: crashes (a
non-zero exit of this process or the child), deadlocks (a cycle over
``--cycle-timeout``; faulthandler dumps every stack and exits), mismatches,
RSS after warm-up (baseline, final, max, least-squares slope), file
descriptors and threads (OS and Python) before and after.

The context size and batch settings stay fixed: replacing the context while
another thread may call ``cancel()`` is a known crash (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

KINDS = ("tokens", "prefill", "close", "hammer", "replace", "sigint", "none")
REPLACE_UBATCHES = (64, 128, 512)  # the n_ubatch values "replace" cycles switch the context to
WORDS = ("the quick brown fox jumps over the lazy dog while a small cat sleeps on a warm mat near "
         "an old window and the rain falls softly on the garden").split()
CHECK_PROMPTS = ("The capital of France is", "Once upon a time, in a land far away,", "def fibonacci(n):")
N_CTX = 2048          # fixed: see the module docstring
MAX_TOKENS = 48       # per cancelled generation
CHECK_TOKENS = 12     # per greedy check


# -- resources -----------------------------------------------------------------------------------

def resources() -> Dict[str, float]:
    """RSS (MB), open file descriptors, OS threads and Python threads of this process."""
    rss_kb = 0
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
    return {"rss_mb": rss_kb / 1024, "fds": len(os.listdir("/proc/self/fd")),
            "os_threads": len(os.listdir("/proc/self/task")), "py_threads": threading.active_count()}


def slope(values: List[float]) -> float:
    """Least-squares slope per sample (0 for fewer than 2)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values))
    den = sum((x - mean_x) ** 2 for x in range(n))
    return num / den


def random_prompt(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


# -- the in-process cycles --------------------------------------------------------------------------

class Soak:
    """Runs cycles on one LLM and keeps the tallies."""

    def __init__(self, model: str, threads: Optional[int], seed: int) -> None:
        from cyllama_cffi import LLM

        self.rng = random.Random(seed)
        self.model = model
        settings = dict(temperature=0.0, max_tokens=MAX_TOKENS, n_ctx=N_CTX, n_threads=threads)
        with LLM(model, **settings) as fresh:  # the reference: a fresh LLM, then gone
            self.reference = {p: fresh(p, config=fresh.config.replace(max_tokens=CHECK_TOKENS)).text
                              for p in CHECK_PROMPTS}
        self.llm = LLM(model, **settings)
        self.check_config = self.llm.config.replace(max_tokens=CHECK_TOKENS)
        start = time.perf_counter()
        list(self.llm.stream(random_prompt(self.rng, 700)))  # warm-up: the longest prompt a cycle uses
        # ... and every context shape the cycles switch to, so the allocator's high-water mark
        # (glibc raises its mmap threshold after freeing big blocks) is reached before the baseline
        for n_ubatch in REPLACE_UBATCHES:
            list(self.llm.stream(random_prompt(self.rng, 700), config=self.llm.config.replace(n_ubatch=n_ubatch)))
        list(self.llm.stream(random_prompt(self.rng, 700)))
        timing = self.llm.stream(random_prompt(self.rng, 300), config=self.llm.config.replace(max_tokens=16))
        list(timing)
        stats = timing.stats
        self.prefill_rate = stats.prompt_tokens / max(stats.prompt_time, 1e-6)  # tokens/s
        self.token_time = stats.generation_time / max(stats.generated_tokens, 1)  # s/token
        self.setup_time = time.perf_counter() - start

    def check(self) -> bool:
        prompt = self.rng.choice(CHECK_PROMPTS)
        return self.llm(prompt, config=self.check_config).text == self.reference[prompt]

    def run_stream(self, prompt: str, canceller: Callable[[Any], Callable[[], None]],
                   config: Any = None) -> Dict[str, Any]:
        """Consume a stream in this thread while ``canceller(stream)`` acts from others.

        ``canceller(None)`` is called before the stream starts when a ``config`` is given: its
        threads then also run while the call replaces the LLM's context.
        """
        if config is None:
            stream = self.llm.stream(prompt)
            finish_helpers = canceller(stream)
        else:
            finish_helpers = canceller(None)
            try:
                stream = self.llm.stream(prompt, config=config)
            except BaseException:
                finish_helpers()
                raise
        chunks = list(stream)
        finish_helpers()  # join the helper threads: nothing may touch the LLM after the cycle
        text, expected = "".join(chunks), self.llm.detokenize(stream.generated)
        # a closed stream drops a trailing partial UTF-8 character that detokenize shows as U+FFFD
        consistent = text == expected or (stream.finish_reason == "cancelled" and expected.startswith(text))
        seq = self.llm._seq
        if seq is not None and seq._helper is not None:
            seq._helper.join()  # a cancelled prompt chunk's decode returns on its helper thread
        # Checked before the next call's settle() would cut the cache back to the record.
        kv_ok = seq is None or len(seq.tokens) == seq.ctx.memory_seq_pos_max(0) + 1
        return {"reason": stream.finish_reason, "tokens": len(stream.generated),
                # cancelled before the first token of a long prompt: the cancel landed in the prefill
                "mid_prefill": stream.finish_reason == "cancelled" and not stream.generated
                and stream.stats.prompt_tokens >= 100,
                "consistent": consistent and kv_ok}

    def timer(self, delay: float, action: Callable[[], None]) -> Callable[[], None]:
        timer = threading.Timer(delay, action)
        timer.start()

        def finish() -> None:
            timer.cancel()
            timer.join()
        return finish

    def cycle(self, kind: str) -> Dict[str, Any]:
        rng = self.rng
        short = random_prompt(rng, rng.randint(3, 12))
        if kind == "tokens":  # cancel() from a timer thread, somewhere in the token loop
            delay = rng.uniform(0, MAX_TOKENS * self.token_time)
            return self.run_stream(short, lambda s: self.timer(delay, self.llm.cancel))
        if kind == "prefill":  # cancel() from a timer thread, somewhere inside the prefill
            n_words = rng.randint(100, 700)
            delay = rng.uniform(0, n_words * 1.2 / self.prefill_rate)
            return self.run_stream(random_prompt(rng, n_words), lambda s: self.timer(delay, self.llm.cancel))
        if kind == "close":  # stream.close() from another thread
            delay = rng.uniform(0, MAX_TOKENS * self.token_time)
            return self.run_stream(short, lambda s: self.timer(delay, s.close))
        if kind == "hammer":  # several threads cancelling at random moments
            return self.run_stream(random_prompt(rng, rng.randint(3, 300)), self._hammer)
        if kind == "replace":  # the same, while the call (and the next check) replace the context
            config = self.llm.config.replace(n_ubatch=rng.choice(REPLACE_UBATCHES))
            return self.run_stream(random_prompt(rng, rng.randint(3, 300)), self._hammer, config=config)
        return self.run_stream(short, lambda s: (lambda: None))  # "none": a control

    def _hammer(self, stream: Any) -> Callable[[], None]:
        stop = threading.Event()
        seeds = [self.rng.random() for _ in range(4)]

        def hammer(seed: float) -> None:
            local = random.Random(seed)
            while not stop.wait(local.uniform(0, 0.2)):
                self.llm.cancel()

        threads = [threading.Thread(target=hammer, args=(seed,)) for seed in seeds]
        for thread in threads:
            thread.start()

        def finish() -> None:
            stop.set()
            for thread in threads:
                thread.join()
        return finish


# -- the SIGINT cycles: a child process gets real signals ---------------------------------------------

def sigint_worker(model: str, threads: Optional[int]) -> None:
    """Child side: generate on command, with the SIGINT handler installed; answer one line each."""
    from cyllama_cffi import LLM

    settings = dict(temperature=0.0, max_tokens=MAX_TOKENS, n_ctx=N_CTX, n_threads=threads)
    with LLM(model, **settings) as fresh:
        reference = {p: fresh(p, config=fresh.config.replace(max_tokens=CHECK_TOKENS)).text for p in CHECK_PROMPTS}
    llm = LLM(model, **settings)
    check_config = llm.config.replace(max_tokens=CHECK_TOKENS)
    list(llm.stream(random_prompt(random.Random(0), 700)))  # warm-up: the longest prompt a cycle uses
    handle = llm.install_sigint_handler()
    out = sys.stdout
    for line in sys.stdin:
        command, _, argument = line.rstrip("\n").partition(" ")
        if command == "gen":
            stream = llm.stream(argument)
            out.write("STARTED\n")
            out.flush()
            list(stream)
            out.write(f"DONE {stream.finish_reason} {len(stream.generated)}\n")
        elif command == "check":
            prompt = CHECK_PROMPTS[int(argument)]
            out.write(f"CHECK {int(llm(prompt, config=check_config).text == reference[prompt])}\n")
        elif command == "stats":
            gc.collect()
            out.write("STATS " + json.dumps(resources()) + "\n")
        elif command == "quit":
            break
        out.flush()
    handle.restore()
    llm.close()


class SigintChild:
    """Parent side of the SIGINT cycles."""

    def __init__(self, model: str, threads: Optional[int], timeout: float) -> None:
        command = [sys.executable, str(Path(__file__).resolve()), "--sigint-worker", "--model", model]
        if threads:
            command += ["--threads", str(threads)]
        self.timeout = timeout
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        bufsize=1)
        self.first_stats: Optional[Dict[str, float]] = None
        self.baseline: Optional[Dict[str, float]] = None

    def _ask(self, line: str, expect: str) -> List[str]:
        if line:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], self.timeout)
        if not ready:
            raise TimeoutError(f"sigint child did not answer {line!r} within {self.timeout} s")
        answer = self.process.stdout.readline().split()
        if not answer or answer[0] != expect:
            raise RuntimeError(f"sigint child answered {answer!r} to {line!r} (exit code {self.process.poll()})")
        return answer

    def stats(self) -> Dict[str, float]:
        return json.loads(" ".join(self._ask("stats", "STATS")[1:]))

    def cycle(self, rng: random.Random, token_time: float, prefill_rate: float) -> Dict[str, Any]:
        long = rng.random() < 0.5
        n_words = rng.randint(100, 600) if long else rng.randint(3, 12)
        horizon = n_words * 1.2 / prefill_rate if long else MAX_TOKENS * token_time
        self._ask("gen " + random_prompt(rng, n_words), "STARTED")
        time.sleep(rng.uniform(0, horizon))
        self.process.send_signal(signal.SIGINT)  # may also land after the generation: then it is idle
        done = self._ask("", "DONE")
        ok = self._ask(f"check {rng.randrange(len(CHECK_PROMPTS))}", "CHECK")[1] == "1"
        return {"reason": done[1], "tokens": int(done[2]), "mid_prefill": done[1] == "cancelled" and long
                and done[2] == "0", "consistent": True, "check": ok}

    def close(self) -> int:
        try:
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            return self.process.wait(self.timeout)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            return self.process.wait()


# -- the driver ----------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> Dict[str, Any]:
    from cyllama_cffi.models import default_model_path

    model = str(args.model or default_model_path())
    started = time.monotonic()
    soak = Soak(model, args.threads, args.seed)
    child = SigintChild(model, args.threads, args.cycle_timeout)
    child.first_stats = child.stats()
    rng = soak.rng
    tallies = {kind: {"cycles": 0, "cancelled": 0, "mid_prefill": 0, "tokens": 0, "mismatches": 0,
                      "inconsistent": 0} for kind in KINDS}
    rss: List[float] = []
    baseline: Optional[Dict[str, float]] = None
    warmup = args.warmup if args.warmup is not None else max(10, args.cycles // 10 if args.cycles else 10)
    cycle = 0
    while (args.cycles and cycle < args.cycles) or (args.seconds and time.monotonic() - started < args.seconds):
        kind = KINDS[cycle % len(KINDS)] if cycle < len(KINDS) else rng.choice(KINDS)
        faulthandler.dump_traceback_later(args.cycle_timeout, exit=True)  # a deadlock ends the run, loudly
        if kind == "sigint":
            result = child.cycle(rng, soak.token_time, soak.prefill_rate)
            matched = result.pop("check")
        else:
            result = soak.cycle(kind)
            matched = soak.check()
        faulthandler.cancel_dump_traceback_later()
        row = tallies[kind]
        row["cycles"] += 1
        row["cancelled"] += result["reason"] == "cancelled"
        row["mid_prefill"] += bool(result["mid_prefill"])
        row["tokens"] += result["tokens"]
        row["mismatches"] += not matched
        row["inconsistent"] += not result["consistent"]
        cycle += 1
        if cycle == warmup:
            gc.collect()
            baseline = resources()
            child.baseline = child.stats()
        if cycle >= warmup:
            rss.append(resources()["rss_mb"])
    gc.collect()
    final = resources()
    child_final = child.stats()
    child_exit = child.close()
    with soak.llm:  # leaving the block frees the model too (close() alone keeps it, as cyllama's)
        pass
    after_close = resources()
    mismatches = sum(row["mismatches"] + row["inconsistent"] for row in tallies.values())
    return {
        "model": Path(model).name, "python": sys.version.split()[0], "implementation": sys.implementation.name,
        "cycles": cycle, "seconds": time.monotonic() - started, "warmup_cycles": warmup, "kinds": tallies,
        "crashes": int(child_exit != 0), "deadlocks": 0, "mismatches": mismatches,
        "rss": {"baseline_mb": baseline["rss_mb"] if baseline else None, "final_mb": final["rss_mb"],
                "max_mb": max(rss) if rss else None,
                "growth_mb": final["rss_mb"] - baseline["rss_mb"] if baseline else None,
                "slope_kb_per_cycle": slope(rss) * 1024},
        "baseline": baseline, "final": final, "after_close": after_close,
        "sigint_child": {"first": child.first_stats, "baseline": child.baseline, "final": child_final,
                         "exit_code": child_exit},
        "prefill_tokens_per_second": soak.prefill_rate, "seconds_per_token": soak.token_time,
    }


def print_summary(report: Dict[str, Any]) -> None:
    print(f"cyllama_cffi soak: {report['cycles']} cycles in {report['seconds']:.1f} s "
          f"({report['model']}, {report['implementation']} {report['python']})")
    print(f"{'kind':<9}{'cycles':>8}{'cancelled':>11}{'mid-prefill':>13}{'tokens/cycle':>14}{'mismatches':>12}")
    for kind, row in report["kinds"].items():
        per = row["tokens"] / row["cycles"] if row["cycles"] else 0.0
        print(f"{kind:<9}{row['cycles']:>8}{row['cancelled']:>11}{row['mid_prefill']:>13}{per:>14.1f}"
              f"{row['mismatches'] + row['inconsistent']:>12}")
    rss = report["rss"]
    base, final, child = report["baseline"] or {}, report["final"], report["sigint_child"]
    print(f"crashes {report['crashes']}  deadlocks {report['deadlocks']}  mismatches {report['mismatches']}")
    if rss["baseline_mb"] is not None:
        print(f"RSS after {report['warmup_cycles']} warm-up cycles: {rss['baseline_mb']:.1f} MB -> "
              f"{rss['final_mb']:.1f} MB (growth {rss['growth_mb']:+.1f} MB, max {rss['max_mb']:.1f} MB, "
              f"slope {rss['slope_kb_per_cycle']:+.2f} KB/cycle)")
    print(f"fds {base.get('fds')} -> {final['fds']}   OS threads {base.get('os_threads')} -> {final['os_threads']}   "
          f"Python threads {base.get('py_threads')} -> {final['py_threads']}")
    first, last = child["baseline"] or child["first"], child["final"]
    print(f"sigint child after warm-up: RSS {first['rss_mb']:.1f} -> {last['rss_mb']:.1f} MB, fds {first['fds']} -> "
          f"{last['fds']}, OS threads {first['os_threads']} -> {last['os_threads']}, exit code {child['exit_code']}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=0, help="number of cycles (default: 300 unless --seconds)")
    parser.add_argument("--seconds", type=float, default=0.0, help="run cycles until this many seconds passed")
    parser.add_argument("--model", default=None, help="GGUF path (default: the default model)")
    parser.add_argument("--threads", type=int, default=None, help="n_threads (default: usable cores)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=None, help="cycles before the resource baseline")
    parser.add_argument("--cycle-timeout", type=float, default=120.0, help="seconds before a cycle is a deadlock")
    parser.add_argument("--json", default=None, help="write the report here too")
    parser.add_argument("--sigint-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sigint_worker:
        sigint_worker(args.model, args.threads)
        return 0
    if not args.cycles and not args.seconds:
        args.cycles = 300
    report = run(args)
    print_summary(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if report["crashes"] == 0 and report["mismatches"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
