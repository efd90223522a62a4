"""The response cache on its own: counts, LRU order, expiry on a fake clock, keys, threads."""

from __future__ import annotations

import dataclasses
import sys
import threading

import pytest

from cyllama_cffi import ResponseCacheInfo
from cyllama_cffi._logprobs import TokenLogprob, TopLogprob
from cyllama_cffi._response_cache import SPEED_FIELDS, ResponseCache, cache_key, copy_response, make_cache
from cyllama_cffi.config import GenerationConfig
from cyllama_cffi.response import GenerationStats, Response

# A value other than the default for every field that changes what a generation says.
OUTPUT_VALUES = {"max_tokens": 9, "temperature": 0.1, "top_k": 3, "top_p": 0.5, "min_p": 0.2,
                 "repeat_penalty": 1.3, "penalty_last_n": 8, "frequency_penalty": 0.5, "presence_penalty": 0.5,
                 "dry_multiplier": 0.8, "dry_base": 2.0, "dry_allowed_length": 3, "dry_penalty_last_n": 64,
                 "dry_sequence_breakers": ["!"], "top_n_sigma": 1.0, "mirostat": 2, "mirostat_tau": 3.0,
                 "mirostat_eta": 0.3, "n_ctx": 512, "seed": 8, "stop_sequences": ["\n"], "add_bos": False,
                 "parse_special": False, "grammar": 'root ::= "x"', "json_schema": {"type": "string"},
                 "logprobs": 3, "logit_bias": {5: 2.0}, "flash_attn": False}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_hits_and_misses_are_counted():
    cache = ResponseCache(4)
    assert cache.get("a") is None
    cache.put("a", 1)
    assert cache.get("a") == 1 and cache.get("a") == 1
    assert cache.get("b") is None
    assert cache.info() == ResponseCacheInfo(hits=2, misses=2, maxsize=4, currsize=1, ttl=None)


def test_the_least_recently_used_entry_is_evicted_first():
    cache = ResponseCache(3)
    for key in "abc":
        cache.put(key, key.upper())
    assert cache.get("a") == "A"  # a is now the most recent: b is the oldest
    cache.put("d", "D")
    assert cache.get("b") is None
    assert [cache.get(k) for k in "acd"] == ["A", "C", "D"]
    cache.put("e", "E")  # order of use now: a, c, d, e -> a goes
    assert cache.get("a") is None
    assert cache.info().currsize == 3


def test_putting_an_existing_key_replaces_it_without_evicting_others():
    cache = ResponseCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("a", 3)
    assert cache.get("a") == 3 and cache.get("b") == 2


def test_entries_expire_after_ttl_seconds():
    clock = FakeClock()
    cache = ResponseCache(4, ttl=10, clock=clock)
    cache.put("a", 1)
    clock.now += 9.5
    assert cache.get("a") == 1  # a hit does not renew the entry's life
    clock.now += 0.5
    assert cache.get("a") is None
    assert cache.info() == ResponseCacheInfo(hits=1, misses=1, maxsize=4, currsize=0, ttl=10.0)


def test_expired_entries_make_room_before_live_ones_are_evicted():
    clock = FakeClock()
    cache = ResponseCache(2, ttl=5, clock=clock)
    cache.put("old", 1)
    clock.now += 3
    cache.put("young", 2)
    assert cache.get("old") == 1  # old is now the most recently used, young the least
    clock.now += 2.5  # old has expired, young has not
    cache.put("new", 3)
    assert cache.get("young") == 2 and cache.get("new") == 3


def test_info_leaves_out_expired_entries():
    clock = FakeClock()
    cache = ResponseCache(4, ttl=1, clock=clock)
    cache.put("a", 1)
    cache.put("b", 2)
    clock.now += 1
    assert cache.info().currsize == 0


def test_clear_forgets_entries_and_counts():
    cache = ResponseCache(2)
    cache.put("a", 1)
    cache.get("a")
    cache.get("z")
    cache.clear()
    assert cache.info() == ResponseCacheInfo(0, 0, 2, 0, None)
    assert cache.get("a") is None


@pytest.mark.parametrize("size", [-1, 1.5, "10", True, None])
def test_bad_sizes_are_value_errors(size):
    with pytest.raises(ValueError, match="cache_size must be an int >= 0"):
        make_cache(size, None)


@pytest.mark.parametrize("ttl", [0, -3, float("nan"), float("inf"), "60", True])
def test_bad_ttls_are_value_errors(ttl):
    with pytest.raises(ValueError, match="cache_ttl must be None"):
        make_cache(4, ttl)


def test_size_zero_means_no_cache():
    assert make_cache(0, None) is None
    assert make_cache(0, 30) is None  # a ttl alone does not turn it on
    assert make_cache(3, 2.5).info() == ResponseCacheInfo(0, 0, 3, 0, 2.5)


@pytest.mark.parametrize("seed", [None, -1, 0xFFFFFFFF])
def test_random_seeds_are_never_cached_even_when_greedy(seed):
    assert cache_key("hi", GenerationConfig(seed=seed)) is None
    assert cache_key("hi", GenerationConfig(seed=seed, temperature=0.0)) is None


def test_keys_change_with_every_output_setting_and_not_with_speed_settings():
    base = GenerationConfig(seed=7)
    key = cache_key("hi", base)
    assert key is not None and key == cache_key("hi", GenerationConfig(seed=7))
    assert cache_key("ho", base) != key
    for field, value in [("max_tokens", 9), ("temperature", 0.1), ("top_k", 3), ("top_p", 0.5), ("min_p", 0.2),
                         ("repeat_penalty", 1.3), ("penalty_last_n", 8), ("frequency_penalty", 0.5),
                         ("presence_penalty", 0.5), ("mirostat", 2), ("mirostat_tau", 3.0), ("mirostat_eta", 0.3),
                         ("n_ctx", 512), ("seed", 8), ("add_bos", False), ("parse_special", False),
                         ("stop_sequences", ["\n"]), ("logprobs", 3), ("logit_bias", {5: 2.0}),
                         ("logit_bias", {5: -float("inf")}), ("dry_multiplier", 0.8), ("dry_base", 2.0),
                         ("dry_allowed_length", 3), ("dry_penalty_last_n", 64), ("dry_sequence_breakers", ["!"]),
                         ("top_n_sigma", 1.0), ("grammar", 'root ::= "yes" | "no"'),
                         ("json_schema", {"type": "object"})]:
        assert cache_key("hi", base.replace(**{field: value})) != key, field
    for field in [f.name for f in dataclasses.fields(GenerationConfig)]:  # a field added later is keyed
        if field not in SPEED_FIELDS:
            assert cache_key("hi", base.replace(**{field: OUTPUT_VALUES[field]})) != key, field
    for field, value in [("n_threads", 1), ("n_batch", 64), ("n_ubatch", 32), ("use_mmap", False)]:
        assert cache_key("hi", base.replace(**{field: value})) == key, field
    # the first stop sequence found ends the text, whatever the order they were given in
    assert cache_key("hi", base.replace(stop_sequences=["a", "b"])) == cache_key("hi", base.replace(stop_sequences=["b", "a"]))
    biased = cache_key("hi", base.replace(logit_bias={5: 2.0, 9: -1.0}))
    assert biased == cache_key("hi", base.replace(logit_bias={9: -1, 5: 2}))  # same biases, any order or number type
    assert biased != cache_key("hi", base.replace(logit_bias={5: 2.0, 9: -1.5}))
    assert cache_key("hi", base.replace(logit_bias={})) == key  # no bias at all


def test_grammars_and_schemas_are_keyed_by_what_they_say():
    base = GenerationConfig(seed=7)
    yes_no = 'root ::= "yes" | "no"'
    assert cache_key("hi", base.replace(grammar=yes_no)) == cache_key("hi", base.replace(grammar=yes_no))
    assert cache_key("hi", base.replace(grammar=yes_no)) != cache_key("hi", base.replace(grammar='root ::= "no"'))
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}
    reordered = {"properties": {"b": {"type": "string"}, "a": {"type": "integer"}}, "type": "object"}
    assert cache_key("hi", base.replace(json_schema=schema)) == cache_key("hi", base.replace(json_schema=reordered))
    assert cache_key("hi", base.replace(json_schema=schema)) != cache_key("hi", base.replace(
        json_schema={"type": "object", "properties": {"a": {"type": "number"}}}))


def test_text_and_token_prompts_have_distinct_keys_and_iterators_none():
    config = GenerationConfig(seed=1)
    assert cache_key([1, 2], config) == cache_key((1, 2), config)
    assert cache_key([1, 2], config) != cache_key("\x01\x02", config)
    assert cache_key(iter([1, 2]), config) is None  # reading it would consume it
    assert cache_key([1, True], config) is None


def test_copies_are_equal_but_independent():
    stats = GenerationStats(prompt_tokens=3, generated_tokens=2, total_time=0.5)
    original = Response("hello", stats, "length", "m.gguf")
    copy = copy_response(original)
    assert (copy.text, copy.stats, copy.finish_reason, copy.model) == ("hello", stats, "length", "m.gguf")
    copy.stats.generated_tokens = 99
    assert original.stats.generated_tokens == 2


def test_copies_carry_their_own_list_of_logprobs():
    entry = TokenLogprob(5, "hi", b"hi", -0.25, (TopLogprob(5, "hi", b"hi", -0.25),))
    original = Response("hi", GenerationStats(), "stop", "m.gguf", logprobs=[entry])
    copy = copy_response(original)
    assert copy.logprobs == [entry] and copy.logprobs is not original.logprobs
    copy.logprobs.clear()
    assert original.logprobs == [entry]
    assert copy_response(Response("hi", GenerationStats())).logprobs is None


@pytest.fixture
def eager_thread_switches():
    """Switch threads every microsecond, so unlocked races show up within a few thousand operations."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


def test_concurrent_gets_and_puts_keep_the_cache_consistent(eager_thread_switches):
    """Without the lock this fails: lost counts, and eviction iterating while another thread inserts."""
    cache = ResponseCache(16)
    n_threads, n_ops = 8, 2000
    start = threading.Barrier(n_threads)
    errors = []

    def work(worker: int) -> None:
        try:
            start.wait()
            for i in range(n_ops):
                key = (worker * 7 + i) % 40
                if i % 3:
                    value = cache.get(key)
                    assert value is None or value == key * 2
                else:
                    cache.put(key, key * 2)
        except BaseException as exc:  # reported below, with the thread that raised
            errors.append((worker, exc))

    threads = [threading.Thread(target=work, args=(w,)) for w in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    info = cache.info()
    gets = sum(1 for i in range(n_ops) if i % 3) * n_threads
    assert info.hits + info.misses == gets  # no lost updates of the counts
    assert info.currsize <= 16 and len(cache._entries) == info.currsize
