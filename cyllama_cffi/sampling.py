"""From a :class:`GenerationConfig` to a llama.cpp sampler chain."""

from __future__ import annotations

from .config import GenerationConfig, structured_grammar
from .lowlevel.sampler import LlamaSampler
from .lowlevel.vocab import LlamaVocab

__all__ = ["build_sampler"]


def build_sampler(config: GenerationConfig, vocab: LlamaVocab) -> LlamaSampler:
    """The chain a generation with ``config`` samples from: grammar, penalties, filters, then a choice.

    ``temperature=0`` is greedy; ``mirostat`` replaces the filters; ``seed=None`` or -1 lets
    llama.cpp draw a random seed. A grammar (``config.grammar``/``json_schema``) comes first, so
    every later stage sees only the tokens it allows, and the token chosen is always one it
    allows; ``llama_sampler_sample`` then tells every stage, the grammar included, which token
    was chosen, which advances the grammar. (llama.cpp's own ``common_sampler`` keeps its
    grammar outside the chain and samples without it first, resampling with it when the token
    is rejected: the same tokens are allowed, with the filters seeing more candidates.)
    """
    sampler = LlamaSampler()
    seed = None if config.seed is None or config.seed < 0 else config.seed
    grammar = structured_grammar(config)
    if grammar is not None:
        try:
            sampler.add_grammar(vocab, grammar)
        except BaseException:
            sampler.close()
            raise
    if config.repeat_penalty != 1.0 or config.frequency_penalty or config.presence_penalty:
        sampler.add_penalties(config.penalty_last_n, config.repeat_penalty, config.frequency_penalty,
                              config.presence_penalty)
    if config.temperature <= 0:
        return sampler.add_greedy()
    if config.mirostat == 1:
        return sampler.add_temp(config.temperature).add_mirostat(vocab.n_tokens, config.mirostat_tau,
                                                                 config.mirostat_eta, seed=seed)
    if config.mirostat == 2:
        return sampler.add_temp(config.temperature).add_mirostat_v2(config.mirostat_tau, config.mirostat_eta,
                                                                    seed=seed)
    if config.top_k > 0:
        sampler.add_top_k(config.top_k)
    if config.top_p < 1.0:
        sampler.add_top_p(config.top_p)
    if config.min_p > 0.0:
        sampler.add_min_p(config.min_p)
    return sampler.add_temp(config.temperature).add_dist(seed)
