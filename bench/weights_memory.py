"""Decode time per token by where the weights live: mmap, private copy, private copy on huge pages.

    python bench/weights_memory.py                      # 16 sequences of 128 tokens per arm
    python bench/weights_memory.py --sequences 32 --json bench/results/weights-memory.json

Why: ``LLM`` loads a private copy of the weights on transparent huge pages by default
(cyllama_cffi/_huge_pages.py) instead of llama.cpp's mmap of the file. Whole runs on a shared VM
drift by several percent, which swamps the effect, so the three loads live in one process, each
with its own context, and take turns token by token (the order rotating every token): each
decode of an arm has a neighbour of every other arm decoding the same token at the same
position within milliseconds. Printed: median microseconds per one-token ``llama_decode`` and
the median of the per-token ratios against the mmap arm.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.run import machine_info, write_results  # noqa: E402

ARMS = {  # name: LlamaModel keyword arguments
    "mmap (llama.cpp's default)": {"use_mmap": True},
    "private copy, 4 KiB pages": {"use_mmap": False, "huge_pages": False},
    "private copy on huge pages (LLM's default)": {"use_mmap": False, "huge_pages": True},
}


def per_token_times(model_path: Path, threads: int, sequences: int, n_tokens: int,
                    batch: int = 1) -> Dict[str, List[float]]:
    """Microseconds of each ``batch``-token decode, per arm; the arms take turns call by call.

    ``batch`` 1 is a token step of generation; a larger one is a prompt chunk (``n_tokens`` is
    then the prompt length, decoded from an empty cache in ``batch``-token calls).
    """
    from cyllama_cffi import LlamaContext, LlamaModel, ffi, lib

    models = {name: LlamaModel(model_path, **kwargs) for name, kwargs in ARMS.items()}
    contexts = {name: LlamaContext(model, n_ctx=n_tokens, n_batch=batch, n_ubatch=batch, n_threads=threads,
                                   n_threads_batch=threads)
                for name, model in models.items()}
    names = list(contexts)
    n_vocab = next(iter(models.values())).vocab.n_tokens
    tokens = ffi.new("llama_token[]", batch)
    times: Dict[str, List[float]] = {name: [] for name in names}
    clock = time.perf_counter
    for _ in range(sequences):
        for context in contexts.values():
            context.memory_clear()
        for call, _ in enumerate(range(0, n_tokens - batch + 1, batch)):
            chunk = [random.randrange(n_vocab) for _ in range(batch)]
            shift = call % len(names)
            for name in names[shift:] + names[:shift]:
                tokens[0:batch] = chunk
                started = clock()
                code = lib.llama_decode(contexts[name].ptr, lib.llama_batch_get_one(tokens, batch))
                times[name].append((clock() - started) * 1e6)
                if code != 0:
                    raise RuntimeError(f"llama_decode returned {code}")
    for context in contexts.values():
        context.close()
    for name, model in models.items():
        print(f"  {name}: {model.huge_page_bytes / 2**20:.0f} MiB advised", flush=True)
        model.close()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: the package's default model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sequence (positions 0..N-1, as tg128)")
    parser.add_argument("--batch", type=int, default=1, help="tokens per llama_decode call (e.g. 512 with "
                        "--tokens 512: a pp512 prompt in one call per sequence)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from cyllama_cffi.models import default_model_path

    model = default_model_path(args.model)
    print(f"machine: {machine_info()}  threads: {args.threads}  model: {model.name}", flush=True)
    times = per_token_times(model, args.threads, args.sequences, args.tokens, args.batch)
    baseline = times[next(iter(ARMS))]
    rows = {}
    print(f"{'weights':<44} {f'median us/{args.batch}-token call':>22} {'vs mmap (median of per-call ratios)':>38}")
    for name, values in times.items():
        ratio = statistics.median(value / base for value, base in zip(values, baseline))
        rows[name] = {"median_us": statistics.median(values), "ratio_to_mmap": ratio, "n": len(values)}
        print(f"{name:<44} {rows[name]['median_us']:22.1f} {ratio:38.3f}")
    if args.json:
        write_results(args.json, {"machine": machine_info(), "threads": args.threads, "model": model.name,
                                  "command": " ".join([Path(sys.executable).name] + sys.argv), "batch": args.batch, "rows": rows,
                                  "samples_us": times})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
