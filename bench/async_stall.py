"""How long the asyncio event loop stalls while an ``AsyncLLM`` reads a long prompt.

    python bench/async_stall.py [--trials 5] [--tokens 4000]

A ticker task sleeps 1 ms at a time and records how late each wake-up is. It runs alone
first (the loop's own jitter on this machine), then beside as many busy processes as decoding
threads (what the operating system alone does to the loop when every core is taken), then while
``AsyncLLM`` prefills a prompt of ``--tokens`` tokens, in turn, ``--trials`` times. Reported: the
longest and the 99th-percentile lateness of each phase, over all trials.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

UNIT = "The quick brown fox jumps over the lazy dog. "  # 10 tokens with SmolLM2


async def ticker(stop: asyncio.Event, lateness: List[float]) -> None:
    while not stop.is_set():
        before = time.perf_counter()
        await asyncio.sleep(0.001)
        lateness.append(time.perf_counter() - before - 0.001)


async def measure(model: Path, tokens: int, trials: int, threads: int) -> None:
    from cyllama_cffi import AsyncLLM

    idle: List[float] = []
    spinning: List[float] = []
    busy: List[float] = []
    prompt = UNIT * (tokens // 10)
    async with AsyncLLM(model, n_ctx=tokens + 256, max_tokens=1, temperature=0.0, n_threads=threads) as llm:
        await llm("warm-up")
        for _ in range(trials):
            stop = asyncio.Event()
            task = asyncio.ensure_future(ticker(stop, idle))
            await asyncio.sleep(1.0)
            stop.set()
            await task
            spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(threads)]
            stop = asyncio.Event()
            task = asyncio.ensure_future(ticker(stop, spinning))
            await asyncio.sleep(5.0)
            stop.set()
            await task
            for spinner in spinners:
                spinner.kill()
                spinner.wait()
            stop = asyncio.Event()
            await llm.reset_context()  # or the next trial would reuse this one's prompt from the cache
            task = asyncio.ensure_future(ticker(stop, busy))
            started = time.perf_counter()
            await llm(prompt)
            prefill = time.perf_counter() - started
            stop.set()
            await task
            print(f"prefill of {tokens} tokens: {prefill:.2f} s", flush=True)
    for name, values in (("idle", idle), (f"{threads} busy processes", spinning), ("during prefill", busy)):
        values.sort()
        p99 = values[int(0.99 * (len(values) - 1))]
        print(f"{name:>18}: {len(values)} ticks, lateness max {max(values) * 1e3:.2f} ms, "
              f"p99 {p99 * 1e3:.2f} ms, median {statistics.median(values) * 1e3:.3f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from cyllama_cffi.models import default_model_path

    model = Path(args.model) if args.model else default_model_path()
    asyncio.run(measure(model, args.tokens, args.trials, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
