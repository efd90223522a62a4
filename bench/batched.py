"""Batched generation: ``BatchGenerator`` against native ``llama-batched-bench`` and against one by one.

    python bench/batched.py [--repeats 6] [--threads 2] [--npl 1,2,4,8]

Both sides use one context of 2048 cells for 8 sequences (llama.cpp's split KV cache),
``n_batch = n_ubatch = 512``, 32-token prompts and 64 generated tokens per sequence, and the
same thread count. Native ``llama-batched-bench -npp 32 -ntg 64 -npl 1,2,4,8`` decodes dummy
tokens without sampling; the binding generates real text, greedy, through the public
``BatchGenerator.generate_batch``. Each repetition of either side is a fresh process, and the
two alternate (A B, B A, ...). The figure compared is llama-batched-bench's ``S_TG``: tokens
decoded per second of the generation phase, summed over the sequences. "one by one" is the same
prompts generated in turn by one ``LLM``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

N_CTX, N_BATCH, N_SEQ_MAX, N_PROMPT, N_GEN = 2048, 512, 8, 32, 64


def prompts(count: int) -> List[str]:
    """``count`` different prompts of about N_PROMPT tokens whose greedy continuation runs on.

    Like the native tool's random tokens: text made of random word pieces of the vocabulary,
    seeded, so the model rambles instead of ending its turn early."""
    import random

    from cyllama_cffi.lowlevel.model import LlamaModel
    from cyllama_cffi.models import default_model_path

    draw = random.Random(42)
    with LlamaModel(default_model_path(), vocab_only=True) as model:
        vocab = model.vocab
        pieces = [t for t in range(1000, vocab.n_tokens) if not vocab.is_eog(t)]
        return [vocab.detokenize([draw.choice(pieces) for _ in range(N_PROMPT - 1)]) for _ in range(count)]


def native_sample(binary: Path, model: Path, threads: int, npl: Sequence[int]) -> Dict[int, float]:
    command = [str(binary), "-m", str(model), "-c", str(N_CTX), "-b", str(N_BATCH), "-ub", str(N_BATCH),
               "-npp", str(N_PROMPT), "-ntg", str(N_GEN), "-npl", ",".join(map(str, npl)), "-t", str(threads),
               "--output-format", "jsonl"]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return {row["pl"]: row["speed_tg"] for row in rows}


def binding_sample(model: Path, threads: int, npl: Sequence[int]) -> Dict[int, float]:
    """One repetition in this process: a warm-up, then every batch size in turn."""
    from cyllama_cffi import BatchGenerator, GenerationConfig

    config = GenerationConfig(temperature=0.0, max_tokens=N_GEN)
    speeds = {}
    with BatchGenerator(model, batch_size=N_BATCH, n_ctx=N_CTX, n_seq_max=N_SEQ_MAX, n_threads=threads) as batch:
        batch.generate_batch(prompts(1), config.replace(max_tokens=8))  # warm-up, as the native tool's
        for count in npl:
            responses = batch.generate_batch(prompts(count), config)
            speeds[count] = generation_speed(responses)
    return speeds


def generation_speed(responses) -> float:
    """Tokens decoded per second after the prompts, summed over the sequences (S_TG)."""
    decoded = sum(max(r.stats.generated_tokens - 1, 0) for r in responses)  # the last one is not decoded
    short = [r.stats.generated_tokens for r in responses if r.stats.generated_tokens < N_GEN]
    if short:
        print(f"  note: {len(short)} sequence(s) stopped early: {short}", file=sys.stderr)
    # All prompts are read in the first step; the generation phase is the rest of the batch.
    start = max(r.stats.total_time - r.stats.generation_time for r in responses)
    end = max(r.stats.total_time for r in responses)
    return decoded / (end - start)


def one_by_one_sample(model: Path, threads: int, count: int) -> float:
    """The same prompts generated in turn: generated tokens per second of generation time."""
    from cyllama_cffi import LLM, GenerationConfig

    config = GenerationConfig(temperature=0.0, max_tokens=N_GEN, n_threads=threads, n_ctx=N_CTX // N_SEQ_MAX * 2)
    with LLM(model, config=config) as llm:
        llm("warm-up", config=config.replace(max_tokens=8))
        decoded, seconds = 0, 0.0
        for prompt in prompts(count):
            response = llm(prompt)
            decoded += response.stats.generated_tokens - 1
            seconds += response.stats.generation_time
    return decoded / seconds


def in_child(kind: str, model: Path, threads: int, npl: Sequence[int]) -> Dict[int, float]:
    command = [sys.executable, __file__, "--child", kind, "--model", str(model), "--threads", str(threads),
               "--npl", ",".join(map(str, npl))]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return {int(k): v for k, v in json.loads(output.splitlines()[-1]).items()}


def geometric_mean_interval(ratios: Sequence[float]) -> str:
    logs = [math.log(r) for r in ratios]
    mean = statistics.mean(logs)
    if len(logs) < 2:
        return f"{math.exp(mean):.3f}"
    half = 1.96 * statistics.stdev(logs) / math.sqrt(len(logs))
    return f"{math.exp(mean):.3f} (95% {math.exp(mean - half):.3f}-{math.exp(mean + half):.3f})"


def run(model: Path, threads: int, repeats: int, npl: Sequence[int]) -> Dict[str, Dict]:
    import build_libllama

    native = build_libllama.build_native(targets=("llama", "llama-batched-bench"))
    binary = native.bin_dir / "llama-batched-bench"
    series: Dict[str, Dict[int, List[float]]] = {"native": {n: [] for n in npl}, "binding": {n: [] for n in npl},
                                                  "one_by_one": {max(npl): []}}
    for index in range(repeats + repeats % 2):
        order = ("native", "binding") if index % 2 == 0 else ("binding", "native")
        for side in order:
            speeds = native_sample(binary, model, threads, npl) if side == "native" else in_child("binding", model, threads, npl)
            for n in npl:
                series[side][n].append(speeds[n])
        series["one_by_one"][max(npl)].append(in_child("one_by_one", model, threads, [max(npl)])[max(npl)])
    report = {}
    for n in npl:
        paired = [b / a for a, b in zip(series["native"][n], series["binding"][n])]
        report[f"batched-{n}"] = {"native_median": statistics.median(series["native"][n]),
                                  "binding_median": statistics.median(series["binding"][n]),
                                  "paired_ratios": paired}
        print(f"batched npl={n}: native {statistics.median(series['native'][n]):7.1f} tok/s  "
              f"binding {statistics.median(series['binding'][n]):7.1f} tok/s  "
              f"paired median {statistics.median(paired):.3f}  geo-mean {geometric_mean_interval(paired)}", flush=True)
    top = max(npl)
    gains = [b / s for b, s in zip(series["binding"][top], series["one_by_one"][top])]
    report["batched-vs-one-by-one"] = {"one_by_one_median": statistics.median(series["one_by_one"][top]),
                                       "ratios": gains}
    print(f"batched npl={top} vs one by one: {statistics.median(series['one_by_one'][top]):7.1f} tok/s alone, "
          f"gain {statistics.median(gains):.2f}x", flush=True)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--npl", default="1,2,4,8")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--json")
    args = parser.parse_args()
    from cyllama_cffi.models import default_model_path

    model = Path(args.model) if args.model else default_model_path()
    npl = [int(n) for n in args.npl.split(",")]
    if args.child == "binding":
        print(json.dumps(binding_sample(model, args.threads, npl)))
        return 0
    if args.child == "one_by_one":
        print(json.dumps({npl[0]: one_by_one_sample(model, args.threads, npl[0])}))
        return 0
    started = time.time()
    report = run(model, args.threads, args.repeats, npl)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
