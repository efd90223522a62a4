"""The engine's prompt budget: how long running streams wait while a long prompt is read, against how
much later that prompt's first token comes.

    python bench/fair_steps.py [--budgets 16,32,64,128,256,512,1024,2048] [--rounds 3] [--long-tokens 4000]
                               [--flash-attn auto|on|off] [--step-ms MS] [--kv-unified]

One ``Engine`` of 5 sequences (``n_batch`` 2048, ``n_ubatch`` 512, each sequence ``long + 512``
cells, 2 threads). Four sequences generate greedily from 32-token prompts of random vocabulary
pieces (so they do not end their turn); once each has a few tokens, a prompt of ``--long-tokens``
tokens joins. A step reads at most ``prompt_budget`` prompt tokens besides the four streams'
next tokens, so the budget trades the streams' gaps between tokens against the long prompt's time
to first token (TTFT).

Every sample is a fresh process with one engine at one budget: a warm-up, the long prompt alone
(its solo prefill, same engine, same budget), then the same prompt with the four streams. Each
stream token is timed at the end of the step that picked it; the gaps counted are those that
overlap the long prompt's read. Budgets take turns leading the rounds. Reported per budget:
the streams' gap p50/p99/max while the prompt is read (pooled over rounds), their gap before it
joined, the long prompt's TTFT, and its ratio to the solo prefill at the same budget and to the
solo prefill at the full batch (the largest budget of the round: what a lone prompt gets).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.latency_stats import gaps_before, gaps_in_window, percentile, rotated  # noqa: E402

N_SEQ_MAX, N_STREAMS, N_BATCH, N_UBATCH, STREAM_PROMPT = 5, 4, 2048, 512, 32
SETTLE_TOKENS = 4  # tokens each stream has before the long prompt joins
FLASH_ATTN = {"auto": None, "on": True, "off": False}
DEFAULT_BUDGETS = "16,32,64,128,256,512,1024,2048"
CLOCKS: Dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}
LONG_UNIT = "The history of the river towns, told street by street and year by year. "


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="GGUF (default: the default model)")
    parser.add_argument("--budgets", type=budget_list, default=budget_list(DEFAULT_BUDGETS),
                        help=f"prompt budgets, comma-separated (default {DEFAULT_BUDGETS})")
    parser.add_argument("--rounds", type=int, default=3, help="samples per budget, each a fresh process")
    parser.add_argument("--long-tokens", type=int, default=4000, help="tokens of the prompt that joins")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: the stepping thread's CPU time (needs --threads 1), "
                             "the steps' own cost on a machine busy with other work")
    parser.add_argument("--kv-unified", action="store_true",
                        help="one KV cache for all sequences (a micro-batch may then mix sequences' rows freely; "
                             "split, a step's rows go in as micro-batches of equal rows per sequence)")
    parser.add_argument("--flash-attn", choices=sorted(FLASH_ATTN), default="auto",
                        help="the context's flash attention (auto: llama.cpp's choice, on for the CPU)")
    parser.add_argument("--step-ms", type=float, default=0.0,
                        help="with --flash-attn off: the engine's step_time, in ms (a step beside the streams "
                             "reads more whole chunks while steps stay this short; 0: never, as by default)")
    parser.add_argument("--max-gap-ms", type=float, default=250.0, help="the gap p99 a default budget must keep")
    parser.add_argument("--max-ttft-ratio", type=float, default=1.5,
                        help="the TTFT / full-batch solo prefill a default budget must keep")
    parser.add_argument("--json", help="write every sample here")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.long_tokens < 16:
        parser.error("--long-tokens must be >= 16")
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu counts the stepping thread only: use it with --threads 1")
    return args


def budget_list(text: str) -> List[int]:
    """``"32,64"`` -> ``[32, 64]``: positive, at most ``n_batch``, no repeats. (A step holds the
    streams' tokens first, so a budget near ``n_batch`` reads ``n_batch`` minus those.)"""
    try:
        budgets = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"budgets must be integers, got {text!r}") from None
    if not budgets or len(set(budgets)) != len(budgets):
        raise argparse.ArgumentTypeError(f"give distinct budgets, got {text!r}")
    for budget in budgets:
        if not 1 <= budget <= N_BATCH:
            raise argparse.ArgumentTypeError(f"a budget must be between 1 and {N_BATCH}, got {budget}")
    return budgets


# -- one sample (child process) -----------------------------------------------------------------

def stream_prompts(vocab, count: int, seed: int = 42) -> List[List[int]]:
    """``count`` prompts of random vocabulary pieces: greedy decoding rambles on from them."""
    import random

    draw = random.Random(seed)
    pieces = [t for t in range(1000, vocab.n_tokens) if not vocab.is_eog(t)]
    return [[draw.choice(pieces) for _ in range(STREAM_PROMPT)] for _ in range(count)]


def long_prompt_tokens(vocab, n_tokens: int) -> List[int]:
    tokens = vocab.tokenize(LONG_UNIT * (n_tokens // 10 + 2), add_special=True, parse_special=False)
    return tokens[:n_tokens]


def sample(model_path: Path, budget: int, long_tokens: int, threads: int, clock_name: str = "wall",
           kv_unified: bool = False, flash_attn: str = "auto", step_ms: float = 0.0) -> Dict[str, Any]:
    """One engine at ``budget``: the long prompt alone, then with four streams generating.

    ``clock_name`` "cpu" times everything with this thread's CPU time, which with one thread
    (the decode runs on the calling thread) is the steps' own cost, whatever else the machine
    is running: a loaded machine's estimate of the quiet one-thread curve."""
    from cyllama_cffi._engine import Engine, EngineSequence
    from cyllama_cffi.lowlevel.model import LlamaModel
    from cyllama_cffi.lowlevel.sampler import LlamaSampler

    clock = CLOCKS[clock_name]
    model = LlamaModel(model_path)
    engine = Engine(model, n_ctx=N_SEQ_MAX * (long_tokens + 512), n_seq_max=N_SEQ_MAX, n_batch=N_BATCH,
                    n_ubatch=N_UBATCH, n_threads=threads, prompt_budget=budget, kv_unified=kv_unified,
                    flash_attn=FLASH_ATTN[flash_attn], step_time=step_ms / 1000 if step_ms else None)
    vocab = model.vocab
    long_prompt = long_prompt_tokens(vocab, long_tokens)

    def sequence(prompt: List[int], max_tokens: int) -> EngineSequence:
        return EngineSequence(prompt, LlamaSampler().add_greedy(), max_tokens)

    def read(prompt: List[int], step: Callable[[], None]) -> Tuple[float, float]:
        """Add ``prompt`` and step until its first token is picked: (start, end) on the clock."""
        long = engine.add(sequence(prompt, 1))
        start = clock()
        while not long.t_prompt_done:
            step()
        return start, clock()

    try:
        engine.add(sequence(stream_prompts(vocab, 1, seed=7)[0], 8))  # warm-up
        engine.run()
        solo_start, solo_end = read(long_prompt, engine.step)

        streams = [engine.add(sequence(p, engine.seq_capacity - STREAM_PROMPT - 8))
                   for p in stream_prompts(vocab, N_STREAMS)]
        stamps: Dict[int, List[float]] = {id(s): [] for s in streams}

        def step() -> None:
            engine.step()
            now = clock()
            for stream in streams:
                if len(stamps[id(stream)]) < len(stream.generated):
                    stamps[id(stream)].append(now)

        while any(len(s.generated) < SETTLE_TOKENS for s in streams if not s.finished):
            step()
        start, end = read(long_prompt, step)
        return {"budget": budget, "solo": solo_end - solo_start, "ttft": end - start, "long_tokens": len(long_prompt),
                "gaps": [g for s in streams for g in gaps_in_window(stamps[id(s)], start, end)],
                "steady": [g for s in streams for g in gaps_before(stamps[id(s)], start)],
                "streams_alive": sum(not s.finished for s in streams), "clock": clock_name}
    finally:
        engine.close()
        model.close()


def sample_in_child(model: Path, budget: int, args: argparse.Namespace) -> Dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(budget), "--model", str(model),
               "--long-tokens", str(args.long_tokens), "--threads", str(args.threads), "--clock", args.clock,
               "--flash-attn", args.flash_attn, "--step-ms", str(args.step_ms), *(["--kv-unified"] if args.kv_unified else [])]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"budget {budget} sample failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.splitlines()[-1])


# -- the table ------------------------------------------------------------------------------------

def summarize(samples: Sequence[Dict[str, Any]], budgets: Sequence[int]) -> Dict[int, Dict[str, float]]:
    """Per budget: the pooled gaps' p50/p99/max (ms), the steady gap p50, TTFT and solo medians (s),
    and the medians of the per-round ratios TTFT / solo (same budget) and TTFT / full-batch solo
    (the largest budget's solo in the same round; NaN without one)."""
    full = max(budgets)
    full_solo = {s["round"]: s["solo"] for s in samples if s["budget"] == full}
    rows = {}
    for budget in budgets:
        mine = [s for s in samples if s["budget"] == budget]
        gaps = [g for s in mine for g in s["gaps"]]
        steady = [g for s in mine for g in s["steady"]]
        to_full = [s["ttft"] / full_solo[s["round"]] for s in mine if s["round"] in full_solo]
        rows[budget] = {
            "gap_p50_ms": 1000 * percentile(gaps, 50), "gap_p99_ms": 1000 * percentile(gaps, 99),
            "gap_max_ms": 1000 * max(gaps, default=float("nan")), "steady_p50_ms": 1000 * percentile(steady, 50),
            "ttft_s": statistics.median(s["ttft"] for s in mine), "solo_s": statistics.median(s["solo"] for s in mine),
            "ttft_vs_solo": statistics.median(s["ttft"] / s["solo"] for s in mine),
            "ttft_vs_full_solo": statistics.median(to_full) if to_full else float("nan"),
            "streams_ended_early": sum(N_STREAMS - s["streams_alive"] for s in mine), "n": len(mine)}
    return rows


def choose(rows: Dict[int, Dict[str, float]], max_gap_ms: float, max_ttft_ratio: float) -> Optional[int]:
    """The largest budget whose gap p99 and TTFT (against the full-batch solo) stay within the
    limits: the larger the budget, the sooner a long prompt's first token comes."""
    fitting = [b for b, row in rows.items()
               if row["gap_p99_ms"] <= max_gap_ms and row["ttft_vs_full_solo"] <= max_ttft_ratio]
    return max(fitting) if fitting else None


def print_table(rows: Dict[int, Dict[str, float]]) -> None:
    print("| budget | gap p50 | gap p99 | gap max | gap before | TTFT | solo (same budget) | TTFT / solo "
          "| TTFT / full-batch solo | samples |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for budget, row in rows.items():
        print(f"| {budget} | {row['gap_p50_ms']:.0f} ms | {row['gap_p99_ms']:.0f} ms | {row['gap_max_ms']:.0f} ms "
              f"| {row['steady_p50_ms']:.0f} ms | {row['ttft_s']:.2f} s | {row['solo_s']:.2f} s "
              f"| {row['ttft_vs_solo']:.2f} | {row['ttft_vs_full_solo']:.2f} | {row['n']} |")
    early = sum(row["streams_ended_early"] for row in rows.values())
    if early:
        print(f"note: {early} stream(s) ended before the long prompt was read; their gaps stop there")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from cyllama_cffi.models import default_model_path

    model = Path(args.model) if args.model else default_model_path()
    if args.child is not None:
        print(json.dumps(sample(model, args.child, args.long_tokens, args.threads, args.clock, args.kv_unified, args.flash_attn,
                                args.step_ms)))
        return 0
    started = time.time()
    samples = []
    for round_index in range(args.rounds):
        for budget in rotated(args.budgets, round_index):
            result = sample_in_child(model, budget, args)
            result["round"] = round_index
            samples.append(result)
            print(f"round {round_index} budget {budget}: TTFT {result['ttft']:.2f} s (solo {result['solo']:.2f} s), "
                  f"gap p99 {1000 * percentile(result['gaps'], 99):.0f} ms", flush=True)
    rows = summarize(samples, args.budgets)
    print(f"\n{args.long_tokens}-token prompt joining {N_STREAMS} greedy streams, {args.threads} thread(s), "
          f"{args.rounds} round(s), {args.clock} clock, {'unified' if args.kv_unified else 'split'} KV cache, "
          f"flash attention {args.flash_attn}"
          f"{f', steps paced to {args.step_ms:g} ms' if args.step_ms else ''}:\n")
    print_table(rows)
    pick = choose(rows, args.max_gap_ms, args.max_ttft_ratio)
    print(f"\nlargest budget with gap p99 <= {args.max_gap_ms:.0f} ms and TTFT <= {args.max_ttft_ratio}x "
          f"the full-batch solo: {pick if pick is not None else 'none'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "child"},
                                               "samples": samples, "rows": rows}, indent=2))
    print(f"({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
