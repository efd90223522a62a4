"""LLM(cache_size=...) on the real model: what is cached, what is not, and what a hit returns."""

from __future__ import annotations

import time

import pytest

from cyllama_cffi import LLM, ClosedError, FinishReason, ResponseCacheInfo

PROMPT = "Once upon a time"


@pytest.fixture
def llm(model_path):
    with LLM(model_path, cache_size=4, seed=42, max_tokens=8) as instance:
        yield instance


def test_a_hit_returns_the_same_response_much_faster_without_decoding(llm):
    t0 = time.perf_counter()
    first = llm(PROMPT)
    miss_time = time.perf_counter() - t0
    finished_at = llm.last_finished_at
    t0 = time.perf_counter()
    second = llm(PROMPT)
    hit_time = time.perf_counter() - t0
    assert second.text == first.text and second == first and len(first.text) > 0
    assert second.finish_reason == first.finish_reason
    assert second.stats == first.stats and second.model == first.model
    assert second is not first
    assert llm.last_finished_at == finished_at  # no generation ran
    assert hit_time < miss_time / 20, (hit_time, miss_time)
    assert llm.cache_info() == ResponseCacheInfo(hits=1, misses=1, maxsize=4, currsize=1, ttl=None)


def test_a_hit_is_what_a_fresh_generation_would_say(llm, model_path):
    cached = llm(PROMPT)
    cached = llm(PROMPT)
    assert llm.cache_info().hits == 1
    with LLM(model_path, seed=42, max_tokens=8) as plain:
        assert plain(PROMPT).text == cached.text


def test_a_changed_config_misses(llm):
    llm(PROMPT)
    llm(PROMPT, config=llm.config.replace(temperature=0.5))
    llm(PROMPT, config=llm.config.replace(seed=43))
    llm(PROMPT, config=llm.config.replace(max_tokens=3))
    assert llm.cache_info() == ResponseCacheInfo(hits=0, misses=4, maxsize=4, currsize=4, ttl=None)
    llm(PROMPT, config=llm.config.replace(n_threads=1))  # how fast, not what: a hit
    assert llm.cache_info().hits == 1


def test_a_grammar_call_is_not_answered_with_a_grammarless_response(llm):
    free = llm(PROMPT)
    constrained = llm(PROMPT, config=llm.config.replace(grammar='root ::= "yes" | "no"'))
    assert constrained.text in ("yes", "no") and free.text not in ("yes", "no")
    shaped = llm(PROMPT, config=llm.config.replace(json_schema={"type": "integer"}))
    assert shaped.text.lstrip("-").isdigit()
    assert llm.cache_info().hits == 0
    again = llm(PROMPT, config=llm.config.replace(grammar='root ::= "yes" | "no"'))
    assert again.text == constrained.text and llm.cache_info().hits == 1


def test_the_oldest_entry_is_evicted(model_path):
    with LLM(model_path, cache_size=2, seed=1, max_tokens=2) as llm:
        llm("One")
        llm("Two")
        llm("Three")
        llm("Two")
        assert llm.cache_info() == ResponseCacheInfo(hits=1, misses=3, maxsize=2, currsize=2, ttl=None)
        llm("One")
        assert llm.cache_info().misses == 4


@pytest.mark.parametrize("seed", [None, -1, 0xFFFFFFFF])
def test_random_seed_calls_are_not_cached(model_path, seed):
    with LLM(model_path, cache_size=4, seed=seed, temperature=0.0, max_tokens=2) as llm:
        llm(PROMPT)
        llm(PROMPT)
        assert llm.cache_info() == ResponseCacheInfo(0, 0, 4, 0, None)
        assert llm.last_stats.generated_tokens > 0


def test_streams_and_token_callbacks_are_neither_cached_nor_served(llm):
    llm(PROMPT)
    pieces = []
    streamed = "".join(llm(PROMPT, stream=True))
    called = llm(PROMPT, on_token=pieces.append)
    assert streamed == called.text == "".join(pieces)
    assert llm.cache_info() == ResponseCacheInfo(hits=0, misses=1, maxsize=4, currsize=1, ttl=None)


def interrupt_during_generation(llm, action):
    """Make the next generation run ``action`` after its first token, as a cancel() from elsewhere would land."""
    def open_stream(prompt, config=None, on_token=None, then=()):
        del llm._open_stream  # this once only
        return LLM._open_stream(llm, prompt, config, lambda piece: action(), then)
    llm._open_stream = open_stream


def test_a_cancelled_generation_is_not_cached(llm):
    interrupt_during_generation(llm, llm.cancel)
    cut = llm(PROMPT)
    assert cut.finish_reason == FinishReason.CANCELLED
    assert llm.cache_info().currsize == 0
    full = llm(PROMPT)
    assert full.finish_reason != FinishReason.CANCELLED and len(full.text) > len(cut.text)
    assert llm.cache_info() == ResponseCacheInfo(hits=0, misses=2, maxsize=4, currsize=1, ttl=None)


def test_a_failed_generation_is_not_cached(llm):
    def fail():
        raise RuntimeError("disk full")

    interrupt_during_generation(llm, fail)
    with pytest.raises(RuntimeError, match="disk full"):
        llm(PROMPT)
    assert llm.cache_info().currsize == 0


def test_closed_llm_raises_even_for_a_cached_prompt(model_path):
    with LLM(model_path, cache_size=2, seed=5, max_tokens=2) as llm:  # the block's end frees the model
        llm(PROMPT)
    with pytest.raises(ClosedError):
        llm(PROMPT)


def test_close_keeps_the_cache_and_the_llm_usable(model_path):
    llm = LLM(model_path, cache_size=2, seed=5, max_tokens=2)
    first = llm(PROMPT)
    llm.close()  # frees the context only, as in cyllama
    assert llm(PROMPT) == first and llm.cache_info().hits == 1


def test_cache_clear_and_disabled_cache(model_path, llm):
    llm(PROMPT)
    llm(PROMPT)
    llm.cache_clear()
    assert llm.cache_info() == ResponseCacheInfo(0, 0, 4, 0, None) and llm.cache_enabled
    with LLM(model_path, seed=1, max_tokens=2) as plain:
        assert not plain.cache_enabled and plain.cache_info() is None
        plain.cache_clear()  # nothing to do, no error


@pytest.mark.parametrize("kwargs", [{"cache_size": -1}, {"cache_size": 2, "cache_ttl": 0}, {"cache_size": "8"}])
def test_bad_cache_settings_fail_before_the_model_loads(tmp_path, kwargs):
    with pytest.raises(ValueError, match="cache_"):
        LLM(tmp_path / "missing.gguf", **kwargs)  # the ValueError comes before FileNotFoundError
