"""Structured output on the real default model: what the grammar lets it write is valid.

Every document is parsed with ``json.loads`` and validated with the ``jsonschema`` package,
for real-world schemas (function-calling style) and for generated ones, greedy and sampled
with several seeds. A document cut short by ``max_tokens`` must say so (finish_reason
"length") instead of passing for a finished one. Bad grammars, dead ends and llama.cpp's
own parser are exercised in a child process (``crashproof``), where an abort is a failure
and not the end of the test run.
"""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cyllama_cffi import LLM, GenerationConfig, Grammar
from crashproof import Case, Worker
from unit.schema_strategies import schemas

WEATHER = {  # an OpenAI-style tool's parameters
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "City and country", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["location", "unit"],
    "additionalProperties": False,
}
PERSON = {
    "$defs": {
        "Address": {"type": "object", "properties": {
            "street": {"type": "string", "maxLength": 30},
            "city": {"type": "string", "maxLength": 20},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"]},
    },
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "address": {"$ref": "#/$defs/Address"}},
    "required": ["name", "age", "address"],
}
TODOS = {
    "type": "object",
    "properties": {"items": {"type": "array", "minItems": 2, "maxItems": 3, "items": {
        "type": "object", "properties": {"task": {"type": "string", "maxLength": 16}, "done": {"type": "boolean"}},
        "required": ["task", "done"]}}},
    "required": ["items"],
}
SHAPE = {"anyOf": [
    {"type": "object", "properties": {"kind": {"const": "circle"}, "radius": {"type": "integer", "minimum": 1,
                                                                             "maximum": 99}},
     "required": ["kind", "radius"]},
    {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1,
                                                                           "maximum": 99}},
     "required": ["kind", "side"]},
]}
CODE = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                                         "when": {"type": "string", "format": "date"},
                                         "id": {"type": "string", "format": "uuid"}},
        "required": ["code", "when", "id"]}
REAL_WORLD = {"weather tool": WEATHER, "nested address with $defs": PERSON, "array of objects": TODOS,
              "anyOf of two shapes": SHAPE, "pattern, date and uuid": CODE}
# greedy, and sampled at 0.8 with several seeds
MODES = [(0.0, None), (0.8, 1), (0.8, 2)]


@pytest.fixture(scope="module")
def llm(model_path):
    with LLM(model_path, max_tokens=96, n_threads=1) as loaded:
        yield loaded


def prompt_for(llm, schema) -> str:
    """A short chat prompt (the grammar, not the prompt, makes the shape; a long prompt costs prefill)."""
    return llm.format_chat([{"role": "user", "content": "Reply in JSON."}])


def check_document(response, schema) -> None:
    """Valid JSON under ``schema``; or, only when cut off by max_tokens, reported as such."""
    try:
        document = json.loads(response.text)
    except json.JSONDecodeError:
        assert response.finish_reason == "length", f"{response.finish_reason}: {response.text!r}"
        return
    assert response.finish_reason == "stop", (response.finish_reason, response.text)
    jsonschema.validate(document, schema)


@pytest.mark.parametrize("name", sorted(REAL_WORLD))
@pytest.mark.parametrize("temperature, seed", MODES)
def test_real_world_schemas_give_valid_documents(llm, name, temperature, seed):
    schema = REAL_WORLD[name]
    config = llm.config.replace(json_schema=schema, temperature=temperature, seed=seed, max_tokens=120)
    response = llm(prompt_for(llm, schema), config)
    check_document(response, schema)
    assert response.finish_reason == "stop", f"120 tokens should finish {name}: {response.text!r}"


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(schema=schemas(), mode=st.sampled_from(MODES))
def test_generated_schemas_give_valid_documents_or_say_length(llm, schema, mode):
    temperature, seed = mode
    config = llm.config.replace(json_schema=schema, temperature=temperature, seed=seed, max_tokens=64)
    check_document(llm(prompt_for(llm, schema), config), schema)


def test_a_document_cut_short_finishes_with_length(llm):
    config = llm.config.replace(json_schema=PERSON, temperature=0.0, max_tokens=5)
    response = llm(prompt_for(llm, PERSON), config)
    assert response.finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.text)


def test_gbnf_text_and_grammar_objects_constrain_the_same_way(llm):
    text = 'root ::= ("yes" | "no") "."'
    by_text = llm("Is the sky blue?", llm.config.replace(grammar=text, temperature=0.0))
    by_object = llm("Is the sky blue?", llm.config.replace(grammar=Grammar.from_string(text), temperature=0.0))
    assert by_text.text == by_object.text and by_text.text in ("yes.", "no.")
    assert by_text.finish_reason == "stop"


def test_pydantic_models_as_json_schema(llm):
    pydantic = pytest.importorskip("pydantic", reason="pydantic is an optional dependency")

    class City(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=20)
        population: int = pydantic.Field(ge=0, le=50_000_000)
        capital: bool

    config = llm.config.replace(json_schema=City, temperature=0.8, seed=7, max_tokens=80)
    response = llm(prompt_for(llm, City.model_json_schema()), config)
    assert response.finish_reason == "stop", response.text
    city = City.model_validate_json(response.text)
    assert 0 <= city.population <= 50_000_000


def test_streaming_gives_the_same_document_as_a_call(llm):
    config = llm.config.replace(json_schema=WEATHER, temperature=0.0)
    prompt = prompt_for(llm, WEATHER)
    whole = llm(prompt, config)
    with llm.stream(prompt, config) as stream:
        chunks = list(stream)
    assert "".join(chunks) == whole.text and len(chunks) > 1
    assert stream.finish_reason == "stop"
    jsonschema.validate(json.loads(whole.text), WEATHER)


def test_cancel_stops_a_constrained_generation(llm):
    # A grammar that never lets the model stop, so only the cancel can end it.
    config = llm.config.replace(grammar='root ::= "[" ( [0-9] "," )* ', temperature=0.8, seed=3, max_tokens=500)
    seen = []
    canceller = threading.Thread(target=llm.cancel)

    def on_token(chunk):
        seen.append(chunk)
        if len(seen) == 3:
            canceller.start()

    response = llm("Count:", config, on_token=on_token)
    canceller.join()  # its cancel() is over before the next generation starts
    assert response.finish_reason == "cancelled"
    assert 3 <= response.stats.generated_tokens < 500
    assert re.fullmatch(r"\[([0-9],)*[0-9]?", response.text), response.text  # what the grammar allows so far
    # The next constrained generation starts from a fresh grammar.
    again = llm("Is it?", llm.config.replace(grammar='root ::= "yes" | "no"', temperature=0.0))
    assert again.text in ("yes", "no")


def test_the_grammar_is_checked_when_the_config_is_made():
    with pytest.raises(ValueError, match="Invalid GenerationConfig: json_schema: .*'not'"):
        GenerationConfig(json_schema={"not": {"type": "string"}})
    with pytest.raises(ValueError, match="Invalid GenerationConfig: grammar: .*left-recursive"):
        GenerationConfig(grammar='root ::= root "a"')


# -- in a child process: what would abort llama.cpp ---------------------------------------------

@pytest.fixture(scope="module")
def worker():
    with Worker(timeout=180) as child:
        yield child


def run_case(worker, name: str, argument: str):
    outcome = worker.run_one(Case(name, "grammar", f"{name}::{argument}"))
    assert outcome.status == "ok", outcome
    return outcome


def test_bad_grammars_raise_value_errors_and_never_crash(worker, model_path):
    run_case(worker, "bad_grammars_raise", str(model_path))


def test_dead_ends_raise_grammar_dead_end_and_never_crash(worker, model_path):
    run_case(worker, "dead_ends_raise_grammar_dead_end", str(model_path))


GBNF_PIECES = st.sampled_from(['root ::= ', 'a ::= ', 'b ::= ', '"x"', '"y"', '[a-c]', '[^z]', "a", "b", "root",
                               "(", ")", "|", "*", "+", "?", "{2}", "{1,3}", "{0,}", " ", "\n", ".", '"', "[",
                               "<[3]>", "!<[4]>", "#c\n", "\\x41", '"\\"'])


def test_llama_cpp_accepts_exactly_what_the_checker_accepts(worker):
    """Differential: generated GBNF texts, our verdict against llama.cpp's own parser."""
    texts = st.lists(GBNF_PIECES, min_size=1, max_size=14).map("".join)
    samples = []

    @settings(max_examples=400, deadline=None, database=None)
    @given(texts)
    def collect(text):
        samples.append(text)

    collect()
    samples += ['root ::= a\na ::= "x" | b\nb ::= "y"', 'root ::= ("a" | "b"){2,4} "c"?', 'root ::= [^"\\\\]*']
    run_case(worker, "llama_cpp_agrees_with_the_checker", json.dumps(samples))


def test_without_the_checks_llama_cpp_would_end_the_process(worker, model_path):
    """Why the checks exist: the same inputs, let through, kill the (child) process."""
    nesting = worker.run_one(Case("unchecked nesting", "grammar", "unchecked_parse::nesting 100000 deep"))
    assert nesting.status == "crash" and nesting.returncode < 0, nesting
    dead_end = worker.run_one(Case("unguarded dead end", "grammar", f"unguarded_dead_end::{model_path}"))
    assert dead_end.status == "crash" and dead_end.returncode < 0, dead_end
    # greedy picks an end-of-generation token the grammar rejects: GGML_ABORT in llama-grammar.cpp
    # (a rejected ordinary token throws "Unexpected empty grammar stack" instead: std::terminate)
    assert "llama-grammar.cpp" in dead_end.stderr or "grammar stack" in dead_end.stderr, dead_end.stderr


def test_an_exception_inside_the_grammar_stage_is_raised_not_lost(llm, monkeypatch):
    """A KeyboardInterrupt delivered inside the guard's C callback reaches the caller of sample().

    cffi can only print an exception raised in a callback; the guard keeps it and sample()
    raises it once llama.cpp has returned, and the grammar, which may have missed the token,
    refuses to go on until reset().
    """
    from cyllama_cffi.errors import GrammarDeadEnd
    from cyllama_cffi.lowlevel import LlamaSampler
    from cyllama_cffi.lowlevel import sampler as sampler_module

    llm("Yes or no?", llm.config.replace(max_tokens=1, temperature=0.0))  # logits to sample from
    ctx = llm._seq.ctx
    sampler = LlamaSampler().add_grammar(llm.vocab, 'root ::= "yes" | "no"').add_greedy()

    def interrupted(self, token):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(sampler_module._GrammarGuard, "allows", interrupted)
        with pytest.raises(KeyboardInterrupt):
            sampler.sample(ctx)
    with pytest.raises(GrammarDeadEnd):
        sampler.sample(ctx)
    sampler.reset()
    token = sampler.sample(ctx)
    assert llm.detokenize([token]) in ("yes", "no", "y", "n", "ye")
    sampler.close()
