"""``cyllama-cffi bench``: a quick tokens-per-second check of prefill and decode.

Like llama-bench's ``pp``/``tg`` tests, on the low-level API: a prefill decodes N prompt
tokens in one batch; a decode run feeds M tokens one by one, each the greedy choice after
the previous one (no sampler, and no end-of-generation stop, so exactly M are decoded).
The cache is cleared before each repetition; the median of the repetitions is printed.
This is a sanity check of a machine and a model, not the project's benchmark suite.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import List

from ._common import EXIT_OK, load_model

# Text repeated to make a prompt of any length: ordinary tokens, no special ones.
FILLER = "The quick brown fox jumps over the lazy dog while the llama watches from the hill. "


def prompt_tokens(vocab: object, count: int) -> List[int]:
    text = FILLER
    tokens: List[int] = []
    while len(tokens) < count:
        tokens = vocab.tokenize(text, add_special=False, parse_special=False)  # type: ignore[attr-defined]
        text += FILLER
    return tokens[:count]


def run(args: argparse.Namespace) -> int:
    from .._ffi import ffi
    from ..lowlevel.batch import LlamaBatch
    from ..lowlevel.context import LlamaContext

    n_prompt, n_gen = args.prompt_tokens, args.gen_tokens
    model = load_model(args)
    try:
        n_ctx = args.ctx_size or n_prompt + n_gen + 1
        if n_ctx <= n_prompt + n_gen:
            raise ValueError(f"--ctx-size {n_ctx} cannot hold {n_prompt} + {n_gen} tokens")
        n_train = model.n_ctx_train
        if n_train > 0 and n_prompt + n_gen > n_train:
            raise ValueError(f"{n_prompt} + {n_gen} tokens exceed the model's training context ({n_train})")
        tokens = prompt_tokens(model.vocab, n_prompt)
        ctx = LlamaContext(model, n_ctx=n_ctx, n_batch=n_prompt, n_ubatch=min(n_prompt, 512),
                           n_threads=args.threads)
        batch = LlamaBatch(max(n_prompt, 1))
        chosen = ffi.new("int32_t *")
        prefill: List[float] = []
        decode: List[float] = []
        try:
            for _ in range(args.repetitions):
                ctx.memory_clear()
                batch.set_tokens(tokens, 0)
                start = time.perf_counter()
                ctx.decode(batch)
                prefill.append(n_prompt / (time.perf_counter() - start))
                token = tokens[-1]
                start = time.perf_counter()
                for index in range(n_gen):
                    ctx.decode_token(batch, token, n_prompt + index, chosen)
                    token = chosen[0] if chosen[0] >= 0 else tokens[0]
                decode.append(n_gen / (time.perf_counter() - start))
        finally:
            batch.close()
            ctx.close()
        print(f"model: {os.path.basename(str(model.path))}  threads: {ctx_threads(args)}  repetitions: {args.repetitions}")
        print(f"prefill {n_prompt:5d} tokens: {statistics.median(prefill):9.1f} tok/s (median)")
        print(f"decode  {n_gen:5d} tokens: {statistics.median(decode):9.1f} tok/s (median)")
        sys.stdout.flush()
    finally:
        model.close()
    return EXIT_OK


def ctx_threads(args: argparse.Namespace) -> int:
    from ..lowlevel.context import usable_cores

    return args.threads or usable_cores()
