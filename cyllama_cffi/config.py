"""``GenerationConfig``: every knob of a generation, validated up front.

Bad values are refused here with ``ValueError("Invalid GenerationConfig: ...")``, every problem
of the config in one message, instead of reaching llama.cpp, where some of them abort the
process. Each problem starts with the phrase cyllama uses for it (``"top_p must be between 0.0
and 1.0"``), followed by what was given.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

from ._logprobs import MAX_LOGPROBS
from .defaults import (DEFAULT_MAIN_GPU, DEFAULT_MAX_TOKENS, DEFAULT_MIN_P, DEFAULT_N_BATCH, DEFAULT_N_GPU_LAYERS,
                       DEFAULT_PENALTY_FREQ, DEFAULT_PENALTY_LAST_N, DEFAULT_PENALTY_PRESENT, DEFAULT_REPEAT_PENALTY,
                       DEFAULT_SPLIT_MODE, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P, LLAMA_DEFAULT_SEED)

__all__ = ["GenerationConfig", "DEFAULT_DRY_SEQUENCE_BREAKERS"]

# llama.cpp's default DRY sequence breakers: a repetition is not followed across these.
DEFAULT_DRY_SEQUENCE_BREAKERS = ("\n", ":", "\"", "*")


@dataclass
class GenerationConfig:
    """How to generate: sampling, limits, context and hardware settings.

    ``temperature=0`` means greedy decoding. The sampler chain is penalties, DRY, min_p, top_k,
    top_p, temperature, then a random draw; ``top_n_sigma > 0`` replaces min_p/top_k/top_p, and
    ``mirostat`` 1 or 2 replaces the filters, temperature and draw. ``repeat_penalty`` 1.0 (and
    0.0, which llama.cpp would divide by) turns the repeat penalty off; ``penalty_last_n`` and
    ``dry_penalty_last_n`` -1 look back over the whole context. ``dry_multiplier=0`` turns DRY
    off. ``n_ctx=None`` sizes the context to prompt + ``max_tokens``. ``n_threads=None`` uses
    the cores this process may run on. ``seed`` ``LLAMA_DEFAULT_SEED`` (0xFFFFFFFF), -1 or None
    draws a random seed. ``parse_special=True`` turns special tokens written in the prompt text
    (``<|im_start|>``...) into those tokens, as chat templates need; ``False`` tokenizes them
    as plain text. ``use_mmap=True`` maps the model file (llama.cpp's default: quick to load,
    shared between processes); ``False`` reads a private copy of the weights onto transparent
    huge pages, for long-lived processes that decode a lot (docs/performance.md gives the
    trade-off). ``logprobs=n`` (1 to 20) records each generated token's log-probability and the
    ``n`` most likely tokens at its step (``Response.logprobs``, ``Stream.logprobs``).
    ``logit_bias={token_id: bias}`` adds ``bias`` to those tokens' logits ahead of every
    other stage (``-inf`` bans a token, a large positive bias forces it). ``flash_attn=None``
    lets llama.cpp choose (on, for the CPU); ``False`` turns flash attention off, which makes
    prompt-prefix reuse decode only a follow-up's new tokens however few (``docs/state.md``).
    """

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K
    top_p: float = DEFAULT_TOP_P
    min_p: float = DEFAULT_MIN_P
    repeat_penalty: float = DEFAULT_REPEAT_PENALTY
    penalty_last_n: int = DEFAULT_PENALTY_LAST_N
    frequency_penalty: float = DEFAULT_PENALTY_FREQ
    presence_penalty: float = DEFAULT_PENALTY_PRESENT
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1
    dry_sequence_breakers: List[str] = field(default_factory=lambda: list(DEFAULT_DRY_SEQUENCE_BREAKERS))
    top_n_sigma: float = -1.0
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    n_gpu_layers: int = DEFAULT_N_GPU_LAYERS
    main_gpu: int = DEFAULT_MAIN_GPU
    split_mode: int = DEFAULT_SPLIT_MODE
    tensor_split: Optional[List[float]] = None
    n_ctx: Optional[int] = None
    n_batch: int = DEFAULT_N_BATCH
    seed: Optional[int] = LLAMA_DEFAULT_SEED
    stop_sequences: List[str] = field(default_factory=list)
    add_bos: bool = True
    parse_special: bool = True
    n_ubatch: int = 512
    n_threads: Optional[int] = None
    use_mmap: bool = True
    # Structured output (docs/structured-output.md): GBNF text or a Grammar; or a JSON schema
    # (a dict, or a pydantic model class), converted to a grammar. At most one of the two.
    grammar: Any = None
    json_schema: Any = None
    # Token log-probabilities (docs/logprobs.md): None or 0 = off; n = each generated token's
    # log-probability and the n most likely tokens at its step, from the model's raw logits.
    logprobs: Optional[int] = None
    # {token id: bias} added to those tokens' logits before any other sampler stage; -inf bans one.
    logit_bias: Optional[Dict[int, float]] = None
    # Flash attention in the context: None lets llama.cpp choose (on, for the CPU). False makes
    # prompt-prefix reuse token-granular (docs/state.md) and deep prompts read in small chunks faster.
    flash_attn: Optional[bool] = None

    def __post_init__(self) -> None:
        problems = list(_problems(self))
        if problems:
            raise ValueError("Invalid GenerationConfig: " + "; ".join(problems))
        _check_structured_output(self)
        if self.logit_bias is not None:  # a copy as {int: float}: later changes to the caller's dict change nothing
            self.logit_bias = {int(token): float(bias) for token, bias in self.logit_bias.items()}

    def replace(self, **overrides: Any) -> "GenerationConfig":
        """A validated copy with some fields changed; unknown names raise ``TypeError``."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown GenerationConfig field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> Dict[str, Any]:
        """Every field, with lists copied: ``GenerationConfig(**config.to_dict())`` rebuilds it."""
        return dataclasses.asdict(self)


INT32_MAX = 2**31 - 1  # fields passed to llama.cpp as int32_t must fit, or cffi raises late
UINT32_MAX = 2**32 - 1
FLOAT32_MAX = 3.4028234663852886e38  # a larger bias would reach llama.cpp as inf


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(phrase: str, value: Any, low: int, high: Optional[int] = INT32_MAX) -> Optional[str]:
    """The problem with an int field that must be in [low, high], or None."""
    if not _is_int(value):
        return f"{phrase} (an int), got {value!r}"
    if value < low:
        return f"{phrase}, got {value!r}"
    if high is not None and value > high:
        return f"{phrase} and <= {high}, got {value!r}"
    return None


def _real(phrase: str, value: Any, ok: Callable[[float], bool]) -> Optional[str]:
    """The problem with a float field (finite, and ``ok``), or None."""
    if not _is_number(value):
        return f"{phrase} (a finite number), got {value!r}"
    return None if ok(value) else f"{phrase}, got {value!r}"


def _choice(phrase: str, value: Any, choices: tuple) -> Optional[str]:
    return None if _is_int(value) and value in choices else f"{phrase}, got {value!r}"


def _flag(name: str, value: Any) -> Optional[str]:
    return None if isinstance(value, bool) else f"{name} must be a bool, got {value!r}"


def _strings(phrase: str, value: Any) -> Optional[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        return f"{phrase}, got {value!r}"
    if any("\0" in s for s in value):  # passed to C as NUL-terminated strings
        return f"{phrase} without NUL characters, got {value!r}"
    return None


def _tensor_split(value: Any) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        return f"tensor_split must be a list or None, got {value!r}"
    if not all(_is_number(v) and v >= 0 for v in value):
        return f"tensor_split values must be non-negative numbers, got {value!r}"
    return None


def _logprobs(value: Any) -> Optional[str]:
    if value is None:
        return None
    phrase = f"logprobs must be between 0 and {MAX_LOGPROBS} (None or 0 = off)"
    if not _is_int(value):
        return f"{phrase} (an int), got {value!r}"
    return None if 0 <= value <= MAX_LOGPROBS else f"{phrase}, got {value!r}"


def _logit_bias(value: Any) -> Optional[str]:
    """Token ids >= 0 (checked against the vocabulary when a generation starts) mapped to finite
    biases, or -inf (the token is never chosen). +inf and NaN would make every probability NaN."""
    if value is None:
        return None
    if not isinstance(value, dict):
        return f"logit_bias must be a dict of token id -> bias, or None, got {value!r}"
    for token, bias in value.items():
        if not _is_int(token) or not 0 <= token <= INT32_MAX:
            return f"logit_bias keys must be token ids (int >= 0), got {token!r}"
        if not (_is_number(bias) and abs(bias) <= FLOAT32_MAX) and bias != -math.inf:
            return (f"logit_bias values must be finite numbers within float32's range (or -inf to ban the token), "
                    f"got {bias!r} for token {token}")
    return None


def _problems(c: GenerationConfig) -> Iterator[str]:
    checks = [
        _integer("max_tokens must be >= 0", c.max_tokens, 0, None),
        _real("temperature must be >= 0.0", c.temperature, lambda v: v >= 0),
        _integer("top_k must be >= 0", c.top_k, 0),
        _real("top_p must be between 0.0 and 1.0", c.top_p, lambda v: 0 <= v <= 1),
        _real("min_p must be between 0.0 and 1.0", c.min_p, lambda v: 0 <= v <= 1),
        _real("repeat_penalty must be >= 0.0", c.repeat_penalty, lambda v: v >= 0),
        _integer("penalty_last_n must be >= -1", c.penalty_last_n, -1),
        _real("frequency_penalty must be >= 0.0", c.frequency_penalty, lambda v: v >= 0),
        _real("presence_penalty must be >= 0.0", c.presence_penalty, lambda v: v >= 0),
        _real("dry_multiplier must be >= 0.0", c.dry_multiplier, lambda v: v >= 0),
        _real("dry_base must be >= 0.0", c.dry_base, lambda v: v >= 0),
        _integer("dry_allowed_length must be >= 0", c.dry_allowed_length, 0),
        _integer("dry_penalty_last_n must be >= -1", c.dry_penalty_last_n, -1),
        _strings("dry_sequence_breakers must be a list of str", c.dry_sequence_breakers),
        _real("top_n_sigma must be a number (-1.0 = off)", c.top_n_sigma, lambda v: True),
        _choice("mirostat must be 0, 1, or 2", c.mirostat, (0, 1, 2)),
        _real("mirostat_tau must be > 0.0", c.mirostat_tau, lambda v: v > 0),
        _real("mirostat_eta must be > 0.0", c.mirostat_eta, lambda v: v > 0),
        _integer("n_gpu_layers must be >= -1", c.n_gpu_layers, -1),
        _integer("main_gpu must be >= 0", c.main_gpu, 0),
        _choice("split_mode must be 0, 1, or 2", c.split_mode, (0, 1, 2)),
        _tensor_split(c.tensor_split),
        None if c.n_ctx is None else _integer("n_ctx must be >= 1", c.n_ctx, 1, 1 << 24),
        _integer("n_batch must be >= 1", c.n_batch, 1, 1 << 20),
        None if c.seed is None else _integer("seed must be >= -1", c.seed, -1, UINT32_MAX),
        _strings("stop_sequences must be a list of str", c.stop_sequences),
        _flag("add_bos", c.add_bos),
        _flag("parse_special", c.parse_special),
        _integer("n_ubatch must be >= 1", c.n_ubatch, 1, 1 << 20),
        None if c.n_threads is None else _integer("n_threads must be >= 1", c.n_threads, 1, 512),
        _flag("use_mmap", c.use_mmap),
        _logprobs(c.logprobs),
        _logit_bias(c.logit_bias),
        None if c.flash_attn is None or isinstance(c.flash_attn, bool)
        else f"flash_attn must be True, False or None, got {c.flash_attn!r}",
    ]
    return (message for message in checks if message)


def _check_structured_output(config: GenerationConfig) -> None:
    """``grammar`` and ``json_schema``: types, mutual exclusion, and the grammar itself, checked now.

    A grammar or schema that cannot be used raises here (``ValueError`` naming the problem),
    not when a generation starts. ``config.grammar`` stays as given; ``structured_grammar``
    gives the checked :class:`Grammar` a generation uses.
    """
    if config.grammar is None and config.json_schema is None:
        return
    if config.grammar is not None and config.json_schema is not None:
        raise ValueError("Invalid GenerationConfig: give grammar or json_schema, not both")
    from .grammar import Grammar  # pure Python, loaded only by configs that constrain output

    if config.grammar is not None:
        if not isinstance(config.grammar, (str, Grammar)):
            raise TypeError(f"Invalid GenerationConfig: grammar must be GBNF text (str) or a Grammar, "
                            f"got {type(config.grammar).__name__}")
    elif not isinstance(config.json_schema, dict) and not hasattr(config.json_schema, "model_json_schema"):
        raise TypeError("Invalid GenerationConfig: json_schema must be a dict or a pydantic model class, "
                        f"got {type(config.json_schema).__name__}")
    try:
        structured_grammar(config)
    except ValueError as error:
        field = "grammar" if config.grammar is not None else "json_schema"
        message = str(error)
        prefix = "Invalid GenerationConfig: "
        raise ValueError(prefix + f"{field}: " + (message[len(prefix):] if message.startswith(prefix) else message)) from None


def structured_grammar(config: GenerationConfig) -> Optional[Any]:
    """The :class:`~cyllama_cffi.grammar.Grammar` ``config`` constrains output with, or None."""
    from .grammar import Grammar

    if config.grammar is not None:
        return config.grammar if isinstance(config.grammar, Grammar) else _grammar_from_text(config.grammar)
    if config.json_schema is not None:
        schema = config.json_schema
        if not isinstance(schema, dict):
            schema = schema.model_json_schema()  # a pydantic model class
        import json

        try:
            text = json.dumps(schema)  # the cache key; keeps the order of properties
        except (TypeError, ValueError) as error:
            raise ValueError(f"Invalid GenerationConfig: json_schema is not JSON: {error}") from None
        return _grammar_from_schema(text)
    return None


@functools.lru_cache(maxsize=64)
def _grammar_from_text(text: str) -> Any:
    from .grammar import Grammar

    return Grammar.from_string(text)


@functools.lru_cache(maxsize=64)
def _grammar_from_schema(text: str) -> Any:
    import json

    from .grammar import Grammar

    return Grammar.from_json_schema(json.loads(text))
