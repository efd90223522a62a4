"""Token log-probabilities and logit bias on the real model.

The log-probabilities are checked against an independent computation: the same prompt and the
same tokens decoded step by step on a context of their own, each row of logits read with
``llama_get_logits_ith`` and turned into a log-softmax by numpy here.
"""

from __future__ import annotations

import math
import re
from typing import List

import numpy as np
import pytest

from cyllama_cffi import LLM, FinishReason, GenerationConfig, LlamaBatch, LlamaContext, LlamaSampler, ffi, lib
from cyllama_cffi.lowlevel.context import LlamaContext as LowContext
from cyllama_cffi.sampling import build_sampler

PROMPT = "The capital of France is"
N_CTX = 256
GREEDY = GenerationConfig(temperature=0.0, max_tokens=12, n_ctx=N_CTX, logprobs=5)
SAMPLED = GenerationConfig(temperature=0.9, seed=7, max_tokens=12, n_ctx=N_CTX, logprobs=5)


@pytest.fixture(scope="module")
def llm(model_path):
    with LLM(model_path, n_ctx=N_CTX) as instance:
        yield instance


def reference_log_softmax(llm: LLM, prompt: List[int], generated: List[int]) -> List[np.ndarray]:
    """Each step's log-softmax, from a fresh context decoding the prompt, then one token at a time."""
    ctx = LowContext(llm.model, n_ctx=N_CTX, n_batch=llm.config.n_batch, n_ubatch=llm.config.n_ubatch)
    batch = LlamaBatch(len(prompt))
    rows = []

    def read_row() -> None:
        logits = np.array(ffi.unpack(lib.llama_get_logits_ith(ctx.ptr, -1), len(llm.vocab)), dtype=np.float64)
        shifted = logits - logits.max()
        rows.append(shifted - np.log(np.exp(shifted).sum()))

    try:
        batch.set_tokens(prompt, 0, logits_last=True)
        ctx.decode(batch)
        read_row()  # the row the first token was chosen from
        for position, token in enumerate(generated[:-1], start=len(prompt)):
            batch.set_tokens([token], position, logits_last=True)
            ctx.decode(batch)
            read_row()
    finally:
        ctx.close()
        batch.close()
    return rows


@pytest.mark.parametrize("config", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_logprobs_match_an_independent_log_softmax_of_the_logits(llm, config):
    response = llm(PROMPT, config)
    entries = response.logprobs
    generated = [entry.token for entry in entries]
    assert len(entries) == response.stats.generated_tokens > 3
    reference = reference_log_softmax(llm, llm.tokenize(PROMPT), generated)
    for entry, row in zip(entries, reference):
        assert abs(entry.logprob - row[entry.token]) < 1e-4
        expected = sorted(range(row.size), key=lambda i: (-row[i], i))[:5]
        assert [alternative.token for alternative in entry.top] == expected
        for alternative in entry.top:
            assert abs(alternative.logprob - row[alternative.token]) < 1e-4
            assert alternative.piece == llm.vocab.token_to_bytes(alternative.token)
        assert entry.piece == llm.vocab.token_to_bytes(entry.token)
        assert entry.text == entry.piece.decode("utf-8", "replace")
    assert b"".join(entry.piece for entry in entries).decode() == response.text
    if config.temperature == 0:  # a greedy choice is the most likely token, every time
        assert all(entry.token == entry.top[0].token and entry.logprob == entry.top[0].logprob for entry in entries)
    else:  # the sampled run did not always take the most likely token, which the check above covered too
        assert any(entry.token != entry.top[0].token for entry in entries)


def test_streaming_logprobs_grow_with_the_chunks_and_equal_the_non_streaming_ones(llm):
    expected = llm(PROMPT, GREEDY).logprobs
    stream = llm.stream(PROMPT, GREEDY)
    assert stream.logprobs == []
    text = ""
    for chunk in stream:
        text += chunk
        assert [entry.token for entry in stream.logprobs] == stream.generated
        assert b"".join(entry.piece for entry in stream.logprobs).decode() == text
    assert stream.finish_reason == FinishReason.LENGTH
    assert [entry.token for entry in stream.logprobs] == [entry.token for entry in expected]
    for streamed, whole in zip(stream.logprobs, expected):
        assert abs(streamed.logprob - whole.logprob) < 1e-4


@pytest.mark.parametrize("how", ["cancel", "close"])
def test_a_cancelled_stream_has_logprobs_for_exactly_the_tokens_it_emitted(llm, how):
    config = GREEDY.replace(max_tokens=40)
    chunks: List[str] = []
    stream = llm.stream(PROMPT, config)
    for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 3:
            if how == "cancel":
                llm.cancel()  # the stream ends at its next step
            else:
                stream.close()
    assert stream.finish_reason == FinishReason.CANCELLED
    assert len(stream.generated) == 3
    assert [entry.token for entry in stream.logprobs] == stream.generated
    assert b"".join(entry.piece for entry in stream.logprobs).decode() == "".join(chunks)


def test_logprobs_off_give_none_and_never_read_the_logits(llm, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the logits were copied for a generation that did not ask for logprobs")

    monkeypatch.setattr(LowContext, "copy_logits", refuse)
    for config in (GREEDY.replace(logprobs=None), SAMPLED.replace(logprobs=0)):
        response = llm(PROMPT, config)
        assert response.logprobs is None and len(response) > 0 and "logprobs" not in response.to_dict()
        stream = llm.stream(PROMPT, config)
        assert "".join(stream) and stream.logprobs is None


def test_logprobs_through_chat_and_to_dict(llm):
    response = llm.chat([{"role": "user", "content": "Say hi."}], config=GREEDY.replace(logprobs=2, max_tokens=4))
    data = response.to_dict()["logprobs"]
    assert len(data) == len(response.logprobs) == response.stats.generated_tokens
    first = response.logprobs[0]
    assert data[0] == {"id": first.token, "token": first.text, "bytes": list(first.piece), "logprob": first.logprob,
                       "top_logprobs": [{"id": t.token, "token": t.text, "bytes": list(t.piece), "logprob": t.logprob}
                                        for t in first.top]}
    assert len(first.top) == 2


def test_logprobs_describe_the_model_under_a_grammar(llm):
    """With a grammar, the tokens follow it, but each step's numbers are the model's own: the first
    step's alternatives are the same as without the grammar, forbidden tokens included."""
    free = llm(PROMPT, GREEDY.replace(logprobs=20, max_tokens=1)).logprobs[0]
    constrained = llm(PROMPT, GREEDY.replace(logprobs=20, max_tokens=3, grammar='root ::= " Lyon" | " Nice"'))
    assert constrained.text in (" Lyon", " Nice")
    assert [t.token for t in constrained.logprobs[0].top] == [t.token for t in free.top]
    assert constrained.logprobs[0].top[0].logprob == pytest.approx(free.top[0].logprob, abs=1e-6)
    assert free.token not in [entry.token for entry in constrained.logprobs]  # " Paris": forbidden, yet listed


# -- logit bias -----------------------------------------------------------------------------------

def first_token(llm: LLM, text: str) -> int:
    tokens = llm.tokenize(text, add_special=False)
    assert len(tokens) == 1, tokens
    return tokens[0]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_large_positive_bias_forces_a_token(llm, streaming):
    london = first_token(llm, " London")
    config = SAMPLED.replace(logit_bias={london: 100.0}, max_tokens=4)
    if streaming:
        stream = llm.stream(PROMPT, config)
        text, logprobs = "".join(stream), stream.logprobs
    else:
        response = llm(PROMPT, config)
        text, logprobs = response.text, response.logprobs
    assert text == " London" * 4
    # the numbers are the model's, before the bias: London was not its first choice
    assert logprobs[0].top[0].token != london and -20 < logprobs[0].logprob < logprobs[0].top[0].logprob


@pytest.mark.parametrize("streaming", [False, True])
def test_minus_infinity_bans_a_token(llm, streaming):
    free = llm(PROMPT, GREEDY)
    paris = free.logprobs[0].token
    assert free.logprobs[0].text == " Paris"
    config = GREEDY.replace(logit_bias={paris: -math.inf})
    if streaming:
        stream = llm.stream(PROMPT, config)
        text, logprobs = "".join(stream), stream.logprobs
    else:
        response = llm(PROMPT, config)
        text, logprobs = response.text, response.logprobs
    assert paris not in [entry.token for entry in logprobs] and " Paris" not in text
    # the greedy choice is now the model's second most likely token, at its unbiased logprob
    second = free.logprobs[0].top[1]
    assert logprobs[0].token == second.token and abs(logprobs[0].logprob - second.logprob) < 1e-4


def test_a_bias_on_a_token_outside_the_vocabulary_is_refused_before_anything_runs(llm):
    n_vocab = len(llm.vocab)
    config = GREEDY.replace(logit_bias={n_vocab: 5.0})
    with pytest.raises(ValueError, match=f"token id {n_vocab} is outside the vocabulary"):
        llm(PROMPT, config)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.stream(PROMPT, config)  # at once, not at the first chunk
    assert llm(PROMPT, GREEDY.replace(max_tokens=2)).finish_reason == FinishReason.LENGTH  # still usable


def test_the_bias_stage_heads_the_chain(model):
    config = GenerationConfig(logit_bias={5: 1.0}, repeat_penalty=1.1, grammar='root ::= "a"', temperature=0.0)
    with build_sampler(config, model.vocab, 512) as sampler:
        assert sampler.stages == ["logit_bias", "grammar", "penalties", "greedy"]
        assert not sampler.greedy_only  # the biased chain, not the shim's plain argmax, picks the token
        assert ffi.string(lib.llama_sampler_name(lib.llama_sampler_chain_get(sampler.ptr, 0))) == b"logit-bias"


@pytest.mark.parametrize("biases, message", [
    ({-1: 1.0}, "token id -1 is outside the vocabulary"),
    ({10**6: 1.0}, "token id 1000000 is outside the vocabulary"),
    ({3: float("nan")}, "logit bias of token 3 must be a finite float32 number or -inf, got nan"),
    ({3: float("inf")}, "logit bias of token 3 must be a finite float32 number or -inf, got inf"),
    ({3: 1e39}, "logit bias of token 3 must be a finite float32 number or -inf, got 1e+39"),
    ({3: True}, "logit bias of token 3 must be a finite float32 number or -inf, got True"),
])
def test_the_low_level_bias_stage_checks_before_calling_llama_cpp(model, biases, message):
    with LlamaSampler() as sampler:
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            sampler.add_logit_bias(model.vocab.n_tokens, biases)
        assert sampler.stages == []


# -- the response cache ----------------------------------------------------------------------------

def test_the_response_cache_tells_logprobs_and_biases_apart(model_path):
    config = SAMPLED.replace(max_tokens=4)
    with LLM(model_path, n_ctx=N_CTX, cache_size=8) as llm:
        first = llm(PROMPT, config)
        again = llm(PROMPT, config)
        assert llm.cache_info().hits == 1
        assert again.logprobs == first.logprobs and again.logprobs is not first.logprobs
        assert llm(PROMPT, config.replace(logprobs=None)).logprobs is None  # a miss: another key
        biased = llm(PROMPT, config.replace(logit_bias={first_token(llm, " London"): 100.0}))
        assert biased.text == " London" * 4
        assert llm.cache_info().hits == 1 and llm.cache_info().currsize == 3


# -- the row the logits are copied from ------------------------------------------------------------

def test_copy_logits_checks_the_row_and_the_buffer(model):
    ctx = LlamaContext(model, n_ctx=N_CTX)
    batch = LlamaBatch(8)
    try:
        row = np.empty(model.vocab.n_tokens, dtype=np.float64)
        with pytest.raises(RuntimeError, match="no logits at batch index -1"):
            ctx.copy_logits(-1, row)
        batch.set_tokens([1, 2, 3], 0, logits_last=True)
        ctx.decode(batch)
        with pytest.raises(ValueError, match="out must have shape"):
            ctx.copy_logits(-1, np.empty(3))
        with pytest.raises(RuntimeError, match="no logits at batch index 0"):
            ctx.copy_logits(0, row)  # only the last row was asked for
        copied = ctx.copy_logits(2, row)
        assert copied is row and np.array_equal(row, ctx.get_logits_ith(-1).astype(np.float64))
    finally:
        ctx.close()
        batch.close()
