"""Prefix reuse in a growing chat: time to first token of turn 10, against llama-cpp-python.

    python bench/prefix_reuse.py [--repeats 6] [--threads 2] [--turns 10] --lcpp-python PATH
                                 [--flash-attn auto,off] [--think 1.0]

A chat starts with a system prompt of about 1,300 tokens; each turn adds a user message of
about 25 tokens, and the model answers it (greedy, ``N_ANSWER`` tokens at most), so that turn 10
has about 1,500 tokens of history and about 30-45 new ones (its user message, the previous
answer and the template's tokens around them). Both sides get the same prompt text (the
ChatML of the default model, formatted here; ``LLM`` gets it through ``LLM.chat``, which
renders the same text from the messages), with ``n_ctx`` 2048, ``n_batch = n_ubatch = 512``
and the same thread count, and both keep their cache between turns: ``LLM`` reuses the prefix
its rule allows (``docs/state.md``), llama-cpp-python's ``Llama`` the longest common prefix.
``LLM`` runs once per ``--flash-attn`` setting in each round: ``auto`` (llama.cpp's choice, on
for the CPU: reuse decodes at least 64 tokens) and ``off`` (llama-cpp-python's default:
reuse decodes just the new tokens). ``--think`` seconds pass between an answer and the next
turn, as with a user reading it and typing (``LLM`` without flash attention reads the answer
again as a prompt chunk then, with the template's tokens that follow an answer, so the next
turn decodes only its user message and the assistant's opener; ``--think 0``
shows the back-to-back case, where that re-read is waited for).

Figures, per fresh process (the sides alternate, A B, B A, ...):

- ``ttft``: from the call to its first streamed text, for the last turn;
- ``own prefill`` (ours only): decoding just the tokens the cache did not hold before that turn,
  on top of the cached history, timed alone (the median of 5): what a perfect reuse would cost;
- the ratios ours/llama-cpp-python and ours/(own prefill + 5 ms), paired by round.
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

N_CTX, N_BATCH, N_ANSWER = 2048, 512, 12
FLASH_ATTN = {"auto": None, "off": False}

WORDS = ("river harbour market bridge winter summer farmer teacher garden tower library music "
         "letter window morning evening village castle forest mountain island station engine "
         "kitchen bottle candle pocket ladder blanket wagon lantern meadow orchard").split()


def system_prompt() -> str:
    """About 1,300 tokens of seeded, plain sentences."""
    import random

    rng = random.Random(5)
    sentences = [f"The {rng.choice(WORDS)} near the {rng.choice(WORDS)} was known for its {rng.choice(WORDS)}."
                 for _ in range(110)]
    return "You are a helpful assistant. Notes about the town follow. " + " ".join(sentences)


def user_message(turn: int) -> str:
    """About 25 tokens, different every turn."""
    import random

    rng = random.Random(100 + turn)
    picks = " and the ".join(rng.choice(WORDS) for _ in range(5))
    return f"Question {turn}: in one short sentence, what do the notes say about the {picks}?"


def chatml(messages: Sequence[Dict[str, str]]) -> str:
    """The default model's template (ChatML), with the assistant's turn opened."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + "<|im_start|>assistant\n"


def conversation(turns: int, answer, think: float):
    """Run ``turns`` turns; ``answer(prompt, messages)`` streams one and returns (text, ttft). ``think``
    seconds pass between an answer and the next turn (a user reading and typing).

    Returns the last turn's ttft and prompt."""
    messages = [{"role": "system", "content": system_prompt()}]
    ttft, prompt = 0.0, ""
    for turn in range(1, turns + 1):
        messages.append({"role": "user", "content": user_message(turn)})
        prompt = chatml(messages)
        text, ttft = answer(prompt, messages)
        messages.append({"role": "assistant", "content": text.strip()})
        time.sleep(think if turn < turns else 0.0)
    return ttft, prompt


def ours_child(model: Path, threads: int, turns: int, flash_attn: str, think: float) -> Dict[str, float]:
    from cyllama_cffi import LLM, GenerationConfig

    config = GenerationConfig(temperature=0.0, max_tokens=N_ANSWER, n_threads=threads, n_ctx=N_CTX,
                              n_batch=N_BATCH, n_ubatch=N_BATCH, flash_attn=FLASH_ATTN[flash_attn])
    with LLM(model, config=config) as llm:
        llm("Warm up.", config=config.replace(max_tokens=2))
        held: List[int] = []

        def answer(prompt: str, messages: List[Dict[str, str]]):
            if llm.format_chat(messages) != prompt:
                raise SystemExit("the model's template no longer renders the bench's ChatML text")
            seq = llm._seq  # what it holds, or will once the last answer's re-read is done
            held[:] = (seq._reread_target or seq.tokens) if seq is not None else []
            started = time.perf_counter()
            stream = llm.chat(messages, stream=True)
            first = next(stream)
            ttft = time.perf_counter() - started
            return first + "".join(stream), ttft

        ttft, last_prompt = conversation(turns, answer, think)
        # The last turn's prompt, the tokens the cache held before it, and the time to decode
        # only what was new, on top of the history: a perfect reuse's cost.
        prompt = llm._chat_tokens(last_prompt, config)  # as chat() tokenizes it
        common = 0
        while common < min(len(prompt) - 1, len(held)) and prompt[common] == held[common]:
            common += 1
        seq = llm._seq
        seq.settle()  # stop the last answer's re-read: these decodes use the context alone
        times = []
        for _ in range(5):
            seq.ctx.memory_seq_rm(0, common, -1)
            started = time.perf_counter()
            for start in range(common, len(prompt), N_BATCH):
                piece = prompt[start:start + N_BATCH]
                seq.batch.set_tokens(piece, start, 0, logits_last=start + N_BATCH >= len(prompt))
                seq.ctx.decode(seq.batch)
            times.append(time.perf_counter() - started)
        seq.clear()
    return {"ttft": ttft, "own_prefill": statistics.median(times), "n_new": len(prompt) - common,
            "n_prompt": len(prompt)}


def lcpp_child(model: Path, threads: int, turns: int, think: float) -> Dict[str, float]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), n_ctx=N_CTX, n_batch=N_BATCH, n_ubatch=N_BATCH, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    llm.create_completion("Warm up.", max_tokens=2, temperature=0.0)

    def answer(prompt: str, messages: List[Dict[str, str]]):
        started = time.perf_counter()
        ttft, parts = 0.0, []
        for chunk in llm.create_completion(prompt, max_tokens=N_ANSWER, temperature=0.0, stream=True):
            text = chunk["choices"][0]["text"]
            if text and not parts:
                ttft = time.perf_counter() - started
            parts.append(text)
        return "".join(parts), ttft

    return {"ttft": conversation(turns, answer, think)[0]}


def in_child(python: str, side: str, model: Path, threads: int, turns: int, think: float) -> Dict[str, float]:
    """One fresh process: ``side`` is "lcpp" or "ours-<flash-attn setting>"."""
    command = [python, __file__, "--child", side, "--model", str(model), "--threads", str(threads),
               "--turns", str(turns), "--think", str(think)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    output = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(output.splitlines()[-1])


def spread(ratios: Sequence[float]) -> str:
    """Geometric mean with a 95% interval of the log-ratios."""
    logs = [math.log(r) for r in ratios]
    mean = statistics.mean(logs)
    if len(logs) < 2:
        return f"{math.exp(mean):.3f}"
    half = 1.96 * statistics.stdev(logs) / math.sqrt(len(logs))
    return f"{math.exp(mean):.3f} (95% {math.exp(mean - half):.3f}-{math.exp(mean + half):.3f})"


def run(model: Path, threads: int, repeats: int, turns: int, lcpp_python: str,
        settings: Sequence[str], think: float) -> Dict[str, object]:
    sides = ["lcpp", *(f"ours-{setting}" for setting in settings)]
    series: Dict[str, List[Dict[str, float]]] = {side: [] for side in sides}
    for index in range(repeats + repeats % 2):
        for side in (sides if index % 2 == 0 else sides[::-1]):
            python = lcpp_python if side == "lcpp" else sys.executable
            series[side].append(in_child(python, side, model, threads, turns, think))
    theirs = [r["ttft"] for r in series["lcpp"]]
    report: Dict[str, object] = dict(series)
    print(f"turn {turns}, {think:g} s between turns: llama-cpp-python TTFT {statistics.median(theirs) * 1e3:.1f} ms", flush=True)
    for side in sides[1:]:
        ours = [r["ttft"] for r in series[side]]
        own = [r["own_prefill"] for r in series[side]]
        vs_lcpp = [a / b for a, b in zip(ours, theirs)]
        vs_own = [a / (b + 0.005) for a, b in zip(ours, own)]
        first = series[side][0]
        print(f"{side} ({first['n_prompt']} prompt tokens, {first['n_new']} new): TTFT {statistics.median(ours) * 1e3:.1f} ms"
              f"  own prefill of the new tokens {statistics.median(own) * 1e3:.1f} ms", flush=True)
        print(f"  / llama-cpp-python: paired median {statistics.median(vs_lcpp):.3f}  geo-mean {spread(vs_lcpp)}")
        print(f"  / (own prefill + 5 ms): paired median {statistics.median(vs_own):.3f}  geo-mean {spread(vs_own)}")
        report[f"{side}_over_lcpp"], report[f"{side}_over_own_plus_5ms"] = vs_lcpp, vs_own
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--lcpp-python",
                        help="an interpreter with llama-cpp-python installed")
    parser.add_argument("--flash-attn", default="auto,off", help="our settings to run, comma-separated")
    parser.add_argument("--think", type=float, default=1.0,
                        help="seconds between an answer and the next turn (a user reading and typing)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--json")
    args = parser.parse_args()
    if not args.child and not args.lcpp_python:
        parser.error("--lcpp-python is required: an interpreter with llama-cpp-python installed")
    if args.child == "lcpp":
        print(json.dumps(lcpp_child(Path(args.model), args.threads, args.turns, args.think)))
        return 0
    from cyllama_cffi.models import default_model_path

    model = Path(args.model) if args.model else default_model_path()
    if args.child and args.child.startswith("ours-"):
        print(json.dumps(ours_child(model, args.threads, args.turns, args.child[len("ours-"):], args.think)))
        return 0
    settings = args.flash_attn.split(",")
    unknown = sorted(set(settings) - set(FLASH_ATTN))
    if unknown:
        parser.error(f"--flash-attn: {', '.join(unknown)}; choose from {', '.join(FLASH_ATTN)}")
    started = time.time()
    report = run(model, args.threads, args.repeats, args.turns, args.lcpp_python, settings, args.think)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
