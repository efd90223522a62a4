"""Saved state (``LLM.save_state``/``load_state``) and prefix reuse, on the default model.

Greedy output is compared with a fresh LLM's: reusing what the cache holds must not change a
single token. Corrupted states are fuzzed in a child process (``crashproof``), where a crash
would be a failed case rather than a dead test run.
"""

from __future__ import annotations

import hashlib
import random

import pytest

from cyllama_cffi import LLM, GenerationConfig, LLMBusyError, StateError
from cyllama_cffi._sequence import KVSequence
from crashproof import Case, Worker
from tiny_gguf import write_tiny_llama

# With micro-batches shorter than 64 tokens every prompt chunk takes one kind of code path, so any
# prefix can be reused (see docs/state.md); tests of the default micro-batch are marked so below.
CONFIG = GenerationConfig(temperature=0.0, max_tokens=24, n_threads=2, n_ubatch=8, n_batch=8)
SYSTEM = {"role": "system", "content": "You are a helpful assistant who answers briefly and precisely."}


def fresh(model_path, prompt, chat=False, **overrides):
    """What a new LLM answers: the reference every reuse must match."""
    with LLM(model_path, config=CONFIG.replace(**overrides)) as llm:
        return (llm.chat(prompt) if chat else llm(prompt)).text


@pytest.fixture
def llm(model_path):
    with LLM(model_path, config=CONFIG) as instance:
        yield instance



def record_matches_cache(llm):
    seq = llm._seq
    return seq.ctx.memory_seq_pos_max(0) == len(seq.tokens) - 1


# -- prefix reuse ----------------------------------------------------------------------------------

def test_system_prompt_with_different_questions_decodes_only_the_question(llm, model_path, decoded):
    questions = ["What is the capital of France?", "Name a prime number.", "What colour is the sky?"]
    for question in questions:
        messages = [SYSTEM, {"role": "user", "content": question}]
        n_prompt = len(llm.tokenize(llm.format_chat(messages), add_special=False, parse_special=True))
        expected = fresh(model_path, messages, chat=True)
        decoded.clear()
        assert llm.chat(messages).text == expected
        if question is not questions[0]:  # the system prompt came from the cache
            assert 0 < sum(decoded) < n_prompt - 15 and all(n <= 8 for n in decoded)


def test_chat_turn_after_chat_turn_matches_fresh(llm, model_path, decoded):
    messages = [SYSTEM, {"role": "user", "content": "Tell me about cats."}]
    n_previous = 0
    for turn in ["And dogs?", "Which is better?", "Why?"]:
        expected = fresh(model_path, messages, chat=True)
        decoded.clear()
        answer = llm.chat(messages).text
        assert answer == expected
        n_prompt = len(llm.tokenize(llm.format_chat(messages), add_special=False, parse_special=True))
        # The previous prompt (all but a token or two at its seam) came from the cache; the
        # previous answer is decoded again, as a prompt chunk (see KVSequence.n_prefilled).
        assert sum(decoded) <= n_prompt - n_previous + 8
        n_previous = n_prompt
        messages = messages + [{"role": "assistant", "content": answer}, {"role": "user", "content": turn}]


def test_retry_of_the_same_prompt_decodes_one_token(llm, decoded):
    first = llm("Once upon a time").text
    decoded.clear()
    assert llm("Once upon a time").text == first
    n_prompt = len(llm.tokenize("Once upon a time"))
    assert decoded == [2]  # a lone token would take other code paths than a fresh context's


def test_cancel_mid_prefill_then_a_prompt_sharing_its_prefix_matches_fresh(model_path, monkeypatch):
    config = CONFIG
    long_prompt = "The history of the city begins with a small village on the river. " * 6
    with LLM(model_path, config=config) as llm:
        original = KVSequence.decode_chunk
        calls = []

        def cancel_after_three(self, tokens, logits_last):
            original(self, tokens, logits_last)
            calls.append(len(tokens))
            if len(calls) == 3:
                llm.cancel()

        monkeypatch.setattr(KVSequence, "decode_chunk", cancel_after_three)
        response = llm(long_prompt)
        monkeypatch.setattr(KVSequence, "decode_chunk", original)
        assert response.finish_reason == "cancelled" and response.text == ""
        assert len(llm._seq.tokens) == 24 and record_matches_cache(llm)
        follow_up = long_prompt + "Then"
        assert llm(follow_up).text == fresh(model_path, follow_up)


def test_cancel_mid_generation_then_retry_matches_fresh(llm, model_path):
    chunks = []

    def cancel_at_three(chunk):
        chunks.append(chunk)
        if len(chunks) == 3:
            llm.cancel()

    cancelled = llm.stream("Once upon a time", on_token=cancel_at_three)
    assert "".join(cancelled) and cancelled.finish_reason == "cancelled"
    assert record_matches_cache(llm)
    assert llm("Once upon a time").text == fresh(model_path, "Once upon a time")


# -- saved state -----------------------------------------------------------------------------------

def test_state_loaded_in_a_new_llm_continues_like_the_original(llm, model_path, tmp_path, decoded):
    prompt = "The three primary colours are"
    answer = llm(prompt).text
    path = tmp_path / "state.bin"
    data = llm.save_state(path)
    assert path.read_bytes() == data
    saved_tokens, n_prefilled = list(llm._seq.tokens), llm._seq.n_prefilled
    assert n_prefilled == len(llm.tokenize(prompt)) < len(saved_tokens)
    continuation = prompt + answer + " Another colour is"
    expected = llm(continuation).text

    with LLM(model_path, config=CONFIG) as other:
        other.load_state(path)
        assert other._seq.tokens == saved_tokens and other._seq.n_prefilled == n_prefilled
        assert record_matches_cache(other)
        decoded.clear()
        assert other(continuation).text == expected
        n_prompt = len(other.tokenize(continuation))
        assert sum(decoded) <= n_prompt - n_prefilled + 8  # the saved prompt was not decoded again


def test_state_from_another_flash_attention_setting_is_refused_and_changes_nothing(model_path):
    """Without flash attention the cache is laid out otherwise (V transposed): a clear error
    names the setting, and the LLM keeps what it held. The same setting loads."""
    with LLM(model_path, config=CONFIG) as with_flash:
        with_flash("The three primary colours are")
        data = with_flash.save_state()
    with LLM(model_path, config=CONFIG.replace(flash_attn=False)) as without:
        without("A list of fruits:")
        held = without.save_state()
        with pytest.raises(StateError, match="flash attention on, this LLM has it off"):
            without.load_state(data)
        assert without.save_state() == held
        with LLM(model_path, config=CONFIG.replace(flash_attn=False)) as same:
            same.load_state(held)
            assert same.save_state() == held


def test_bytes_round_trip(llm, model_path):
    llm("A list of fruits:")
    data = llm.save_state()
    with LLM(model_path, config=CONFIG) as other:
        other.load_state(bytearray(data))
        assert other.save_state() == data
        other.load_state(memoryview(data))
        assert other.save_state() == data


def test_empty_state_before_any_generation(llm, model_path):
    data = llm.save_state()
    with LLM(model_path, config=CONFIG) as other:
        other("Hello")
        other.load_state(data)
        assert other._seq.tokens == []
        assert other("Hello").text == fresh(model_path, "Hello")


def test_state_of_another_model_is_refused_and_changes_nothing(llm, model_path, tmp_path):
    tiny = write_tiny_llama(tmp_path / "tiny.gguf")
    with LLM(str(tiny), temperature=0.0, max_tokens=4) as small:
        small("the cat")
        foreign = small.save_state()
    llm("Hello there")
    before = list(llm._seq.tokens)
    with pytest.raises(StateError, match="another model"):
        llm.load_state(foreign)
    assert isinstance(StateError("x"), ValueError)
    assert llm._seq.tokens == before and record_matches_cache(llm)
    assert llm("Hello there, friend").text == fresh(model_path, "Hello there, friend")


def test_corrupted_states_are_refused_and_change_nothing(llm, model_path):
    llm("Roses are red")
    data = llm.save_state()
    before = list(llm._seq.tokens)
    rng = random.Random(7)
    bad = [b"", b"garbage", data[:8], data[:-1], data[: len(data) // 2], data + b"\0", b"CYLSTATE" + bytes(100)]
    for _ in range(20):
        mutant = bytearray(data)
        mutant[rng.randrange(len(mutant))] ^= 1 << rng.randrange(8)
        bad.append(bytes(mutant))
    for mutant in bad:
        with pytest.raises(StateError):
            llm.load_state(mutant)
        assert llm._seq.tokens == before
    with pytest.raises(TypeError):
        llm.load_state(42)
    assert record_matches_cache(llm)
    assert llm("Roses are red, violets").text == fresh(model_path, "Roses are red, violets")


def test_saving_or_loading_while_a_stream_runs_is_refused(llm):
    llm("Warm up")
    data = llm.save_state()
    stream = llm.stream("Count to ten:")
    next(stream)
    with pytest.raises(LLMBusyError, match="save_state: a stream of this LLM is still running"):
        llm.save_state()
    with pytest.raises(LLMBusyError, match="load_state"):
        llm.load_state(data)
    stream.close()
    llm.load_state(data)
    assert llm.save_state() == data


# -- fuzzing in a child process --------------------------------------------------------------------

def test_truncated_and_flipped_states_never_crash(model_path, tmp_path):
    """Every truncation (every 97 bytes, and around the header) and random flips, resealed too.

    "Resealed" mutants get a valid checksum again, so they reach llama.cpp's own checks of its
    body: the cases where a crash would be possible.
    """
    with LLM(model_path, config=CONFIG) as llm:
        llm("The quick brown fox")
        data = llm.save_state()
    rng = random.Random(11)
    mutants = {}
    for cut in sorted(set(range(0, len(data), 97)) | set(range(0, 200))):
        mutants[f"cut{cut}"] = data[:cut]
    for i in range(60):
        mutant = bytearray(data)
        where = rng.randrange(len(data) - 32) if i % 2 else rng.randrange(min(200, len(data) - 32))
        mutant[where] ^= 1 << rng.randrange(8)
        mutants[f"flip{i}@{where}"] = bytes(mutant)
        sealed = bytearray(mutant[:-32])
        mutants[f"resealed{i}@{where}"] = bytes(sealed) + hashlib.sha256(sealed).digest()
    paths = []
    for name, mutant in mutants.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(mutant)
        paths.append(str(path))
    listing = tmp_path / "mutants.txt"
    listing.write_text("\n".join(paths))
    with Worker(timeout=600) as worker:
        outcome = worker.run_one(Case("state-fuzz", "state", f"{model_path}::{listing}"))
    assert outcome.status == "ok", outcome
    refused, accepted = outcome.message.split()
    assert int(refused) > len(mutants) * 0.9 and int(refused) + int(accepted) == len(mutants)
