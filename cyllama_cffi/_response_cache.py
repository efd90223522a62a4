"""An LRU cache of finished responses, for ``LLM(cache_size=...)``.

A generation with a fixed seed is reproducible: the same prompt under the same output-affecting
settings gives the same text. Such calls can be answered from memory instead of decoding again.
A call with a random seed is never cached (as in cyllama, even a greedy one), nor is a stream
or a call with an ``on_token`` callback, which expects to see the tokens arrive.

The cache is shared by whatever threads hold the LLM, so every operation takes one lock.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Hashable, NamedTuple, Optional, Tuple

__all__ = ["ResponseCache", "ResponseCacheInfo", "cache_key", "copy_response", "make_cache"]

# Seeds that ask llama.cpp for a random one: no two calls give the same text.
_RANDOM_SEEDS = (None, -1, 0xFFFFFFFF)  # 0xFFFFFFFF is LLAMA_DEFAULT_SEED

# The GenerationConfig fields that decide how fast a generation runs, not what it says (threads,
# batch sizes, GPU placement, mmap); cyllama's key leaves them out too. Every other field is in
# the key, so that a field added later is keyed unless it is listed here. n_ctx is kept, unlike
# cyllama's key: a smaller context ends a generation sooner.
SPEED_FIELDS = frozenset(("n_gpu_layers", "main_gpu", "split_mode", "tensor_split", "n_batch", "n_ubatch",
                          "n_threads", "use_mmap"))


def _hashable(value: Any) -> Hashable:
    """A field's value as part of a key: lists and dicts (a JSON schema, logit_bias, DRY
    breakers) become sorted tuples; a Grammar, a pydantic class... are keyed by their text."""
    if isinstance(value, dict):
        return ("dict", tuple(sorted((repr(k), _hashable(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return ("list", tuple(_hashable(v) for v in value))
    if value is None or isinstance(value, (str, bytes, int, float)):
        return value
    text = getattr(value, "gbnf", None)  # a Grammar object
    if isinstance(text, str):
        return ("grammar", text, getattr(value, "root", None))
    schema = getattr(value, "model_json_schema", None)  # a pydantic model class
    if callable(schema):
        return ("schema", _hashable(schema()))
    return ("object", repr(value))


class ResponseCacheInfo(NamedTuple):
    """Counts of a response cache, like ``functools.lru_cache``'s ``cache_info()``."""

    hits: int
    misses: int
    maxsize: int
    currsize: int
    ttl: Optional[float]  # seconds an entry lives; None: until evicted


def cache_key(prompt: Any, config: Any) -> Optional[Hashable]:
    """The key of a call, or None when its result must not be cached (random seed, odd prompt).

    Text and token prompts get distinct keys. Any other prompt (a generator, an array) is not
    cached: reading it here would consume it, and the generation validates it anyway.
    """
    if config.seed in _RANDOM_SEEDS:
        return None
    if isinstance(prompt, str):
        what: Tuple[Any, ...] = ("text", prompt)
    elif isinstance(prompt, (list, tuple)):
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return None
        what = ("tokens", tuple(prompt))
    else:
        return None
    settings = []
    for field in dataclasses.fields(config):
        if field.name in SPEED_FIELDS:
            continue
        value = getattr(config, field.name)
        if field.name == "stop_sequences":  # a set: the first one found ends the text, whatever their order
            value = tuple(sorted(set(value)))
        elif field.name == "logit_bias" and not value:  # {} biases nothing, as None does
            value = None
        settings.append((field.name, _hashable(value)))
    return what + tuple(settings)


def _check_size(cache_size: Any) -> int:
    if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
        raise ValueError(f"cache_size must be an int >= 0 (0 disables the cache), got {cache_size!r}")
    return cache_size


def _check_ttl(cache_ttl: Any) -> Optional[float]:
    if cache_ttl is None:
        return None
    if (isinstance(cache_ttl, bool) or not isinstance(cache_ttl, (int, float)) or not math.isfinite(cache_ttl)
            or cache_ttl <= 0):
        raise ValueError(f"cache_ttl must be None (no expiry) or a number of seconds > 0, got {cache_ttl!r}")
    return float(cache_ttl)


class ResponseCache:
    """At most ``maxsize`` values, the least recently used evicted first, each living ``ttl`` seconds.

    ``clock`` (``time.monotonic`` by default) is injectable so that expiry can be tested
    without waiting.
    """

    def __init__(self, maxsize: int, ttl: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        maxsize = _check_size(maxsize)
        if maxsize == 0:
            raise ValueError("a ResponseCache needs maxsize >= 1")
        self.maxsize = maxsize
        self.ttl = _check_ttl(ttl)
        self._clock = clock
        self._entries: "OrderedDict[Hashable, Tuple[Any, float]]" = OrderedDict()  # key -> (value, stored at)
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    def _expired(self, stored_at: float, now: float) -> bool:
        return self.ttl is not None and now - stored_at >= self.ttl

    def get(self, key: Hashable) -> Optional[Any]:
        """The value stored for ``key`` (now the most recently used), or None: a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and self._expired(entry[1], self._clock()):
                del self._entries[key]
                entry = None
            if entry is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return entry[0]

    def put(self, key: Hashable, value: Any) -> None:
        """Store ``value``; when full, expired entries go first, then the least recently used."""
        with self._lock:
            now = self._clock()
            self._entries.pop(key, None)
            if len(self._entries) >= self.maxsize:
                self._drop_expired(now)
            while len(self._entries) >= self.maxsize:
                self._entries.popitem(last=False)
            self._entries[key] = (value, now)

    def _drop_expired(self, now: float) -> None:
        for key in [k for k, (_, stored_at) in self._entries.items() if self._expired(stored_at, now)]:
            del self._entries[key]

    def clear(self) -> None:
        """Forget every entry and reset the counts."""
        with self._lock:
            self._entries.clear()
            self._hits = self._misses = 0

    def info(self) -> ResponseCacheInfo:
        """The counts now; ``currsize`` leaves out entries that have expired."""
        with self._lock:
            self._drop_expired(self._clock())
            return ResponseCacheInfo(self._hits, self._misses, self.maxsize, len(self._entries), self.ttl)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def copy_response(response: Any) -> Any:
    """A new Response equal to ``response`` (text, stats, finish_reason, model, logprobs).

    The cache keeps its own copy and hands out copies, so a caller that changes the one it got
    changes nothing for the next caller (the logprobs entries themselves are immutable tuples).
    """
    import dataclasses

    logprobs = list(response.logprobs) if response.logprobs is not None else None
    return type(response)(response.text, dataclasses.replace(response.stats), response.finish_reason,
                          response.model, logprobs=logprobs)


def make_cache(cache_size: Any, cache_ttl: Any) -> Optional[ResponseCache]:
    """The cache ``LLM(cache_size=, cache_ttl=)`` asks for (None when ``cache_size`` is 0); ValueError on bad values."""
    size, ttl = _check_size(cache_size), _check_ttl(cache_ttl)
    return ResponseCache(size, ttl) if size else None

