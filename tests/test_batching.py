"""BatchGenerator and the multi-sequence engine on the real model.

What is proven: the prompts decode together (one ``llama_decode`` a step, one row per
generating prompt), each prompt's output is what it gives alone (greedy, and sampled with a
fixed seed), sequences join and leave between steps, ``cancel()`` stops a batch in its prompts
and in its tokens, and bad input is refused before anything runs.
"""

from __future__ import annotations

import threading
import time

import pytest

from cyllama_cffi import GenerationConfig, LLM
from cyllama_cffi._engine import Engine, EngineSequence
from cyllama_cffi.batching import BatchGenerator, BatchRequest, BatchResponse, batch_generate
from cyllama_cffi.errors import ClosedError, LLMBusyError
from cyllama_cffi.sampling import build_sampler

PROMPTS = ["Once upon a time,", "The capital of France is", "def fibonacci(n):", "List three colors:",
           "Water boils at", "My favourite food is", "In 1492, Columbus", "The quick brown fox jumps over the lazy dog, and then"]
GREEDY = GenerationConfig(temperature=0.0, max_tokens=24)


@pytest.fixture(scope="module")
def generator(model_path):
    with BatchGenerator(model_path, n_seq_max=8) as batch:
        yield batch


@pytest.fixture(scope="module")
def solo(model_path):
    """Each prompt generated alone by a plain LLM."""
    with LLM(model_path) as llm:
        def run(prompt, config=GREEDY):
            return llm(prompt, config=config)
        yield run


def count_steps(generator, monkeypatch):
    """Record the rows of every decode the generator's engine makes."""
    ctx = generator._engine.ctx
    original = ctx.decode_rows
    steps = []

    def counting(batch, n_rows, *args):
        steps.append(n_rows)
        return original(batch, n_rows, *args)

    monkeypatch.setattr(ctx, "decode_rows", counting)
    return steps


def test_each_prompt_gives_what_it_gives_alone(generator, solo):
    responses = generator.generate_batch(PROMPTS, GREEDY)
    assert [r.text for r in responses] == [solo(p).text for p in PROMPTS]
    assert all(r.finish_reason in ("stop", "length") for r in responses)
    assert all(r.stats.prompt_tokens > 0 and r.stats.generated_tokens > 0 for r in responses)


def test_sampled_output_with_a_fixed_seed_matches_alone(generator, solo):
    config = GenerationConfig(temperature=0.8, seed=1234, max_tokens=24)
    responses = generator.generate_batch(PROMPTS[:4], config)
    assert [r.text for r in responses] == [solo(p, config).text for p in PROMPTS[:4]]


def test_one_decode_per_step_for_all_prompts(generator, monkeypatch):
    steps = count_steps(generator, monkeypatch)
    config = GenerationConfig(temperature=0.0, max_tokens=16, stop_sequences=[])
    responses = generator.generate_batch(PROMPTS, config)
    longest = max(r.stats.generated_tokens for r in responses)
    # One step reads every prompt; then one step per token, each holding every prompt still running.
    assert steps[0] == sum(r.stats.prompt_tokens for r in responses)
    assert len(steps) == longest  # the last token of each is emitted without a decode
    running = sum(1 for r in responses if r.stats.generated_tokens > 1)
    assert steps[1] == running


def test_prompts_longer_than_a_step_are_read_over_several_steps(model_path, solo, monkeypatch):
    prompt = "Tell me a story. " * 60  # ~300 tokens, a step takes 128
    with BatchGenerator(model_path, batch_size=128, n_ctx=2048, n_seq_max=2) as generator:
        steps = count_steps(generator, monkeypatch)
        response = generator.generate_batch([prompt], GREEDY)[0]
    # Even chunks of at most a step, as LLM reads a prompt with micro-batches of that size.
    n = response.stats.prompt_tokens
    assert len(steps) > 3 and sum(steps[:3]) == n and max(steps[:3]) <= 128 and max(steps[:3]) - min(steps[:3]) <= 1
    # Alone with the same micro-batch size: llama.cpp's sums depend on how a prompt is split.
    assert response.text == solo(prompt, GREEDY.replace(n_batch=128, n_ubatch=128)).text


def test_sequences_join_and_leave_between_steps(model, solo):
    vocab = model.vocab
    engine = Engine(model, n_ctx=1024, n_seq_max=2)
    try:
        def sequence(prompt, max_tokens):
            return EngineSequence(vocab.tokenize(prompt, add_special=True, parse_special=True),
                                  build_sampler(GREEDY, vocab, engine.seq_capacity), max_tokens)

        first = engine.add(sequence(PROMPTS[0], 24))
        for _ in range(5):
            engine.step()
        second = engine.add(sequence(PROMPTS[1], 24))  # joins while the first is generating
        engine.step()
        assert not engine.has_room
        while not first.finished:
            engine.step()
        third = engine.add(sequence(PROMPTS[2], 24))  # takes the sequence the first one left
        assert third.seq_id == first.seq_id
        engine.run()
        assert [s.text for s in (first, second, third)] == [solo(p).text for p in PROMPTS[:3]]
    finally:
        engine.close()


def test_cancel_stops_a_batch_during_its_prompts(model_path, solo):
    long_prompt = "The history of the world, told in great detail. " * 300  # ~3,000 tokens each
    with BatchGenerator(model_path, batch_size=2048, n_ctx=8192, n_seq_max=2) as generator:
        entered = threading.Event()
        original = generator._engine.ctx.decode_rows

        def announce(*args):
            entered.set()
            return original(*args)

        generator._engine.ctx.decode_rows = announce
        result = {}

        def run():
            result["responses"] = generator.generate_batch([long_prompt, long_prompt], GREEDY)
            result["done"] = time.perf_counter()

        worker = threading.Thread(target=run)
        worker.start()
        assert entered.wait(30)
        cancelled_at = time.perf_counter()
        generator.cancel()
        worker.join(30)
        # The prompts take many seconds on a CPU; a cancel inside the decode returns in milliseconds.
        assert result["done"] - cancelled_at < 1.0
        assert [r.finish_reason for r in result["responses"]] == ["cancelled", "cancelled"]
        assert all(r.text == "" for r in result["responses"])
        del generator._engine.ctx.decode_rows
        # The generator is usable at once, with a fresh generator's output.
        assert generator.generate_batch([PROMPTS[0]], GREEDY)[0].text == solo(PROMPTS[0]).text


def test_cancel_stops_a_batch_during_its_tokens(generator, solo, monkeypatch):
    engine = generator._engine
    original = engine.step
    steps = []

    def step_then_cancel():
        original()
        steps.append(1)
        if len(steps) == 4:
            generator.cancel()

    monkeypatch.setattr(engine, "step", step_then_cancel)
    config = GenerationConfig(temperature=0.0, max_tokens=200)
    responses = generator.generate_batch(PROMPTS[:3], config)
    assert [r.finish_reason for r in responses] == ["cancelled"] * 3
    assert all(0 < r.stats.generated_tokens <= 4 for r in responses)
    monkeypatch.undo()
    assert generator.generate_batch([PROMPTS[1]], GREEDY)[0].text == solo(PROMPTS[1]).text


def test_stop_sequences_and_limits_per_prompt(generator):
    config = GenerationConfig(temperature=0.0, max_tokens=40, stop_sequences=["."])
    responses = generator.generate_batch(PROMPTS[:4], config)
    for response in responses:
        assert "." not in response.text
    assert generator.generate_batch(PROMPTS[:2], GenerationConfig(max_tokens=0))[0].text == ""


def test_detailed_requests_keep_their_own_limits(generator, solo):
    requests = [BatchRequest(id=7, prompt=PROMPTS[0], max_tokens=5, temperature=0.0),
                BatchRequest(id=9, prompt=PROMPTS[1], max_tokens=12, temperature=0.0)]
    results = generator.generate_batch_detailed(requests)
    assert [type(r) for r in results] == [BatchResponse, BatchResponse]
    assert [r.id for r in results] == [7, 9]
    assert [r.tokens_generated for r in results] == [5, 12]
    assert results[1].response == solo(PROMPTS[1], GenerationConfig(temperature=0.0, max_tokens=12)).text
    assert all(r.time_taken > 0 for r in results)


def test_a_sequence_ends_at_its_share_of_the_context(model_path):
    with BatchGenerator(model_path, n_ctx=512, n_seq_max=2) as generator:  # 256 cells each
        prompt = "one two three " * 80
        response = generator.generate_batch([prompt], GenerationConfig(temperature=0.0, max_tokens=500))[0]
        capacity = generator._engine.seq_capacity
    assert capacity == 256
    assert response.finish_reason == "length"
    # Every cell holds a token; the last token generated is given out without being decoded.
    assert response.stats.prompt_tokens + response.stats.generated_tokens == capacity + 1


def test_bad_input_is_refused_before_anything_runs(generator):
    with pytest.raises(ValueError, match="Too many prompts"):
        generator.generate_batch(["a"] * 9)
    with pytest.raises(TypeError, match="must be a list"):
        generator.generate_batch("a prompt")
    with pytest.raises(TypeError, match="index 1"):
        generator.generate_batch(["a", 2])
    with pytest.raises(ValueError, match="a sequence holds 256"):
        generator.generate_batch(["word " * 400])
    with pytest.raises(ValueError, match="cannot be empty"):
        generator.generate_batch_detailed([])
    assert generator.generate_batch([]) == []
    for bad in (dict(batch_size=0), dict(n_seq_max=0), dict(n_ctx=True)):
        with pytest.raises(ValueError):
            BatchGenerator("unused.gguf", **bad)
    # Nothing was left running: the generator still works.
    assert generator.generate_batch(["Hello"], GenerationConfig(max_tokens=2))[0].stats.generated_tokens <= 2


def test_another_thread_gets_a_clear_error(generator, monkeypatch):
    engine = generator._engine
    original = engine.step
    errors = []

    def step_and_intrude():
        if not errors:
            thread = threading.Thread(target=lambda: errors.append(_try(generator)))
            thread.start()
            thread.join()
        original()

    monkeypatch.setattr(engine, "step", step_and_intrude)
    generator.generate_batch(PROMPTS[:2], GenerationConfig(temperature=0.0, max_tokens=4))
    assert isinstance(errors[0], LLMBusyError) and isinstance(errors[0], RuntimeError)
    assert "another thread" in str(errors[0]) and "not thread-safe" in str(errors[0])


def _try(generator):
    try:
        generator.generate_batch(["x"])
    except Exception as error:  # noqa: BLE001 - returned for the assertion
        return error
    return None


def test_closed_generator_refuses_work(model_path):
    generator = BatchGenerator(model_path, n_seq_max=2)
    generator.close()
    generator.close()
    assert generator.is_closed
    with pytest.raises(ClosedError, match="has been closed"):
        generator.generate_batch(["Hello"])


def test_batch_generate_loads_generates_and_frees(model_path, solo):
    responses = batch_generate(PROMPTS[:2], model_path, n_seq_max=2, config=GREEDY)
    assert [r.text for r in responses] == [solo(p).text for p in PROMPTS[:2]]
    assert batch_generate(PROMPTS[:1], model_path, temperature=0.0, max_tokens=24)[0].text == solo(PROMPTS[0]).text
