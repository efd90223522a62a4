"""From a :class:`GenerationConfig` to a llama.cpp sampler chain."""

from __future__ import annotations

from .config import GenerationConfig, structured_grammar
from .lowlevel.sampler import LlamaSampler
from .lowlevel.vocab import LlamaVocab

__all__ = ["build_sampler"]


def build_sampler(config: GenerationConfig, vocab: LlamaVocab, n_ctx: int) -> LlamaSampler:
    """The chain a generation with ``config`` samples from, in a context of ``n_ctx`` positions.

    The order is cyllama's: penalties → DRY → min_p → top_k → top_p → temperature → a random
    draw, after a grammar stage when ``config.grammar``/``json_schema`` asks for one. A
    ``config.logit_bias`` stage comes before everything, as in llama.cpp's own chain: every
    later stage sees the biased logits, so a banned token (``-inf``) is never chosen. The grammar
    comes first, so every later stage sees only the tokens it allows and the token chosen is
    always one it allows; ``llama_sampler_sample`` then tells every stage, the grammar included,
    which token was chosen, which advances the grammar. (llama.cpp's own ``common_sampler``
    keeps its grammar outside the chain and samples without it first, resampling with it when
    the token is rejected: the same tokens are allowed, with the filters seeing more candidates.) ``temperature=0`` ends the chain with a greedy choice after the penalties and DRY.
    ``top_n_sigma > 0`` takes the place of min_p/top_k/top_p; ``mirostat`` 1 or 2 takes the
    place of the filters, the temperature and the draw. A stage whose settings make it a no-op
    (``top_k=0``, ``top_p=1``, ``min_p=0``, the penalties at their neutral values) is left out.
    A look-back of -1 means the whole context, and no window is longer than the context.
    """
    sampler = LlamaSampler()
    try:
        _fill(sampler, config, vocab, n_ctx)
    except BaseException:
        sampler.close()
        raise
    return sampler


def _fill(sampler: LlamaSampler, config: GenerationConfig, vocab: LlamaVocab, n_ctx: int) -> None:
    if config.logit_bias:
        sampler.add_logit_bias(vocab.n_tokens, config.logit_bias)
    grammar = structured_grammar(config)
    if grammar is not None:
        sampler.add_grammar(vocab, grammar)
    seed = config.seed  # None, -1 and 0xFFFFFFFF all make llama.cpp draw a random seed
    # llama.cpp divides positive logits by the repeat penalty: 0.0 would make every recent token
    # with a positive logit infinitely likely (a reward, not a penalty), so 0.0 is "off", like 1.0.
    repeat = 1.0 if config.repeat_penalty == 0 else config.repeat_penalty
    penalty_last_n = _window(config.penalty_last_n, n_ctx)
    if penalty_last_n != 0 and (repeat != 1.0 or config.frequency_penalty or config.presence_penalty):
        sampler.add_penalties(penalty_last_n, repeat, config.frequency_penalty, config.presence_penalty)
    dry_last_n = _window(config.dry_penalty_last_n, n_ctx)
    if config.dry_multiplier > 0 and config.dry_base >= 1.0 and dry_last_n != 0:  # llama.cpp's own "on" test
        sampler.add_dry(vocab, config.dry_multiplier, config.dry_base, config.dry_allowed_length, dry_last_n,
                        config.dry_sequence_breakers)
    if config.temperature <= 0:
        sampler.add_greedy()
    elif config.mirostat == 1:
        sampler.add_mirostat(vocab.n_tokens, config.mirostat_tau, config.mirostat_eta, seed=seed)
    elif config.mirostat == 2:
        sampler.add_mirostat_v2(config.mirostat_tau, config.mirostat_eta, seed=seed)
    else:
        if config.top_n_sigma > 0:
            sampler.add_top_n_sigma(config.top_n_sigma)
        else:
            if config.min_p > 0.0:
                sampler.add_min_p(config.min_p)
            if config.top_k > 0:
                sampler.add_top_k(config.top_k)
            if config.top_p < 1.0:
                sampler.add_top_p(config.top_p)
        sampler.add_temp(config.temperature)
        sampler.add_dist(seed)


def _window(last_n: int, n_ctx: int) -> int:
    """A look-back in tokens: -1 is the whole context, and none is longer than it."""
    return n_ctx if last_n < 0 else min(last_n, n_ctx)

