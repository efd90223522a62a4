"""Embeddings: ``Embedder`` throughput against native ``llama-embedding`` on the same texts.

    python bench/embeddings.py [--repeats 6] [--threads 2] [--texts 256]

Both sides embed the same texts (one a line, of 8-60 tokens, from seeded random vocabulary
pieces) with mean pooling, 8 parallel sequences of 512 cells each (``-c 4096 -np 8``: a KV
stream per sequence, as ``Embedder`` uses), ``n_batch = n_ubatch = 512``, flash attention off
and the same thread count. The figure is tokens embedded per second: for the native tool, the
"prompt eval time" of llama.cpp's own performance report; for the binding, the texts' tokens
over the wall time of ``Embedder.embed`` (tokenizing, packing and reading the vectors
included). Each repetition of either side is a fresh process, and the two alternate
(A B, B A, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

N_CTX, N_SEQ_MAX = 512, 8


def texts(model: Path, count: int) -> List[str]:
    """``count`` seeded texts of random vocabulary pieces, one line each (no newlines inside)."""
    import random

    from cyllama_cffi.lowlevel.model import LlamaModel

    rng = random.Random(1234)
    model_handle = LlamaModel(model, vocab_only=True)
    try:
        vocab = model_handle.vocab
        pieces = [p for p in (vocab.token_to_piece(t) for t in range(vocab.n_tokens))
                  if p.strip() and p.isprintable() and "\n" not in p]
    finally:
        model_handle.close()
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(8, 60))).strip() for _ in range(count)]


_PROMPT_EVAL = re.compile(r"prompt eval time\s*=\s*([\d.]+) ms\s*/\s*(\d+) tokens")


def native_sample(binary: Path, model: Path, threads: int, text_file: Path) -> float:
    command = [str(binary), "-m", str(model), "-f", str(text_file), "--pooling", "mean",
               "-c", str(N_CTX * N_SEQ_MAX), "-np", str(N_SEQ_MAX), "-b", str(N_CTX), "-ub", str(N_CTX),
               "-fa", "off", "-t", str(threads), "--embd-output-format", "json"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    match = _PROMPT_EVAL.search(result.stderr + result.stdout)
    if match is None:
        raise RuntimeError("llama-embedding printed no prompt eval time:\n" + result.stderr[-2000:])
    return int(match.group(2)) / (float(match.group(1)) / 1000.0)


def binding_sample(model: Path, threads: int, text_file: Path) -> float:
    from cyllama_cffi import Embedder

    items = text_file.read_text(encoding="utf-8").splitlines()
    with Embedder(model, n_ctx=N_CTX, n_seq_max=N_SEQ_MAX, n_threads=threads) as embedder:
        n_tokens = sum(len(embedder.model.vocab.tokenize(text)) for text in items)
        started = time.perf_counter()
        embedder.embed(items)
        return n_tokens / (time.perf_counter() - started)


def in_child(model: Path, threads: int, text_file: Path) -> float:
    command = [sys.executable, __file__, "--child", "--model", str(model), "--threads", str(threads),
               "--text-file", str(text_file)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return float(output.splitlines()[-1])


def geometric_mean(ratios: Sequence[float]) -> float:
    return math.exp(statistics.mean(math.log(r) for r in ratios))


def run(model: Path, threads: int, repeats: int, count: int) -> Dict[str, object]:
    import build_libllama

    native = build_libllama.build_native(targets=("llama", "llama-embedding"))
    binary = native.bin_dir / "llama-embedding"
    series: Dict[str, List[float]] = {"native": [], "binding": []}
    with tempfile.TemporaryDirectory() as scratch:
        text_file = Path(scratch) / "texts.txt"
        text_file.write_text("\n".join(texts(model, count)), encoding="utf-8")
        for index in range(repeats + repeats % 2):
            order = ("native", "binding") if index % 2 == 0 else ("binding", "native")
            for side in order:
                sample = (native_sample(binary, model, threads, text_file) if side == "native"
                          else in_child(model, threads, text_file))
                series[side].append(sample)
    ratios = [b / a for a, b in zip(series["native"], series["binding"])]
    print(f"embeddings ({count} texts): native {statistics.median(series['native']):8.1f} tok/s  "
          f"binding {statistics.median(series['binding']):8.1f} tok/s  "
          f"paired median {statistics.median(ratios):.3f}  geo-mean {geometric_mean(ratios):.3f}", flush=True)
    return {"native": series["native"], "binding": series["binding"], "paired_ratios": ratios}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--text-file", help=argparse.SUPPRESS)
    parser.add_argument("--json")
    args = parser.parse_args()
    from cyllama_cffi.models import default_model_path

    model = Path(args.model) if args.model else default_model_path()
    if args.child:
        print(binding_sample(model, args.threads, Path(args.text_file)))
        return 0
    started = time.time()
    report = run(model, args.threads, args.repeats, args.texts)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
