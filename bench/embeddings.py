"""Embeddings: ``Embedder`` throughput against native ``llama-embedding`` on the same texts.

    python bench/embeddings.py [--repeats 6] [--threads 2] [--texts 256]

Both sides embed the same texts (one a line, of 8-60 tokens, from seeded random vocabulary
pieces) with mean pooling, decodes of at most 512 tokens (``n_batch = n_ubatch = 512``), flash
attention off and the same thread count. The native tool runs in its default mode, a unified
KV cache of 512 cells shared by up to 256 sequences a decode (its ``-np 8`` mode aborts on
more than 8 texts a decode in this llama.cpp); ``Embedder`` uses 8 sequences a decode, each
with a KV stream of 512 cells (see ``cyllama_cffi/embeddings.py`` for why). The figure is
tokens embedded per second of a whole fresh process (loading the model, tokenizing, decoding,
reading the vectors; the native side also prints them), so use enough texts that the load is
small beside the work. The two sides alternate (A B, B A, ...).
"""

from __future__ import annotations

import argparse
import json
import math
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


def count_tokens(model: Path, text_file: Path) -> int:
    from cyllama_cffi.lowlevel.model import LlamaModel

    model_handle = LlamaModel(model, vocab_only=True)
    try:
        return sum(len(model_handle.vocab.tokenize(text))
                   for text in text_file.read_text(encoding="utf-8").splitlines())
    finally:
        model_handle.close()


def native_seconds(binary: Path, model: Path, threads: int, text_file: Path) -> float:
    command = [str(binary), "-m", str(model), "-f", str(text_file), "--pooling", "mean",
               "-c", str(N_CTX), "-b", str(N_CTX), "-ub", str(N_CTX), "-fa", "off", "-t", str(threads),
               "--embd-output-format", "json"]
    started = time.perf_counter()
    subprocess.run(command, capture_output=True, text=True, check=True)
    return time.perf_counter() - started


def binding_child(model: Path, threads: int, text_file: Path) -> None:
    from cyllama_cffi import Embedder

    items = text_file.read_text(encoding="utf-8").splitlines()
    with Embedder(model, n_ctx=N_CTX, n_seq_max=N_SEQ_MAX, n_threads=threads) as embedder:
        vectors = embedder.embed(items)
    assert vectors.shape[0] == len(items)


def binding_seconds(model: Path, threads: int, text_file: Path) -> float:
    command = [sys.executable, __file__, "--child", "--model", str(model), "--threads", str(threads),
               "--text-file", str(text_file)]
    started = time.perf_counter()
    subprocess.run(command, capture_output=True, text=True, check=True)
    return time.perf_counter() - started


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
        n_tokens = count_tokens(model, text_file)
        for index in range(repeats + repeats % 2):
            order = ("native", "binding") if index % 2 == 0 else ("binding", "native")
            for side in order:
                seconds = (native_seconds(binary, model, threads, text_file) if side == "native"
                           else binding_seconds(model, threads, text_file))
                series[side].append(n_tokens / seconds)
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
        binding_child(model, args.threads, Path(args.text_file))
        return 0
    started = time.time()
    report = run(model, args.threads, args.repeats, args.texts)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
