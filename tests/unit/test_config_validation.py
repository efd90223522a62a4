"""``GenerationConfig``: its defaults, and every value it refuses before llama.cpp sees it."""

from __future__ import annotations

import dataclasses

import pytest

import cyllama_cffi
from cyllama_cffi import defaults
from cyllama_cffi.config import INT32_MAX, GenerationConfig

DEFAULTS = {
    "max_tokens": 512, "temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05,
    "repeat_penalty": 1.0, "penalty_last_n": 64, "frequency_penalty": 0.0, "presence_penalty": 0.0,
    "dry_multiplier": 0.0, "dry_base": 1.75, "dry_allowed_length": 2, "dry_penalty_last_n": -1,
    "dry_sequence_breakers": ["\n", ":", "\"", "*"], "top_n_sigma": -1.0,
    "mirostat": 0, "mirostat_tau": 5.0, "mirostat_eta": 0.1, "n_gpu_layers": -1, "main_gpu": 0,
    "split_mode": 1, "tensor_split": None, "n_ctx": None, "n_batch": 2048, "seed": 0xFFFFFFFF,
    "stop_sequences": [], "add_bos": True, "parse_special": True, "n_ubatch": 512, "n_threads": None,
    "use_mmap": True, "grammar": None, "json_schema": None, "logprobs": None, "logit_bias": None,
    "flash_attn": None,
}


def test_defaults():
    config = GenerationConfig()
    assert config.to_dict() == DEFAULTS
    assert config.parse_special is True and config.use_mmap is True and config.add_bos is True
    assert [f.name for f in dataclasses.fields(GenerationConfig)] == list(DEFAULTS)


def test_defaults_come_from_the_defaults_module_under_cyllamas_names():
    config = GenerationConfig()
    assert (defaults.LLAMA_DEFAULT_SEED, defaults.DEFAULT_TEMPERATURE, defaults.DEFAULT_TOP_K, defaults.DEFAULT_TOP_P,
            defaults.DEFAULT_MIN_P, defaults.DEFAULT_REPEAT_PENALTY, defaults.DEFAULT_PENALTY_LAST_N,
            defaults.DEFAULT_PENALTY_FREQ, defaults.DEFAULT_PENALTY_PRESENT, defaults.DEFAULT_MAX_TOKENS,
            defaults.DEFAULT_N_GPU_LAYERS, defaults.DEFAULT_N_BATCH, defaults.DEFAULT_MAIN_GPU,
            defaults.DEFAULT_SPLIT_MODE) == \
        (config.seed, config.temperature, config.top_k, config.top_p, config.min_p, config.repeat_penalty,
         config.penalty_last_n, config.frequency_penalty, config.presence_penalty, config.max_tokens,
         config.n_gpu_layers, config.n_batch, config.main_gpu, config.split_mode)
    assert defaults.LLAMA_DEFAULT_SEED == 0xFFFFFFFF
    for name in defaults.__all__:  # the package root exports every one of them, the same object
        assert getattr(cyllama_cffi, name) == getattr(defaults, name) and name in cyllama_cffi.__all__


def test_each_config_gets_its_own_lists():
    first, second = GenerationConfig(), GenerationConfig()
    first.stop_sequences.append("\n")
    first.dry_sequence_breakers.append("###")
    assert second.stop_sequences == [] and GenerationConfig().stop_sequences == []
    assert second.dry_sequence_breakers == ["\n", ":", "\"", "*"]


# (field, bad value, the message naming it); each message is the whole error after the prefix, and
# starts with cyllama's own phrase for the rule.
INVALID = [
    ("max_tokens", -1, "max_tokens must be >= 0, got -1"),
    ("max_tokens", 1.5, "max_tokens must be >= 0 (an int), got 1.5"),
    ("max_tokens", True, "max_tokens must be >= 0 (an int), got True"),
    ("temperature", -0.5, "temperature must be >= 0.0, got -0.5"),
    ("temperature", float("nan"), "temperature must be >= 0.0 (a finite number), got nan"),
    ("temperature", float("inf"), "temperature must be >= 0.0 (a finite number), got inf"),
    ("temperature", "0.7", "temperature must be >= 0.0 (a finite number), got '0.7'"),
    ("top_k", -3, "top_k must be >= 0, got -3"),
    ("top_k", INT32_MAX + 1, f"top_k must be >= 0 and <= {INT32_MAX}, got {INT32_MAX + 1}"),
    ("top_p", 1.5, "top_p must be between 0.0 and 1.0, got 1.5"),
    ("top_p", -0.01, "top_p must be between 0.0 and 1.0, got -0.01"),
    ("min_p", -0.1, "min_p must be between 0.0 and 1.0, got -0.1"),
    ("min_p", 2, "min_p must be between 0.0 and 1.0, got 2"),
    ("repeat_penalty", -0.1, "repeat_penalty must be >= 0.0, got -0.1"),
    ("repeat_penalty", None, "repeat_penalty must be >= 0.0 (a finite number), got None"),
    ("penalty_last_n", -2, "penalty_last_n must be >= -1, got -2"),
    ("penalty_last_n", INT32_MAX + 1, f"penalty_last_n must be >= -1 and <= {INT32_MAX}, got {INT32_MAX + 1}"),
    ("frequency_penalty", float("inf"), "frequency_penalty must be >= 0.0 (a finite number), got inf"),
    ("frequency_penalty", -0.5, "frequency_penalty must be >= 0.0, got -0.5"),
    ("presence_penalty", float("-inf"), "presence_penalty must be >= 0.0 (a finite number), got -inf"),
    ("presence_penalty", False, "presence_penalty must be >= 0.0 (a finite number), got False"),
    ("dry_multiplier", -1.0, "dry_multiplier must be >= 0.0, got -1.0"),
    ("dry_multiplier", float("nan"), "dry_multiplier must be >= 0.0 (a finite number), got nan"),
    ("dry_base", -0.5, "dry_base must be >= 0.0, got -0.5"),
    ("dry_allowed_length", -1, "dry_allowed_length must be >= 0, got -1"),
    ("dry_allowed_length", 2.0, "dry_allowed_length must be >= 0 (an int), got 2.0"),
    ("dry_penalty_last_n", -2, "dry_penalty_last_n must be >= -1, got -2"),
    ("dry_sequence_breakers", "\n", "dry_sequence_breakers must be a list of str, got '\\n'"),
    ("dry_sequence_breakers", [b":"], "dry_sequence_breakers must be a list of str, got [b':']"),
    ("dry_sequence_breakers", ["a\0b"],
     "dry_sequence_breakers must be a list of str without NUL characters, got ['a\\x00b']"),
    ("top_n_sigma", float("nan"), "top_n_sigma must be a number (-1.0 = off) (a finite number), got nan"),
    ("top_n_sigma", "1", "top_n_sigma must be a number (-1.0 = off) (a finite number), got '1'"),
    ("mirostat", 3, "mirostat must be 0, 1, or 2, got 3"),
    ("mirostat", 1.0, "mirostat must be 0, 1, or 2, got 1.0"),
    ("mirostat", True, "mirostat must be 0, 1, or 2, got True"),
    ("mirostat_tau", 0, "mirostat_tau must be > 0.0, got 0"),
    ("mirostat_eta", -0.1, "mirostat_eta must be > 0.0, got -0.1"),
    ("n_gpu_layers", -2, "n_gpu_layers must be >= -1, got -2"),
    ("main_gpu", -1, "main_gpu must be >= 0, got -1"),
    ("split_mode", 3, "split_mode must be 0, 1, or 2, got 3"),
    ("tensor_split", [1.0, -1.0], "tensor_split values must be non-negative numbers, got [1.0, -1.0]"),
    ("tensor_split", "0.5,0.5", "tensor_split must be a list or None, got '0.5,0.5'"),
    ("tensor_split", [float("nan")], "tensor_split values must be non-negative numbers, got [nan]"),
    ("n_ctx", 0, "n_ctx must be >= 1, got 0"),
    ("n_ctx", (1 << 24) + 1, "n_ctx must be >= 1 and <= 16777216, got 16777217"),
    ("n_batch", 0, "n_batch must be >= 1, got 0"),
    ("n_batch", (1 << 20) + 1, "n_batch must be >= 1 and <= 1048576, got 1048577"),
    ("seed", -2, "seed must be >= -1, got -2"),
    ("seed", 2**32, "seed must be >= -1 and <= 4294967295, got 4294967296"),
    ("seed", 1.0, "seed must be >= -1 (an int), got 1.0"),
    ("stop_sequences", "###", "stop_sequences must be a list of str, got '###'"),
    ("stop_sequences", [b"###"], "stop_sequences must be a list of str, got [b'###']"),
    ("add_bos", 1, "add_bos must be a bool, got 1"),
    ("parse_special", "yes", "parse_special must be a bool, got 'yes'"),
    ("n_ubatch", 0, "n_ubatch must be >= 1, got 0"),
    ("n_threads", 0, "n_threads must be >= 1, got 0"),
    ("n_threads", 513, "n_threads must be >= 1 and <= 512, got 513"),
    ("use_mmap", None, "use_mmap must be a bool, got None"),
    ("use_mmap", "no", "use_mmap must be a bool, got 'no'"),
    ("flash_attn", "off", "flash_attn must be True, False or None, got 'off'"),
    ("flash_attn", 0, "flash_attn must be True, False or None, got 0"),
    ("grammar", "root ::= x", "grammar: invalid GBNF grammar: rule 'x' is used but never defined"),
    ("grammar", "root ::= (", "grammar: invalid GBNF grammar: expected ')' (unbalanced parentheses) at line 1, "
                              "column 11 (end of text)"),
    ("json_schema", {"type": "array", "uniqueItems": True},
     "json_schema: JSON schema keyword 'uniqueItems' at # is unsupported by the grammar converter"),
    ("logprobs", 21, "logprobs must be between 0 and 20 (None or 0 = off), got 21"),
    ("logprobs", -1, "logprobs must be between 0 and 20 (None or 0 = off), got -1"),
    ("logprobs", True, "logprobs must be between 0 and 20 (None or 0 = off) (an int), got True"),
    ("logprobs", 2.0, "logprobs must be between 0 and 20 (None or 0 = off) (an int), got 2.0"),
    ("logit_bias", [(1, 5.0)], "logit_bias must be a dict of token id -> bias, or None, got [(1, 5.0)]"),
    ("logit_bias", {"15": 5.0}, "logit_bias keys must be token ids (int >= 0), got '15'"),
    ("logit_bias", {-1: 5.0}, "logit_bias keys must be token ids (int >= 0), got -1"),
    ("logit_bias", {True: 5.0}, "logit_bias keys must be token ids (int >= 0), got True"),
    ("logit_bias", {2**31: 5.0}, "logit_bias keys must be token ids (int >= 0), got 2147483648"),
    ("logit_bias", {3: float("inf")},
     "logit_bias values must be finite numbers within float32's range (or -inf to ban the token), got inf for token 3"),
    ("logit_bias", {3: float("nan")},
     "logit_bias values must be finite numbers within float32's range (or -inf to ban the token), got nan for token 3"),
    ("logit_bias", {3: 1e39},
     "logit_bias values must be finite numbers within float32's range (or -inf to ban the token), "
     "got 1e+39 for token 3"),
    ("logit_bias", {3: "5"},
     "logit_bias values must be finite numbers within float32's range (or -inf to ban the token), got '5' for token 3"),
]


@pytest.mark.parametrize("field, value, message", INVALID)
def test_each_invalid_value_is_refused_with_its_own_message(field, value, message):
    with pytest.raises(ValueError) as raised:
        GenerationConfig(**{field: value})
    assert str(raised.value) == f"Invalid GenerationConfig: {message}"


def test_every_field_has_a_check():
    """A new field must come with a validation rule (and a line in INVALID above)."""
    assert {field for field, _, _ in INVALID} == set(DEFAULTS)


def test_all_problems_are_reported_at_once_in_field_order():
    with pytest.raises(ValueError) as raised:
        GenerationConfig(n_threads=0, max_tokens=-1, top_p=2)
    assert str(raised.value) == ("Invalid GenerationConfig: max_tokens must be >= 0, got -1; "
                                 "top_p must be between 0.0 and 1.0, got 2; "
                                 "n_threads must be >= 1, got 0")


VALID_EDGES = [
    ("max_tokens", 0), ("max_tokens", 10**6), ("temperature", 0), ("temperature", 0.0), ("top_k", 0),
    ("top_k", INT32_MAX), ("top_p", 0), ("top_p", 1), ("min_p", 0.0), ("min_p", 1.0), ("repeat_penalty", 0.0),
    ("repeat_penalty", 1e-6), ("penalty_last_n", -1), ("penalty_last_n", 0), ("frequency_penalty", 0.0),
    ("frequency_penalty", 2.0), ("presence_penalty", 2), ("dry_multiplier", 0.0), ("dry_multiplier", 0.8),
    ("dry_base", 0.0), ("dry_allowed_length", 0), ("dry_penalty_last_n", -1), ("dry_penalty_last_n", 0),
    ("dry_sequence_breakers", []), ("dry_sequence_breakers", ("\n", "")), ("top_n_sigma", -1.0),
    ("top_n_sigma", 0), ("top_n_sigma", 1.5), ("mirostat", 1), ("mirostat", 2), ("n_gpu_layers", -1),
    ("n_gpu_layers", 0), ("split_mode", 0), ("split_mode", 2), ("tensor_split", []), ("tensor_split", (0.25, 0.75)),
    ("tensor_split", [0, 1]), ("n_ctx", 1), ("n_ctx", 7), ("n_ctx", 1 << 24), ("n_batch", 1), ("n_batch", 1 << 20),
    ("n_ubatch", 1 << 20), ("seed", None), ("seed", -1), ("seed", 0), ("seed", 2**32 - 1),
    ("stop_sequences", ("a", "\n\n")), ("stop_sequences", [""]), ("add_bos", False), ("parse_special", False),
    ("n_threads", 1), ("n_threads", 512), ("use_mmap", False), ("flash_attn", False), ("flash_attn", True),
    ("grammar", 'root ::= "a"'), ("json_schema", {}), ("json_schema", {"type": "integer"}),
    ("logprobs", None), ("logprobs", 0), ("logprobs", 1), ("logprobs", 20), ("logit_bias", None), ("logit_bias", {}),
    ("logit_bias", {0: 100.0, 7: -float("inf"), 2**31 - 1: -3.4e38}),
]


@pytest.mark.parametrize("field, value", VALID_EDGES)
def test_edge_values_are_accepted(field, value):
    assert getattr(GenerationConfig(**{field: value}), field) == value


def test_replace_returns_a_validated_copy():
    base = GenerationConfig(max_tokens=7, stop_sequences=["x"])
    changed = base.replace(temperature=0.0, stop_sequences=["y"])
    assert changed is not base and changed.temperature == 0.0 and changed.max_tokens == 7
    assert changed.stop_sequences == ["y"]
    assert base.temperature == 0.8 and base.stop_sequences == ["x"]
    with pytest.raises(ValueError, match=r"^Invalid GenerationConfig: top_k must be >= 0, got -1$"):
        base.replace(top_k=-1)
    assert base.replace() == base and base.replace() is not base


def test_replace_names_unknown_fields_in_a_type_error():
    config = GenerationConfig()
    with pytest.raises(TypeError) as raised:
        config.replace(temprature=0.5, max_token=3, top_k=1)
    assert str(raised.value) == "unknown GenerationConfig field(s): max_token, temprature"
    with pytest.raises(TypeError, match="unknown GenerationConfig field"):
        config.replace(to_dict=None)  # a method's name is no field either


def test_to_dict_is_a_deep_copy_that_rebuilds_the_config():
    config = GenerationConfig(stop_sequences=["END"], tensor_split=[0.5, 0.5], seed=3, dry_sequence_breakers=["\n"])
    data = config.to_dict()
    assert GenerationConfig(**data) == config
    data["stop_sequences"].append("MORE")
    data["tensor_split"][0] = 9.0
    data["dry_sequence_breakers"].append(":")
    assert config.stop_sequences == ["END"] and config.tensor_split == [0.5, 0.5]
    assert config.dry_sequence_breakers == ["\n"]


def test_unknown_keyword_at_construction_is_a_type_error():
    with pytest.raises(TypeError):
        GenerationConfig(no_such_field=1)  # type: ignore[call-arg]


def test_grammar_and_json_schema_exclude_each_other():
    with pytest.raises(ValueError, match="grammar or json_schema, not both"):
        GenerationConfig(grammar='root ::= "a"', json_schema={"type": "string"})


@pytest.mark.parametrize("field, value", [("grammar", 5), ("grammar", b'root ::= "a"'), ("json_schema", "{}"),
                                          ("json_schema", [1])])
def test_grammar_and_json_schema_of_the_wrong_type_are_type_errors(field, value):
    with pytest.raises(TypeError, match=f"{field} must be"):
        GenerationConfig(**{field: value})


def test_json_schema_may_be_a_pydantic_model_class():
    pydantic = pytest.importorskip("pydantic", reason="pydantic is an optional dependency")

    class Point(pydantic.BaseModel):
        x: int
        y: int

    from cyllama_cffi.config import structured_grammar

    grammar = structured_grammar(GenerationConfig(json_schema=Point))
    assert '"\\"x\\""' in grammar.gbnf and '"\\"y\\""' in grammar.gbnf


def test_logit_bias_is_kept_as_a_copy_of_ints_to_floats():
    """The config holds its own dict: changing the caller's afterwards changes nothing, and an int
    bias is the same float the sampler will get."""
    given = {5: 2, 9: -float("inf")}
    config = GenerationConfig(logit_bias=given)
    given[5] = 100
    assert config.logit_bias == {5: 2.0, 9: -float("inf")} and isinstance(config.logit_bias[5], float)
    assert GenerationConfig(**config.to_dict()) == config
