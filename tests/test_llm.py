"""The high-level LLM API: construction, config validation, responses, stats, limits."""

from __future__ import annotations

import json
import threading

import pytest

from cyllama_cffi import LLM, GenerationConfig, GenerationStats, Response
from cyllama_cffi.errors import ClosedError, ContextBusyError

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm(model_path):
    with LLM(model_path, temperature=0.0, max_tokens=24) as instance:
        yield instance


def test_bad_paths_fail_before_llama_cpp(tmp_path):
    with pytest.raises(FileNotFoundError):
        LLM(tmp_path / "missing.gguf")
    with pytest.raises(IsADirectoryError):
        LLM(tmp_path)
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("this is not a model" * 10)
    with pytest.raises(ValueError, match="not a GGUF"):
        LLM(not_gguf)


def test_unknown_override_is_a_type_error(model_path):
    with pytest.raises(TypeError, match="no_such_field"):
        LLM(model_path, no_such_field=1)


def test_overrides_apply_to_a_copy(model_path):
    base = GenerationConfig(max_tokens=7)
    with LLM(model_path, config=base, temperature=0.0) as llm:
        assert llm.config.temperature == 0.0 and llm.config.max_tokens == 7
    assert base.temperature == 0.8


@pytest.mark.parametrize("field,value", [
    ("max_tokens", -1), ("temperature", -0.5), ("top_k", -3), ("top_p", 1.5), ("min_p", -0.1),
    ("repeat_penalty", -0.1), ("mirostat", 3), ("n_ctx", 0), ("n_batch", 0), ("seed", 2**40),
    ("stop_sequences", "x"), ("n_threads", 0), ("temperature", float("nan")), ("max_tokens", 1.5),
    ("dry_multiplier", -1.0), ("dry_sequence_breakers", [None]),
])
def test_invalid_config_values(field, value):
    with pytest.raises(ValueError, match="Invalid GenerationConfig"):
        GenerationConfig(**{field: value})


def test_context_is_created_lazily_and_reused(model_path):
    with LLM(model_path, temperature=0.0, max_tokens=4) as llm:
        assert llm._seq is None
        llm(PROMPT)
        first = llm._seq.ctx
        llm(PROMPT)
        assert llm._seq.ctx is first


def test_replacing_the_context_frees_its_batch_at_once(model_path):
    """The token batch belongs to the context: a new n_batch makes a new context with a new batch,
    and the old ones are freed now (not whenever a garbage collector gets to them)."""
    with LLM(model_path, temperature=0.0, max_tokens=2, n_batch=64) as llm:
        llm("the cat")
        small, old_ctx = llm._seq.batch, llm._seq.ctx
        llm("the cat", config=llm.config.replace(n_batch=128))
        assert small.closed and old_ctx.closed
        assert llm._seq.batch.capacity >= 128 and not llm._seq.batch.closed


def test_response_behaves_like_its_text(llm):
    response = llm(PROMPT)
    assert isinstance(response, Response)
    text = response.text
    assert str(response) == text and response == text and len(response) == len(text)
    assert "Paris" in response
    assert response + "!" == text + "!" and ">" + response == ">" + text
    data = json.loads(response.to_json())
    assert data["text"] == text and data["finish_reason"] in ("stop", "length")
    assert data["stats"]["generated_tokens"] == response.stats.generated_tokens


def test_stats_are_measured_not_placeholders(llm):
    stream = llm.stream(PROMPT)
    text = "".join(stream)
    stats = stream.stats
    assert stats.prompt_tokens == len(llm.tokenize(PROMPT))
    assert stats.generated_tokens == len(stream.generated) > 0
    assert stats.prompt_time > 0 and stats.generation_time > 0
    assert stats.total_time >= stats.prompt_time + stats.generation_time - 1e-6
    assert stats.tokens_per_second == pytest.approx(stats.generated_tokens / stats.generation_time)
    assert llm.last_stats is stats and llm.last_finish_reason == stream.finish_reason
    assert llm.detokenize(stream.generated) == text


def test_finish_reason_length_and_stop(llm):
    response = llm(PROMPT, config=llm.config.replace(max_tokens=3))
    assert response.finish_reason == "length" and response.stats.generated_tokens == 3
    full = llm(PROMPT).text
    stop_at = full.strip().split()[1]
    stopped = llm(PROMPT, config=llm.config.replace(stop_sequences=[stop_at]))
    assert stopped.finish_reason == "stop"
    assert stop_at not in stopped.text and full.startswith(stopped.text)


def test_chat_text_is_special_tokens_by_default_and_ends_at_end_of_turn(llm):
    """parse_special=True by default: the template's markers become the model's special tokens,
    and the reply ends at its end-of-turn token; parse_special=False reads them as plain text."""
    prompt = llm.format_chat([{"role": "user", "content": "Say hi."}], template="chatml")
    im_start = llm.tokenize("<|im_start|>", add_special=False)
    assert len(im_start) == 1 and llm.vocab.get_text(im_start[0]) == "<|im_start|>"
    response = llm(prompt, config=llm.config.replace(max_tokens=200))
    assert response.finish_reason == "stop" and response.stats.generated_tokens < 200
    assert "<|im_end|>" not in response.text
    as_text = llm.config.replace(max_tokens=4, parse_special=False)
    assert len(llm.tokenize("<|im_start|>", add_special=False, parse_special=False)) > 1
    assert llm(prompt, config=as_text).stats.prompt_tokens > response.stats.prompt_tokens


def test_stream_equals_non_stream(llm):
    assert "".join(llm(PROMPT, stream=True)) == llm(PROMPT).text


def test_a_busy_context_mid_stream_ends_it_with_error_and_loses_nothing(llm):
    """A ContextBusyError while a stream decodes (another thread holds its context) reaches the
    caller and ends the stream with finish_reason "error"; the KV cache keeps only what is on
    record, and the next call's text is an undisturbed generation's."""
    config = llm.config.replace(max_tokens=24)
    expected = llm(PROMPT, config=config)
    stream = llm.stream(PROMPT, config=config)
    chunks = [next(stream) for _ in range(3)]
    busy = llm._seq.ctx._busy
    busy.acquire()  # what a decode of another thread on this context holds
    try:
        with pytest.raises(ContextBusyError):
            for _ in range(30):
                chunks.append(next(stream))
    finally:
        busy.release()
    assert stream.finish_reason == "error" and list(stream) == []
    assert expected.text.startswith("".join(chunks))
    assert llm(PROMPT, config=config).text == expected.text


def _interrupt_call(ctx, method: str, call_number: int) -> list:
    """Make the ``call_number``-th call of ``ctx.<method>`` raise KeyboardInterrupt after the real
    call returned: what Ctrl-C does with no SIGINT hook installed (Python runs its handler once
    the C call is back), before the stream has put that decode on record. Returns the call log;
    ``del ctx.<method>`` restores the method."""
    real = getattr(ctx, method)
    calls: list = []

    def interrupted(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(args)
        if len(calls) == call_number:
            raise KeyboardInterrupt
        return result

    setattr(ctx, method, interrupted)
    return calls


def test_the_first_chunk_arrives_before_its_token_is_decoded(llm):
    """A token's text goes out as soon as the token is sampled (the first comes from the
    prompt's logits), so the first chunk costs the prefill and no decode: the KV cache then
    holds the prompt alone."""
    stream = llm.stream(PROMPT)
    try:
        assert next(stream)
        assert llm._seq.ctx.memory_seq_pos_max(0) == stream.stats.prompt_tokens - 1
        assert next(stream)
        assert llm._seq.ctx.memory_seq_pos_max(0) == stream.stats.prompt_tokens
    finally:
        stream.close()


def test_an_interrupted_prefill_ends_the_stream_and_the_cache_matches_the_record(llm):
    """A KeyboardInterrupt after a prefill chunk's decode returned but before it was on record
    (Ctrl-C with no SIGINT hook) reaches the caller and ends the stream as cancelled; the next
    call cuts the unrecorded chunk from the KV cache and generates an undisturbed text."""
    prompt = "Write a short story about a lighthouse keeper and a storm at sea."
    config = llm.config.replace(max_tokens=12, n_ubatch=4)
    expected = llm(prompt, config=config)
    llm._seq.clear()  # or the stream would reuse the prompt's chunks from the cache (prefix reuse)
    stream = llm.stream(prompt, config=config)
    ctx = llm._seq.ctx
    calls = _interrupt_call(ctx, "decode", 2)
    try:
        with pytest.raises(KeyboardInterrupt):
            next(stream)
    finally:
        del ctx.decode
    assert stream.finish_reason == "cancelled" and list(stream) == []
    llm._seq.settle()
    assert len(llm._seq.tokens) == 4  # the first chunk; the second decoded but is not on record
    assert ctx.memory_seq_pos_max(0) + 1 == 4  # and the cache was cut back to the record
    assert llm(prompt, config=config).text == expected.text


def test_an_interrupt_after_a_token_decode_ends_the_stream_and_loses_nothing(llm):
    """A KeyboardInterrupt after a token's decode returned, before the stream recorded it: the
    stream ends as cancelled with the text emitted so far, the cache is cut back to the record,
    and the next call generates the undisturbed text."""
    config = llm.config.replace(max_tokens=24)
    expected = llm(PROMPT, config=config).text
    stream = llm.stream(PROMPT, config=config)
    ctx = llm._seq.ctx
    _interrupt_call(ctx, "decode_token", 5)
    chunks: list = []
    try:
        with pytest.raises(KeyboardInterrupt):
            for chunk in stream:
                chunks.append(chunk)
    finally:
        del ctx.decode_token
    assert stream.finish_reason == "cancelled" and expected.startswith("".join(chunks))
    recorded = len(llm._seq.tokens)
    assert ctx.memory_seq_pos_max(0) + 1 == recorded + 1  # one decode is not on record yet
    llm._seq.settle()
    assert ctx.memory_seq_pos_max(0) + 1 == recorded
    assert llm(PROMPT, config=config).text == expected


def test_on_token_sees_every_chunk(llm):
    seen = []
    response = llm(PROMPT, on_token=seen.append)
    assert "".join(seen) == response.text and len(seen) > 1


def test_prompt_longer_than_context_is_a_value_error(llm):
    long_prompt = "word " * 200
    with pytest.raises(ValueError, match=r"prompt has \d+ tokens but the context holds 64"):
        llm(long_prompt, config=llm.config.replace(n_ctx=64))
    assert llm(PROMPT).text  # still usable


def test_empty_prompt_is_a_value_error(llm):
    with pytest.raises(ValueError, match="empty"):
        llm("")
    with pytest.raises(TypeError):
        llm(None)  # type: ignore[arg-type]


def test_token_id_prompt_generates_what_its_text_generates(llm):
    import numpy

    tokens = llm.tokenize(PROMPT)
    expected = llm(PROMPT)
    for prompt in (tokens, tuple(tokens), numpy.array(tokens, dtype=numpy.int32)):
        response = llm(prompt)
        assert response.text == expected.text
        assert response.stats.prompt_tokens == len(tokens)
    assert "".join(llm(tokens, stream=True)) == expected.text


@pytest.mark.parametrize("prompt,error,message", [
    ([], ValueError, "empty"),
    ([0, 49152], ValueError, "outside the vocabulary"),
    ([-1], ValueError, "outside the vocabulary"),
    ([2 ** 40], ValueError, "outside the vocabulary"),
    ([1, "2"], TypeError, "integers"),
    ([1.0], TypeError, "integers"),
    ([True], TypeError, "integers"),
    (b"bytes", TypeError, "sequence of token ids"),
    (7, TypeError, "sequence of token ids"),
])
def test_bad_token_id_prompts_raise_before_llama_cpp(llm, prompt, error, message):
    assert llm.vocab.n_tokens == 49152  # the out-of-range case above is the first id past the end
    with pytest.raises(error, match=message):
        llm(prompt)
    assert llm(PROMPT).text  # nothing was claimed or decoded: still usable


def test_generation_stops_at_a_full_explicit_context(llm):
    response = llm(PROMPT, config=llm.config.replace(n_ctx=16, max_tokens=100))
    assert response.finish_reason == "length"
    assert response.stats.prompt_tokens + response.stats.generated_tokens == 16 + 1  # the last token needs no KV slot


def test_sampling_settings_run(llm):
    for overrides in ({"temperature": 0.7, "seed": 3}, {"temperature": 0.7, "mirostat": 2, "seed": 1},
                      {"temperature": 0.7, "mirostat": 1, "seed": 1},
                      {"temperature": 0.9, "repeat_penalty": 1.3, "frequency_penalty": 0.2, "seed": 5}):
        config = llm.config.replace(**overrides)
        assert llm(PROMPT, config=config).stats.generated_tokens > 0
    seeded = llm.config.replace(temperature=0.9, seed=42)
    assert llm(PROMPT, config=seeded).text == llm(PROMPT, config=seeded).text


def test_default_micro_batch_is_llama_cpp_default(llm):
    """n_ubatch 256 cost ~10 % of a long prefill against native llama.cpp (docs/performance.md):
    the default context the LLM makes must use llama.cpp's own micro-batch."""
    from cyllama_cffi._ffi import lib

    native_default = lib.llama_context_default_params().n_ubatch
    assert GenerationConfig().n_ubatch == native_default == 512
    llm("Hi", config=llm.config.replace(max_tokens=1, n_ctx=1024))  # llama.cpp caps it at n_ctx
    assert llm._seq.ctx.n_ubatch == native_default


def test_generation_stats_defaults():
    assert GenerationStats().to_dict()["generated_tokens"] == 0


def test_close_frees_the_context_and_the_llm_generates_again(model_path):
    """cyllama's close(): the context goes, the model stays, the next call makes a new context."""
    llm = LLM(model_path, temperature=0.0, max_tokens=6)
    expected = llm(PROMPT).text
    ctx = llm._seq.ctx
    llm.close()
    llm.close()
    assert ctx.closed and llm._seq is None and not llm.model.closed
    assert not llm.cancel_requested  # nothing ran: nothing to cancel
    assert llm(PROMPT).text == expected and not llm._seq.ctx.closed
    llm.close()


def test_leaving_the_with_block_frees_the_model_too(model_path):
    with LLM(model_path, temperature=0.0, max_tokens=2) as llm:
        llm(PROMPT)
        ctx, model = llm._seq.ctx, llm.model
    assert ctx.closed and model.closed
    with pytest.raises(ClosedError, match="closed"):
        llm(PROMPT)
    with pytest.raises(ClosedError):
        llm.tokenize("x")
    llm.close()  # closing again, or another with block, is harmless
    with llm:
        pass


def test_reset_context_drops_the_context_and_ends_a_running_stream(model_path):
    with LLM(model_path, temperature=0.0, max_tokens=8) as llm:
        expected = llm(PROMPT).text
        stream = llm.stream(PROMPT)
        first = next(stream)
        old = llm._seq.ctx
        llm.reset_context()
        assert old.closed and llm._seq is None
        assert stream.finish_reason == "cancelled" and list(stream) == [] and expected.startswith(first)
        assert llm(PROMPT).text == expected and llm._seq.ctx is not old


def test_close_ends_a_running_stream_as_cancelled(model_path):
    with LLM(model_path, temperature=0.0, max_tokens=30) as llm:
        stream = llm.stream(PROMPT)
        next(stream)
        llm.close()
        assert stream.finish_reason == "cancelled" and list(stream) == []
        assert llm(PROMPT, config=llm.config.replace(max_tokens=3)).finish_reason == "length"


def test_generate_with_stats(llm, model_path):
    response = llm.generate_with_stats(PROMPT, llm.config.replace(max_tokens=3))
    assert isinstance(response, Response) and response.finish_reason == "length"
    assert response.stats.generated_tokens == 3 and response.stats.prompt_tokens == len(llm.tokenize(PROMPT))
    assert response.text == llm(PROMPT, config=llm.config.replace(max_tokens=3)).text
    assert response.model == str(model_path)  # the path as given, as in cyllama


def test_no_decode_thread_outlives_its_prompt(llm):
    """Prompt chunks decode on a thread of their own (docs/cancellation.md, "The prompt") that
    ends with the prompt: ggml's OpenMP build keeps a thread pool per decoding thread, and a
    second pool beside the stream's own makes libgomp sleep at every graph-node barrier once
    the pools outnumber the cores (token decoding ~18 % slower on 2 cores)."""
    before = {thread.ident for thread in threading.enumerate()}
    stream = llm.stream(PROMPT, config=llm.config.replace(max_tokens=4))
    try:
        first = next(stream)  # the prompt is done and its thread joined
        assert first and not [thread for thread in threading.enumerate()
                              if thread.name == "cyllama-decode" or thread.ident not in before]
    finally:
        stream.close()


def test_a_refused_call_leaves_a_suspended_stream_untouched(llm):
    """Bad input is refused before the LLM changes hands: the stream being read goes on."""
    expected = llm(PROMPT).text
    stream = llm.stream(PROMPT)
    first = next(stream)
    with pytest.raises(ValueError, match="empty"):
        llm("")
    with pytest.raises(ValueError, match="context holds"):
        llm("word " * 200, config=llm.config.replace(n_ctx=64))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm([1, 2, 10 ** 9])
    assert first + "".join(stream) == expected


def test_an_explicit_n_ctx_llama_cpp_pads_keeps_its_context(model_path):
    """llama.cpp rounds n_ctx up (to 256 cells): the same n_ctx must not make a new context per call."""
    with LLM(model_path, temperature=0.0, max_tokens=2, n_ctx=1000) as llm:
        llm(PROMPT)
        first = llm._seq.ctx
        assert first.n_ctx >= 1000
        llm(PROMPT)
        assert llm._seq.ctx is first


def test_a_stream_closed_before_its_first_step_never_makes_a_sampler(llm, monkeypatch):
    """The generation makes its sampler chain when it starts and frees it when it ends: a stream
    closed unstarted has nothing to leave to a finalizer; a finished one has freed its chain."""
    import cyllama_cffi.llm as llm_module

    made = []
    original = llm_module.build_sampler

    def counting(config, vocab, n_ctx):
        made.append(original(config, vocab, n_ctx))
        return made[-1]

    monkeypatch.setattr(llm_module, "build_sampler", counting)
    stream = llm.stream(PROMPT)
    stream.close()
    assert made == []
    llm(PROMPT)
    assert len(made) == 1 and made[0].closed
