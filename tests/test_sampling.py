"""The sampler chain a GenerationConfig makes: cyllama's order, each stage where its settings put
it, and the DRY, top_n_sigma and penalty settings changing real output."""

from __future__ import annotations

import threading
from typing import List

import pytest

from cyllama_cffi import LLM, GenerationConfig, LlamaSampler, LLMBusyError, ffi, lib
from cyllama_cffi.sampling import build_sampler

REPEATING = ("Repeat after me: apple banana cherry apple banana cherry apple banana cherry "
             "apple banana cherry")
STORY = "Once upon a time"
# Every token is a candidate, hot: without a constraint, seeds give different texts.
HOT = dict(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, max_tokens=16)


@pytest.fixture(scope="module")
def llm(model_path):
    with LLM(model_path, temperature=0.0, max_tokens=40) as instance:
        yield instance


def c_stage_names(sampler: LlamaSampler) -> List[str]:
    """The names llama.cpp gives the samplers really in the C chain."""
    chain = sampler.ptr
    return [ffi.string(lib.llama_sampler_name(lib.llama_sampler_chain_get(chain, i))).decode()
            for i in range(lib.llama_sampler_chain_n(chain))]


CHAINS = [
    ({}, ["min_p", "top_k", "top_p", "temp", "dist"]),
    ({"temperature": 0.0}, ["greedy"]),
    ({"top_k": 0, "top_p": 1.0, "min_p": 0.0}, ["temp", "dist"]),
    ({"repeat_penalty": 1.1}, ["penalties", "min_p", "top_k", "top_p", "temp", "dist"]),
    ({"frequency_penalty": 0.5, "temperature": 0.0}, ["penalties", "greedy"]),
    ({"repeat_penalty": 0.0}, ["min_p", "top_k", "top_p", "temp", "dist"]),  # 0.0 is "off"
    ({"repeat_penalty": 1.1, "penalty_last_n": 0}, ["min_p", "top_k", "top_p", "temp", "dist"]),
    ({"dry_multiplier": 0.8}, ["dry", "min_p", "top_k", "top_p", "temp", "dist"]),
    ({"dry_multiplier": 0.8, "dry_base": 0.5}, ["min_p", "top_k", "top_p", "temp", "dist"]),  # llama.cpp: off
    ({"dry_multiplier": 0.8, "dry_penalty_last_n": 0}, ["min_p", "top_k", "top_p", "temp", "dist"]),
    ({"repeat_penalty": 1.1, "dry_multiplier": 0.8, "temperature": 0.0}, ["penalties", "dry", "greedy"]),
    ({"top_n_sigma": 1.0}, ["top_n_sigma", "temp", "dist"]),
    ({"top_n_sigma": 0.0}, ["min_p", "top_k", "top_p", "temp", "dist"]),  # llama.cpp: n <= 0 is off
    ({"top_n_sigma": 1.0, "repeat_penalty": 1.2, "dry_multiplier": 0.8}, ["penalties", "dry", "top_n_sigma", "temp", "dist"]),
    ({"mirostat": 1}, ["mirostat"]),
    ({"mirostat": 2, "top_n_sigma": 1.0}, ["mirostat_v2"]),
    ({"mirostat": 2, "repeat_penalty": 1.1, "dry_multiplier": 0.8}, ["penalties", "dry", "mirostat_v2"]),
    ({"mirostat": 2, "temperature": 0.0}, ["greedy"]),
]


@pytest.mark.parametrize("overrides, stages", CHAINS)
def test_each_stage_is_in_the_chain_in_cyllamas_order(model, overrides, stages):
    with build_sampler(GenerationConfig(**overrides), model.vocab, 512) as sampler:
        assert sampler.stages == stages
        # what llama.cpp holds, not only our record of it ("top_k" is its "top-k")
        assert c_stage_names(sampler) == [stage.replace("_", "-") for stage in stages]


def longest_repeated_run(text: str) -> int:
    """The most words in a row that occur twice in ``text``."""
    words = text.split()
    best = 0
    for n in range(1, len(words)):
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        if len(set(grams)) == len(grams):
            break
        best = n
    return best


def test_dry_breaks_a_repetition_the_model_would_make(llm):
    plain = llm(REPEATING).text
    dry = llm(REPEATING, config=llm.config.replace(dry_multiplier=2.0)).text
    assert dry != plain
    assert longest_repeated_run(dry) < longest_repeated_run(plain), (plain, dry)


def test_dry_is_off_at_multiplier_zero_and_with_no_breakers_still_works(llm):
    plain = llm(REPEATING).text
    assert llm(REPEATING, config=llm.config.replace(dry_multiplier=0.0, dry_base=3.0)).text == plain
    no_breakers = llm.config.replace(dry_multiplier=2.0, dry_sequence_breakers=[])
    assert llm(REPEATING, config=no_breakers).stats.generated_tokens > 0


def test_top_n_sigma_keeps_only_the_tokens_near_the_top(llm):
    """A tiny sigma leaves the top token alone, so even a hot draw is the greedy text; without it
    the same seeds give different texts."""
    greedy = llm(STORY, config=llm.config.replace(max_tokens=16)).text
    hot = llm.config.replace(**HOT)
    constrained = {llm(STORY, config=hot.replace(seed=seed, top_n_sigma=1e-3)).text for seed in (1, 2, 3)}
    assert constrained == {greedy}
    free = {llm(STORY, config=hot.replace(seed=seed)).text for seed in (1, 2, 3)}
    assert len(free) > 1


def test_penalty_last_n_minus_one_penalises_over_the_whole_context(llm):
    """llama.cpp reads a negative window as 0 (off): -1 is turned into the context size."""
    plain = llm(REPEATING).text
    whole = llm(REPEATING, config=llm.config.replace(repeat_penalty=1.5, penalty_last_n=-1)).text
    assert whole != plain
    assert whole == llm(REPEATING, config=llm.config.replace(repeat_penalty=1.5, penalty_last_n=4096)).text


def test_repeat_penalty_zero_is_off(llm):
    """llama.cpp divides positive logits by the penalty: 0.0 would make the repeated tokens
    infinitely likely. It is accepted, as in cyllama, and means no penalty."""
    plain = llm(REPEATING).text
    assert llm(REPEATING, config=llm.config.replace(repeat_penalty=0.0, penalty_last_n=-1)).text == plain
    sampled = llm.config.replace(temperature=0.8, seed=11, repeat_penalty=0.0)
    assert llm(REPEATING, config=sampled).text == llm(REPEATING, config=sampled.replace(repeat_penalty=1.0)).text


def test_the_default_seed_draws_a_random_one_and_a_fixed_seed_repeats(llm):
    hot = llm.config.replace(**HOT)
    assert hot.seed == 0xFFFFFFFF
    for random_seed in (0xFFFFFFFF, -1, None):
        texts = {llm(STORY, config=hot.replace(seed=random_seed)).text for _ in range(3)}
        assert len(texts) > 1
    fixed = hot.replace(seed=1234)
    assert llm(STORY, config=fixed).text == llm(STORY, config=fixed).text


def test_add_dry_refuses_bad_values_and_keeps_its_breakers_alive(model):
    vocab = model.vocab
    for args, message in [((float("nan"),), "multiplier must be a number"),
                          (("2",), "multiplier must be a number"),
                          ((1.0, None), "base must be a number"),
                          ((1.0, 1.75, 2.5), "allowed_length must be an int"),
                          ((1.0, 1.75, 2 ** 31), "allowed_length must fit in int32"),
                          ((1.0, 1.75, 2, 1 << 25), "penalty_last_n must be at most"),
                          ((1.0, 1.75, 2, 64, ":"), "sequence_breakers must be a list of str"),
                          ((1.0, 1.75, 2, 64, [b":"]), "sequence_breakers must be a list of str"),
                          ((1.0, 1.75, 2, 64, ["a\0b"]), "must not contain NUL")]:
        with LlamaSampler() as sampler:
            with pytest.raises(ValueError, match=message):
                sampler.add_dry(vocab, *args)
            assert sampler.stages == []
    breakers = ["\n", ":", "é", "", "a long breaker made of many tokens"]
    with LlamaSampler().add_dry(vocab, 1.0, 1.75, 2, 64, breakers).add_greedy() as sampler:
        assert c_stage_names(sampler) == ["dry", "greedy"]
    with pytest.raises(ValueError, match="at most"):
        LlamaSampler().add_penalties(1 << 25, 1.1)


def test_busy_errors_are_runtime_errors_naming_the_thread_and_thread_safety(llm):
    """Both ways a second thread is refused say what cyllama says: "another thread", "not thread-safe"."""
    release = threading.Event()
    stepped = threading.Event()

    def consume() -> None:  # holds a stream of the LLM, alive, until released
        with llm.stream(STORY) as stream:
            next(stream)
            stepped.set()
            release.wait(60)

    consumer = threading.Thread(target=consume)
    consumer.start()
    try:
        assert stepped.wait(60)
        with pytest.raises(LLMBusyError) as consuming:
            llm(STORY)
    finally:
        release.set()
        consumer.join(60)

    idle = threading.Event()
    starter = threading.Thread(target=idle.wait, args=(60,))
    starter.start()
    llm._starting = starter  # what another thread setting a generation up leaves, mid-way
    try:
        with pytest.raises(LLMBusyError) as starting:
            llm(STORY)
    finally:
        llm._starting = None
        idle.set()
        starter.join(60)
    for raised in (consuming.value, starting.value):
        assert isinstance(raised, RuntimeError)
        assert "another thread" in str(raised) and "not thread-safe" in str(raised)
    assert llm(STORY, config=llm.config.replace(max_tokens=2)).finish_reason == "length"
