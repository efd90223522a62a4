"""The prompt tokens native ``llama-bench`` decodes, so the binding's prefill rows decode the same.

``llama-bench``'s ``pp N`` test fills each ``n_batch`` call with ``std::rand() % n_vocab`` (the
first token is BOS when the vocabulary adds one) and never seeds the generator, so every
process draws the same sequence: glibc's ``rand()`` after the implicit ``srand(1)``. Its warm-up
run draws the first ``N`` tokens and the timed run the next ``N``. Feeding the binding those
same tokens makes a prefill row compare like with like: a text prompt against random tokens
would compare inputs as well as the two drivers (on one VM a long prefill's speed was once seen
to follow the prompt's content, docs/performance.md).
"""

from __future__ import annotations

from typing import Iterator, List

_RAND_DEGREE = 31  # glibc's TYPE_3 additive feedback generator: r[i] = r[i-31] + r[i-3]
_RAND_SEPARATION = 3
_RAND_DISCARD = 310  # outputs glibc drops after seeding


def glibc_rand(seed: int = 1) -> Iterator[int]:
    """The values of glibc's ``rand()`` after ``srand(seed)``, in order."""
    state = [seed]
    for _ in range(1, _RAND_DEGREE):
        state.append(16807 * state[-1] % 2147483647)
    state += state[:_RAND_SEPARATION]
    index = 0
    while True:
        state.append((state[-_RAND_DEGREE] + state[-_RAND_SEPARATION]) & 0xFFFFFFFF)
        del state[0]
        if index >= _RAND_DISCARD:
            yield state[-1] >> 1
        index += 1


def llama_bench_prompts(n_prompt: int, n_batch: int, n_vocab: int, bos: int, add_bos: bool,
                        runs: int = 2) -> List[List[int]]:
    """The token lists of ``runs`` consecutive ``pp n_prompt`` runs of one ``llama-bench`` process
    (run 0 is its warm-up), drawn as its ``test_prompt`` draws them."""
    draws = glibc_rand()
    prompts = []
    for _ in range(runs):
        tokens: List[int] = []
        while len(tokens) < n_prompt:
            size = min(n_prompt - len(tokens), n_batch)
            first = bos if not tokens and add_bos else next(draws) % n_vocab
            tokens.append(first)
            tokens.extend(next(draws) % n_vocab for _ in range(size - 1))
        prompts.append(tokens)
    return prompts
