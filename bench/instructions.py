"""Instructions llama.cpp executes for a prefill or for token steps: ``LLM`` vs native ``llama-bench``.

    python bench/instructions.py                  # pp512, 1 thread, both sides under callgrind
    python bench/instructions.py --n-prompt 1024 --json bench/results/instructions.json
    python bench/instructions.py --n-gen 128      # token steps: greedy streaming vs tg128

Why: on a shared VM the speed of a long prefill moves by ±10 % between samples (see
docs/performance.md), so a tok/s ratio needs many interleaved samples to say anything within a
percent. ``valgrind --tool=callgrind`` counts instructions instead, which repeat exactly for the
same binary and inputs whatever the machine is doing. Both sides decode the same tokens
(llama-bench's own, bench/native_tokens.py) with the same context size and batch settings, on
one thread (callgrind serialises threads; with one, all of ggml's work runs inside the decode
call). Two counts per side:

- ``decode``: instructions inside ``llama_context::decode(llama_batch_ext const&)``, the
  function both ``llama_decode`` (this binding) and ``llama_process`` (llama-bench) end in: the
  work llama.cpp does for the prompt;
- ``total``: what each side spends on the whole prompt. For the binding, one ``llm(tokens)`` call
  (tokens checked, context claimed, batch filled, decode, sampling; Python and cffi included),
  counted as the difference between two otherwise identical processes, with and without that
  call; for llama-bench its ``test_prompt`` (the decode count if the build inlined it).
  ``total / decode - 1`` is the binding's own share.

``--n-gen N`` counts token steps instead (the decode row): llama-bench's ``tg N`` (``test_gen``:
N one-token decodes into a context of N cells) against the token steps of one greedy
``llm.stream`` in a context of the same N cells: the processes with and without the measured
stream both decode the row's text prompt and take one token, the measured one then steps on until
the context is full; the difference is those steps alone (decode, argmax, detokenize, yield).

The three profiled processes run side by side (counts do not depend on what else runs). A CPU
whose instructions valgrind cannot run (AVX-512 with valgrind 3.19) needs a ``CYLLAMA_NATIVE=0``
build (docs/reliability.md): callgrind stops at the first such instruction and the script
reports its error.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DECODE_FUNCTION = "llama_context::decode(llama_batch_ext const&)"
NATIVE_PROMPT_FUNCTION = "test_prompt(llama_context*, int, int, int)"
NATIVE_GEN_FUNCTION = "test_gen(llama_context*, int, int)"

# The binding's side. Run twice, with and without the measured call; the difference of the two
# processes' instruction counts is what that call costs, Python and cffi included. The first
# call creates the context (llama-bench creates its context before it times anything).
BINDING_CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from bench.run import make_llm, native_prompts
n_prompt, measured = int(sys.argv[3]), sys.argv[4] == "1"
llm = make_llm(Path(sys.argv[2]), 1)
tokens = native_prompts(llm, n_prompt)[0][:n_prompt - 1]
config = llm.config.replace(max_tokens=1, n_ctx=n_prompt)
llm(tokens[:1], config=config)
if measured:
    llm(tokens, config=config)
llm.close()
"""

# The same for token steps: both processes stream the decode row's prompt in a context of n_gen
# cells; the measured one goes on until the context is full (``steps`` one-token decodes more).
BINDING_GEN_CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from bench.run import DECODE_PROMPT, make_llm
n_gen, measured = int(sys.argv[3]), sys.argv[4] == "1"
llm = make_llm(Path(sys.argv[2]), 1)
n_prompt = len(llm.tokenize(DECODE_PROMPT))
steps = n_gen - n_prompt - 1
config = llm.config.replace(max_tokens=1 + (steps if measured else 0), n_ctx=n_gen)
llm(DECODE_PROMPT, config=config.replace(max_tokens=1))
stream = llm.stream(DECODE_PROMPT, config=config)
for _ in stream:
    pass
assert stream.stats.generated_tokens == config.max_tokens, stream.stats
print("steps", steps)
llm.close()
"""


def callgrind(command: List[str], out_file: Path, env: Dict[str, str], native_function: str) -> Dict[str, int]:
    """Run ``command`` under callgrind; the process's total, the inclusive count of the functions
    of interest (those callgrind_annotate lists) and the ``steps`` a binding child printed."""
    result = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}"] + command,
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"callgrind failed ({result.returncode}):\n{result.stderr[-3000:]}")
    annotated = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(out_file)],
                               capture_output=True, text=True, check=True).stdout
    counts = {"total": int(re.search(r"^summary:\s+(\d+)", out_file.read_text(errors="replace"), re.M).group(1))}
    steps = re.search(r"^steps (\d+)$", result.stdout, re.M)
    if steps:
        counts["steps"] = int(steps.group(1))
    for name, function in (("decode", DECODE_FUNCTION), ("native_call", native_function)):
        for line in annotated.splitlines():
            if line.rstrip().endswith(f":{function}") or f":{function} [" in line:
                counts[name] = counts.get(name, 0) + int(line.split()[0].replace(",", ""))
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="GGUF (default: the default model)")
    parser.add_argument("--n-prompt", type=int, default=512)
    parser.add_argument("--n-gen", type=int, default=0, help="count N token steps (vs tg N) instead of a prefill")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "instructions.json"))
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")

    from bench.run import native_bench_binary, write_results
    from cyllama_cffi.models import default_model_path

    model = default_model_path(args.model)
    binary = native_bench_binary()
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # the two binding processes differ only in the call
    if args.n_gen:
        native_args, native_function = ["-p", "0", "-n", str(args.n_gen)], NATIVE_GEN_FUNCTION
        child, size = BINDING_GEN_CHILD, args.n_gen
    else:
        native_args, native_function = ["-p", str(args.n_prompt), "-n", "0"], NATIVE_PROMPT_FUNCTION
        child, size = BINDING_CHILD, args.n_prompt
    with tempfile.TemporaryDirectory() as scratch, ThreadPoolExecutor(max_workers=3) as pool:
        out = Path(scratch)
        native_run = pool.submit(callgrind, [str(binary), "-m", str(model), "-t", "1"] + native_args
                                 + ["-r", "1", "--no-warmup", "-o", "json"], out / "native.out", env, native_function)
        binding_runs = {measured: pool.submit(callgrind, [sys.executable, "-c", child, str(REPO), str(model),
                                                          str(size), measured], out / f"binding{measured}.out",
                                              env, native_function)
                        for measured in ("0", "1")}
        native = native_run.result()
        binding = {measured: run.result() for measured, run in binding_runs.items()}
    if "decode" not in native or "decode" not in binding["1"]:
        raise SystemExit(f"{DECODE_FUNCTION} not found in the profiles (stripped or inlined build?)")
    ours = {"decode": binding["1"]["decode"] - binding["0"].get("decode", 0),
            "total": binding["1"]["total"] - binding["0"]["total"]}
    theirs = {"decode": native["decode"], "total": native.get("native_call", native["decode"])}
    if args.n_gen:
        # llama-bench steps n_gen times; the binding as often as its context leaves room for
        # (the measured process's output says how many): ratios are per step.
        label, native_count, binding_count = f"tg{args.n_gen}", args.n_gen, binding["1"]["steps"]
    else:
        # llama-bench decodes n_prompt tokens, the binding n_prompt - 1 (plus the generated token's
        # choice, as in the throughput rows): ratios are per decoded token.
        label, native_count, binding_count = f"pp{args.n_prompt}", args.n_prompt, args.n_prompt - 1
    per_token = {key: (ours[key] / binding_count) / (theirs[key] / native_count) for key in ours}
    rows = {
        "row": label, "n_prompt": args.n_prompt, "n_gen": args.n_gen, "threads": 1, "model": model.name,
        "native": theirs, "binding": ours, "native_tokens": native_count, "binding_tokens": binding_count,
        "decode_ratio_per_token": per_token["decode"],
        "total_ratio_per_token": per_token["total"],
        "binding_outside_decode": ours["total"] / ours["decode"] - 1,
    }
    unit = "token steps" if args.n_gen else "tokens"
    print(f"{label}, 1 thread, instructions (callgrind); native {native_count} {unit}, the binding {binding_count}")
    print(f"{'':28} {'native llama-bench':>20} {'cyllama_cffi':>16} {'ratio per token':>16}")
    for key, text in (("decode", "inside llama.cpp's decode"), ("total", "whole call")):
        print(f"{text:28} {theirs[key]:>20,} {ours[key]:>16,} {per_token[key]:>16.4f}")
    print(f"binding work outside llama.cpp's decode: {rows['binding_outside_decode'] * 100:.3f} % of it")
    write_results(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
