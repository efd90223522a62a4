"""Does decoding a prompt in other chunks change its logits? Measured on the default model.

    python bench/split_invariance.py [--threads 2] [--splits 40] [--greedy 12] [--tokens 600]

A prompt of ``--tokens`` tokens is decoded the way a fresh ``LLM`` does (``prefill_plan`` from
position 0), then again as if the cache held its first ``k`` tokens: "plain" decodes ``[0, k)``
then ``[k, n)``, each in micro-batches from its own start (what any split does); "planned" cuts
``k`` back as ``KVSequence.keep_prefix`` does and decodes both parts with ``prefill_plan`` (what a
reuse does). For each split: the largest absolute difference of the last token's logits from the
fresh ones, and (for the first ``--greedy`` splits) whether the next 24 greedy tokens are the
same. With flash attention on (the default; micro-batches of 512, then 32) and off. This is the
measurement behind what ``docs/state.md`` says reuse guarantees; ``tests/test_prefix_reuse.py``
checks the planned case bit for bit.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import List, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

N_GREEDY = 24
# (flash attention, n_ubatch): the default, small micro-batches, and attention without flash.
SETTINGS = ((True, 512), (True, 32), (False, 512))


def chunks_at(n: int, cuts: Sequence[int], step: int) -> List[Tuple[int, int]]:
    """[start, end) chunks: each segment between cuts in pieces of ``step`` from its own start."""
    bounds = [0, *cuts, n]
    out = []
    for a, b in zip(bounds, bounds[1:]):
        out.extend((s, min(s + step, b)) for s in range(a, b, step))
    return out


def reusable(prompt: Sequence[int], k: int, step: int) -> int:
    """What ``KVSequence.keep_prefix`` keeps of a cache holding ``prompt[:k]`` decoded fresh."""
    from cyllama_cffi._sequence import KVSequence, plan_kinds, prefill_plan

    class Record(KVSequence):
        def __init__(self) -> None:
            self.tokens, self.kinds, self._helper, self.seq_id = list(prompt[:k]), plan_kinds(prefill_plan(0, k, step)), None, 0
            self.ctx = type("Ctx", (), {"n_ubatch": step, "n_batch": 512, "memory_seq_rm": lambda *a: True,
                                        "release_stale_busy": lambda *a: None})()

    return Record().keep_prefix(prompt)


def run(ctx, batch, prompt: Sequence[int], pieces: Sequence[Tuple[int, int]], greedy: int):
    import numpy as np

    ctx.memory_seq_rm(0, -1, -1)
    for start, end in pieces:
        batch.set_tokens(prompt[start:end], start, 0, logits_last=end == len(prompt))
        ctx.decode(batch)
    logits = np.array(ctx.get_logits_ith(-1), dtype=np.float32)
    tokens = []
    token = int(logits.argmax())
    for pos in range(len(prompt), len(prompt) + greedy):
        tokens.append(token)
        batch.set_tokens([token], pos, 0, logits_last=True)
        ctx.decode(batch)
        token = int(np.asarray(ctx.get_logits_ith(-1)).argmax())
    return logits, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=700)
    parser.add_argument("--splits", type=int, default=40)
    parser.add_argument("--greedy", type=int, default=12, help="how many splits also compare greedy text")
    args = parser.parse_args()

    from cyllama_cffi._sequence import prefill_plan
    from cyllama_cffi.lowlevel.batch import LlamaBatch
    from cyllama_cffi.lowlevel.context import LlamaContext
    from cyllama_cffi.lowlevel.model import LlamaModel
    from cyllama_cffi.models import default_model_path

    draw = random.Random(3)
    model = LlamaModel(default_model_path())
    text = ("The history of the city begins with a small village on the river, where fishermen "
            "traded salt and wool with travellers from the hills. ") * 40
    prompt = model.vocab.tokenize(text, add_special=True, parse_special=False)[: args.tokens]
    n = len(prompt)
    splits = sorted(draw.sample(range(1, n - 1), min(args.splits, n - 2)))
    for flash, step in SETTINGS:
        ctx = LlamaContext(model, n_ctx=2048, n_batch=512, n_ubatch=step, n_threads=args.threads, flash_attn=flash)
        batch = LlamaBatch(512)
        fresh_logits, fresh_tokens = run(ctx, batch, prompt, prefill_plan(0, n, step), N_GREEDY)
        print(f"flash_attn={flash} n_ubatch={step}:", flush=True)
        same = {"plain": [0, 0, 0.0], "planned": [0, 0, 0.0]}
        for i, k in enumerate(splits):
            kept = reusable(prompt, k, step)
            for label, pieces in (("plain", chunks_at(n, [k], step)),
                                  ("planned", prefill_plan(0, kept, step) + prefill_plan(kept, n, step))):
                logits, tokens = run(ctx, batch, prompt, pieces, N_GREEDY if i < args.greedy else 0)
                diff = float(abs(logits - fresh_logits).max())
                sizes = sorted({b - a for a, b in pieces})
                same[label][0] += diff == 0.0
                same[label][2] = max(same[label][2], diff)
                if i < args.greedy:
                    same[label][1] += tokens == fresh_tokens
                print(f"  split at {k if label == 'plain' else kept:4d} {label:8s} chunk sizes {sizes[0]:3d}..{sizes[-1]:3d}: "
                      f"max|dlogit| {diff:.3g}" + (f", greedy same {tokens == fresh_tokens}" if i < args.greedy else ""),
                      flush=True)
        for label, (zero, greedy_same, worst) in same.items():
            print(f"  {label}: {zero}/{len(splits)} bit-identical, worst {worst:.3g}, greedy same "
                  f"{greedy_same}/{min(args.greedy, len(splits))}", flush=True)
        batch.close()
        ctx.close()
    model.close()


if __name__ == "__main__":
    main()
