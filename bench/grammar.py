"""Decoding under a JSON-schema grammar: ``GenerationConfig(json_schema=...)`` against llama-cpp-python.

    python bench/grammar.py [--repeats 6] [--threads 2] [--tokens 96] --lcpp-python PATH

Both sides get the same prompt text (ChatML, formatted here), the same schema (a function call
in the OpenAI style: a function name from an enum and its arguments object), greedy decoding,
``n_ctx`` 1024 and the same thread count. Ours turns the schema into GBNF itself
(``docs/structured-output.md``); llama-cpp-python uses ``LlamaGrammar.from_json_schema``; both
run llama.cpp's grammar sampler. The figure is the decode speed after the first token: streamed
tokens after the first, over the time from the first to the last (so the prompt's prefill is
not in it), the median of 3 generations per fresh process. The sides alternate (A B, B A, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

N_CTX = 1024
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["get_weather", "get_time", "search_web"]},
        "arguments": {
            "type": "object",
            "properties": {
                "location": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
                "query": {"type": "string"},
            },
            "required": ["location", "unit", "days", "query"],
        },
    },
    "required": ["name", "arguments"],
}
PROMPT = ("<|im_start|>system\nYou call functions. Answer with one JSON function call.<|im_end|>\n"
          "<|im_start|>user\nWhat will the weather be in Paris, in celsius, for the next three days? "
          "Also search the web for the best museums there.<|im_end|>\n<|im_start|>assistant\n")


def ours_child(model: Path, threads: int, n_tokens: int) -> Dict[str, float]:
    from cyllama_cffi import LLM, GenerationConfig

    config = GenerationConfig(temperature=0.0, max_tokens=n_tokens, n_threads=threads, n_ctx=N_CTX,
                              json_schema=SCHEMA)
    speeds, counts = [], []
    with LLM(model, config=config) as llm:
        llm("Warm up.", config=GenerationConfig(max_tokens=2, n_threads=threads, n_ctx=N_CTX))
        for _ in range(3):
            stream = llm.stream(PROMPT)
            next(stream)
            first = time.perf_counter()
            for _ in stream:
                pass
            seconds = time.perf_counter() - first
            generated = len(stream.generated)
            speeds.append((generated - 1) / seconds)
            counts.append(generated)
    return {"tok_s": statistics.median(speeds), "tokens": counts[-1]}


def lcpp_child(model: Path, threads: int, n_tokens: int) -> Dict[str, float]:
    from llama_cpp import Llama, LlamaGrammar

    llm = Llama(model_path=str(model), n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads, verbose=False)
    grammar = LlamaGrammar.from_json_schema(json.dumps(SCHEMA), verbose=False)
    llm.create_completion("Warm up.", max_tokens=2, temperature=0.0)
    speeds, counts = [], []
    for _ in range(3):
        llm.reset()  # the same work as ours: the prompt is decoded again each time
        first, chunks = 0.0, 0
        for chunk in llm.create_completion(PROMPT, max_tokens=n_tokens, temperature=0.0, grammar=grammar,
                                           stream=True):
            if chunks == 0:
                first = time.perf_counter()
            chunks += bool(chunk["choices"][0]["text"])
        seconds = time.perf_counter() - first
        speeds.append((chunks - 1) / seconds)
        counts.append(chunks)
    return {"tok_s": statistics.median(speeds), "tokens": counts[-1]}


def in_child(python: str, side: str, model: Path, threads: int, n_tokens: int) -> Dict[str, float]:
    command = [python, __file__, "--child", side, "--model", str(model), "--threads", str(threads),
               "--tokens", str(n_tokens)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    output = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(output.splitlines()[-1])


def spread(ratios: Sequence[float]) -> str:
    logs = [math.log(r) for r in ratios]
    mean = statistics.mean(logs)
    if len(logs) < 2:
        return f"{math.exp(mean):.3f}"
    half = 1.96 * statistics.stdev(logs) / math.sqrt(len(logs))
    return f"{math.exp(mean):.3f} (95% {math.exp(mean - half):.3f}-{math.exp(mean + half):.3f})"


def run(model: Path, threads: int, repeats: int, n_tokens: int, lcpp_python: str) -> Dict[str, object]:
    series: Dict[str, List[Dict[str, float]]] = {"ours": [], "lcpp": []}
    for index in range(repeats + repeats % 2):
        order = ("ours", "lcpp") if index % 2 == 0 else ("lcpp", "ours")
        for side in order:
            series[side].append(in_child(sys.executable if side == "ours" else lcpp_python, side, model,
                                         threads, n_tokens))
    ours = [r["tok_s"] for r in series["ours"]]
    theirs = [r["tok_s"] for r in series["lcpp"]]
    ratios = [a / b for a, b in zip(ours, theirs)]
    print(f"grammar decode ({series['ours'][0]['tokens']} / {series['lcpp'][0]['tokens']} tokens): "
          f"ours {statistics.median(ours):.1f} tok/s  llama-cpp-python {statistics.median(theirs):.1f} tok/s  "
          f"paired median {statistics.median(ratios):.3f}  geo-mean {spread(ratios)}", flush=True)
    return {"ours": series["ours"], "lcpp": series["lcpp"], "ours_over_lcpp": ratios}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--lcpp-python",
                        help="an interpreter with llama-cpp-python installed")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--json")
    args = parser.parse_args()
    if not args.child and not args.lcpp_python:
        parser.error("--lcpp-python is required: an interpreter with llama-cpp-python installed")
    if args.child == "lcpp":
        print(json.dumps(lcpp_child(Path(args.model), args.threads, args.tokens)))
        return 0
    from cyllama_cffi.models import default_model_path

    model = Path(args.model) if args.model else default_model_path()
    if args.child == "ours":
        print(json.dumps(ours_child(model, args.threads, args.tokens)))
        return 0
    started = time.time()
    report = run(model, args.threads, args.repeats, args.tokens, args.lcpp_python)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
