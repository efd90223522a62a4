"""``GenerationConfig``: every knob of a generation, validated up front.

Bad values are refused here with ``ValueError("Invalid GenerationConfig: ...")``
instead of reaching llama.cpp, where some of them abort the process.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class GenerationConfig:
    """How to generate: sampling, limits, context and hardware settings.

    ``temperature=0`` means greedy decoding. ``n_ctx=None`` sizes the context
    to prompt + ``max_tokens``. ``n_threads=None`` uses the cores this process
    may run on. ``seed=None`` (or -1) draws a random seed. ``parse_special=True``
    turns special tokens written in the prompt text (``<|im_start|>``...) into
    those tokens, as chat templates need; ``False`` tokenizes them as plain text.
    ``use_mmap=True`` maps the model file (llama.cpp's default: quick to load,
    shared between processes); ``False`` reads a private copy of the weights onto
    transparent huge pages, for long-lived processes that decode a lot
    (docs/performance.md gives the trade-off).
    """

    max_tokens: int = 512
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    penalty_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    n_gpu_layers: int = 99
    main_gpu: int = 0
    split_mode: int = 1
    tensor_split: Optional[List[float]] = None
    n_ctx: Optional[int] = None
    n_batch: int = 2048
    n_ubatch: int = 512
    seed: Optional[int] = None
    stop_sequences: List[str] = field(default_factory=list)
    add_bos: bool = True
    parse_special: bool = True
    n_threads: Optional[int] = None
    use_mmap: bool = True
    # Structured output (docs/structured-output.md): GBNF text or a Grammar; or a JSON schema
    # (a dict, or a pydantic model class), converted to a grammar. At most one of the two.
    grammar: Any = None
    json_schema: Any = None

    def __post_init__(self) -> None:
        problems = list(_problems(self))
        if problems:
            raise ValueError("Invalid GenerationConfig: " + "; ".join(problems))
        _check_structured_output(self)

    def replace(self, **overrides: Any) -> "GenerationConfig":
        """A validated copy with some fields changed; unknown names raise ``TypeError``."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown GenerationConfig field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


INT32_MAX = 2**31 - 1  # fields passed to llama.cpp as int32_t must fit, or cffi raises late


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _problems(config: GenerationConfig):
    def check(ok: bool, message: str):
        return None if ok else message

    checks = [
        check(_is_int(config.max_tokens) and config.max_tokens >= 0, f"max_tokens must be an int >= 0, got {config.max_tokens!r}"),
        check(_is_number(config.temperature) and config.temperature >= 0, f"temperature must be >= 0, got {config.temperature!r}"),
        check(_is_int(config.top_k) and 0 <= config.top_k <= INT32_MAX, f"top_k must be an int in [0, {INT32_MAX}], got {config.top_k!r}"),
        check(_is_number(config.top_p) and 0 <= config.top_p <= 1, f"top_p must be in [0, 1], got {config.top_p!r}"),
        check(_is_number(config.min_p) and 0 <= config.min_p <= 1, f"min_p must be in [0, 1], got {config.min_p!r}"),
        check(_is_number(config.repeat_penalty) and config.repeat_penalty > 0, f"repeat_penalty must be > 0, got {config.repeat_penalty!r}"),
        check(_is_int(config.penalty_last_n) and -1 <= config.penalty_last_n <= INT32_MAX, f"penalty_last_n must be an int in [-1, {INT32_MAX}], got {config.penalty_last_n!r}"),
        check(_is_number(config.frequency_penalty), f"frequency_penalty must be a finite number, got {config.frequency_penalty!r}"),
        check(_is_number(config.presence_penalty), f"presence_penalty must be a finite number, got {config.presence_penalty!r}"),
        check(config.mirostat in (0, 1, 2) and _is_int(config.mirostat), f"mirostat must be 0, 1 or 2, got {config.mirostat!r}"),
        check(_is_number(config.mirostat_tau) and config.mirostat_tau > 0, f"mirostat_tau must be > 0, got {config.mirostat_tau!r}"),
        check(_is_number(config.mirostat_eta) and config.mirostat_eta > 0, f"mirostat_eta must be > 0, got {config.mirostat_eta!r}"),
        check(_is_int(config.n_gpu_layers) and -1 <= config.n_gpu_layers <= INT32_MAX, f"n_gpu_layers must be an int in [-1, {INT32_MAX}], got {config.n_gpu_layers!r}"),
        check(_is_int(config.main_gpu) and 0 <= config.main_gpu <= INT32_MAX, f"main_gpu must be an int in [0, {INT32_MAX}], got {config.main_gpu!r}"),
        check(config.split_mode in (0, 1, 2) and _is_int(config.split_mode), f"split_mode must be 0, 1 or 2, got {config.split_mode!r}"),
        check(config.tensor_split is None or (isinstance(config.tensor_split, (list, tuple))
              and all(_is_number(v) and v >= 0 for v in config.tensor_split)),
              f"tensor_split must be None or a list of numbers >= 0, got {config.tensor_split!r}"),
        check(config.n_ctx is None or (_is_int(config.n_ctx) and 8 <= config.n_ctx <= 1 << 24),
              f"n_ctx must be None or an int in [8, 16777216], got {config.n_ctx!r}"),
        check(_is_int(config.n_batch) and 1 <= config.n_batch <= 1 << 20, f"n_batch must be an int in [1, 1048576], got {config.n_batch!r}"),
        check(_is_int(config.n_ubatch) and 1 <= config.n_ubatch <= 1 << 20, f"n_ubatch must be an int in [1, 1048576], got {config.n_ubatch!r}"),
        check(config.seed is None or (_is_int(config.seed) and -1 <= config.seed <= 0xFFFFFFFF),
              f"seed must be None, -1 or an int in [0, 2**32), got {config.seed!r}"),
        check(isinstance(config.stop_sequences, (list, tuple)) and all(isinstance(s, str) and s for s in config.stop_sequences),
              f"stop_sequences must be a list of non-empty strings, got {config.stop_sequences!r}"),
        check(isinstance(config.add_bos, bool), f"add_bos must be a bool, got {config.add_bos!r}"),
        check(isinstance(config.parse_special, bool), f"parse_special must be a bool, got {config.parse_special!r}"),
        check(config.n_threads is None or (_is_int(config.n_threads) and 1 <= config.n_threads <= 512),
              f"n_threads must be None or an int in [1, 512], got {config.n_threads!r}"),
        check(isinstance(config.use_mmap, bool), f"use_mmap must be a bool, got {config.use_mmap!r}"),
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
