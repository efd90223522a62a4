"""Prefix reuse with the default micro-batch (512): a follow-up decodes only its new tokens
(at least 64), and every output is a fresh LLM's, token for token.

``tests/test_state.py`` covers micro-batches shorter than 64 tokens; here the prompts are long
enough (a system prompt of a few hundred tokens) that their chunks take ggml-cpu's tiled code
path, the one a chat of any length lives on.
"""

from __future__ import annotations

import numpy as np
import pytest

from cyllama_cffi import LLM, GenerationConfig
from cyllama_cffi._sequence import TILED, KVSequence, chunk_kind, plan_kinds, prefill_plan
from cyllama_cffi.lowlevel.batch import LlamaBatch
from cyllama_cffi.lowlevel.context import LlamaContext

CONFIG = GenerationConfig(temperature=0.0, max_tokens=12, n_threads=2, n_ctx=1024)
NOTES = " ".join(f"Note {i}: the {w} by the {v} opens at {i % 12 + 1} o'clock." for i, (w, v) in enumerate(
    zip(("bakery mill school chapel forge market harbour tower " * 3).split(),
        ("river bridge square gate hill road canal wall " * 3).split())))
SYSTEM = {"role": "system", "content": "You answer questions about the town from these notes. " + NOTES}


def fresh(model_path, prompt, chat=False):
    with LLM(model_path, config=CONFIG) as llm:
        return (llm.chat(prompt) if chat else llm(prompt)).text


def n_tokens(llm, messages):
    return len(llm.tokenize(llm.format_chat(messages), add_special=False, parse_special=True))


@pytest.fixture
def llm(model_path):
    with LLM(model_path, config=CONFIG) as instance:
        yield instance



def test_prefill_plan_keeps_every_chunk_of_a_long_prompt_tiled():
    for step in (128, 256, 512):
        for start, end in ((0, 64), (0, 700), (300, 365), (512, 1100), (5, 5 + 3 * step + 1)):
            plan = prefill_plan(start, end, step)
            assert plan[0][0] == start and plan[-1][1] == end
            assert all(b - a <= step for a, b in plan)
            assert all(a == b0 for (_, b0), (a, _) in zip(plan, plan[1:]))
            assert set(plan_kinds(plan)) == {chunk_kind(TILED)}
    assert plan_kinds(prefill_plan(0, 63, 512)) == bytes([chunk_kind(63)]) * 63
    assert prefill_plan(0, 1, 512) == [(0, 1)] and prefill_plan(3, 3, 512) == []


def test_a_prefix_decoded_in_planned_chunks_gives_the_fresh_logits_bit_for_bit(llm):
    """The fact reuse stands on, on this build: the split point does not change a single bit."""
    prompt = llm.tokenize(SYSTEM["content"] + " Which note mentions the forge?")
    assert len(prompt) > 2 * TILED + 20
    with LlamaContext(llm.model, n_ctx=1024, n_threads=2) as ctx, LlamaBatch(512) as batch:
        def last_logits(cuts):
            ctx.memory_seq_rm(0, -1, -1)
            bounds = [0, *cuts, len(prompt)]
            for a, b in zip(bounds, bounds[1:]):
                for start, end in prefill_plan(a, b, 512):
                    batch.set_tokens(prompt[start:end], start, 0, logits_last=end == len(prompt))
                    ctx.decode(batch)
            return np.array(ctx.get_logits_ith(-1))

        reference = last_logits([])
        for cut in (TILED, 101, len(prompt) // 2, len(prompt) - TILED):
            assert np.array_equal(last_logits([cut]), reference), cut


def test_chat_turns_decode_only_their_new_tokens_and_match_fresh(llm, model_path, decoded):
    messages = [SYSTEM, {"role": "user", "content": "When does the bakery open?"}]
    n_previous = 0
    for turn in ["And the mill?", "Which one opens first?", "Thanks. And the school?"]:
        expected = fresh(model_path, messages, chat=True)
        decoded.clear()
        answer = llm.chat(messages).text
        assert answer == expected
        n_prompt = n_tokens(llm, messages)
        if n_previous:  # the previous prompt came from the cache; its answer and the new turn did not
            assert TILED <= sum(decoded) <= max(TILED, n_prompt - n_previous + 2)
        n_previous = n_prompt
        messages = messages + [{"role": "assistant", "content": answer}, {"role": "user", "content": turn}]


def test_system_prompt_reused_for_other_questions(llm, model_path, decoded):
    for question in ["When does the forge open?", "Where is the chapel?", "Name two places by the river."]:
        messages = [SYSTEM, {"role": "user", "content": question}]
        expected = fresh(model_path, messages, chat=True)
        decoded.clear()
        assert llm.chat(messages).text == expected
        if question != "When does the forge open?":
            assert sum(decoded) == TILED  # the question and the template's tokens are fewer than 64


def test_retry_decodes_the_last_64_tokens(llm, model_path, decoded):
    prompt = SYSTEM["content"] + " The chapel"
    first = llm(prompt).text
    assert first == fresh(model_path, prompt)
    decoded.clear()
    assert llm(prompt).text == first
    assert decoded == [TILED]


def test_cancel_mid_generation_then_next_turn_matches_fresh(llm, model_path):
    messages = [SYSTEM, {"role": "user", "content": "Describe the market."}]
    chunks = []

    def cancel_at_two(chunk):
        chunks.append(chunk)
        if len(chunks) == 2:
            llm.cancel()

    stream = llm.stream(llm.format_chat(messages), on_token=cancel_at_two)
    partial = "".join(stream)
    assert stream.finish_reason == "cancelled" and partial
    follow = messages + [{"role": "assistant", "content": partial}, {"role": "user", "content": "Go on."}]
    assert llm.chat(follow).text == fresh(model_path, follow, chat=True)
    assert llm.chat(messages).text == fresh(model_path, messages, chat=True)  # a retry of the cancelled turn


def test_cancel_mid_prefill_then_retry_matches_fresh_and_reuses_the_done_chunk(llm, model_path, monkeypatch):
    prompt = (SYSTEM["content"] + " ") * 2 + "Which note is the last?"
    n_prompt = len(llm.tokenize(prompt))
    assert n_prompt > 600  # two chunks
    expected = fresh(model_path, prompt)
    original = KVSequence.decode_chunk
    sizes = []

    def cancel_after_first(self, tokens, logits_last):
        original(self, tokens, logits_last)
        sizes.append(len(tokens))
        llm.cancel()

    monkeypatch.setattr(KVSequence, "decode_chunk", cancel_after_first)
    response = llm(prompt)
    monkeypatch.setattr(KVSequence, "decode_chunk", original)
    assert response.finish_reason == "cancelled" and response.text == ""
    assert len(llm._seq.tokens) == sizes[0] == llm._seq.n_prefilled
    assert llm._seq.ctx.memory_seq_pos_max(0) == sizes[0] - 1
    retried = []
    monkeypatch.setattr(KVSequence, "decode_chunk",
                        lambda self, tokens, logits_last: retried.append(len(tokens)) or original(self, tokens, logits_last))
    assert llm(prompt).text == expected
    assert retried == [n_prompt - sizes[0]]  # the chunk done before the cancel came from the cache


# -- without flash attention: every chunk of two tokens or more is of one kind ------------------
NO_FLASH = CONFIG.replace(flash_attn=False)


@pytest.fixture
def llm_no_flash(model_path):
    with LLM(model_path, config=NO_FLASH) as instance:
        yield instance


def fresh_no_flash(model_path, prompt, chat=False):
    with LLM(model_path, config=NO_FLASH) as llm:
        return (llm.chat(prompt) if chat else llm(prompt)).text


def test_without_flash_attention_chunks_of_two_or_more_are_one_kind():
    assert {chunk_kind(size, None) for size in (2, 3, 63, 64, 512)} == {chunk_kind(2)}
    assert chunk_kind(1, None) == chunk_kind(1) != chunk_kind(2, None)
    assert set(plan_kinds(prefill_plan(0, 700, 512), None)) == {chunk_kind(2)}


def test_without_flash_attention_any_split_gives_the_fresh_logits_bit_for_bit(llm_no_flash):
    """What token-granular reuse stands on: with the attention as matrix products, a split
    anywhere (chunks of two tokens or more) changes no bit of the logits."""
    prompt = llm_no_flash.tokenize(SYSTEM["content"] + " Which note mentions the forge?")
    with LlamaContext(llm_no_flash.model, n_ctx=1024, n_threads=2, flash_attn=False) as ctx, LlamaBatch(512) as batch:
        def last_logits(cuts):
            ctx.memory_seq_rm(0, -1, -1)
            bounds = [0, *cuts, len(prompt)]
            for a, b in zip(bounds, bounds[1:]):
                for start, end in prefill_plan(a, b, 512):
                    batch.set_tokens(prompt[start:end], start, 0, logits_last=end == len(prompt))
                    ctx.decode(batch)
            return np.array(ctx.get_logits_ith(-1))

        reference = last_logits([])
        for cuts in ([len(prompt) - 2], [len(prompt) - 7], [2, 40], [101, 103], [len(prompt) // 2]):
            assert np.array_equal(last_logits(cuts), reference), cuts


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_without_flash_attention_chat_turns_decode_just_their_new_tokens(llm_no_flash, model_path, decoded):
    """The answer is read again as a prompt chunk once it is done, so the next turn decodes only
    its user message and the template's tokens around it, and still says what a fresh LLM says."""
    llm = llm_no_flash
    messages = [SYSTEM, {"role": "user", "content": "When does the bakery open?"}]
    n_previous = 0
    for turn in ["And the mill?", "Which one opens first?", "Thanks. And the school?"]:
        expected = fresh_no_flash(model_path, messages, chat=True)
        held = list(llm._seq.tokens) if llm._seq is not None else []
        decoded.clear()
        answer = llm.chat(messages).text
        llm._seq.settle(finish_reread=True)  # the answer's re-read, started as it ended, is done
        assert answer == expected
        prompt = llm.tokenize(llm.format_chat(messages), add_special=False, parse_special=True)
        keep = min(common_prefix(held, prompt), len(prompt) - 2)
        n_answer = len(llm._seq.tokens) - len(prompt)
        assert decoded == [len(prompt) - keep, n_answer]  # the new tokens, then the answer's re-read
        assert llm._seq.n_prefilled == len(llm._seq.tokens)  # all of it reusable now
        if n_previous:  # the previous answer came from the cache too
            assert keep > n_previous and len(prompt) - keep < TILED
        n_previous = len(prompt)
        messages = messages + [{"role": "assistant", "content": answer}, {"role": "user", "content": turn}]


def chat_tokens(llm, text):
    return llm.tokenize(text, add_special=False, parse_special=True)


def test_without_flash_attention_the_template_tokens_after_an_answer_are_read_with_it(
        llm_no_flash, model_path, decoded):
    """The chat template's end of turn and the next user turn's opening follow every answer: read
    with it, they leave the next turn only its user message and the assistant's opener to decode."""
    llm = llm_no_flash
    messages = [SYSTEM, {"role": "user", "content": "When does the bakery open?"}]
    answer = llm.chat(messages).text
    llm._seq.settle(finish_reread=True)
    held = list(llm._seq.tokens)
    assert held[-5:] == chat_tokens(llm, "<|im_end|>\n<|im_start|>user\n")
    messages = messages + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And the mill?"}]
    expected = fresh_no_flash(model_path, messages, chat=True)
    decoded.clear()
    assert llm.chat(messages).text == expected
    prompt = chat_tokens(llm, llm.format_chat(messages))
    assert prompt[:len(held)] == held
    assert decoded[0] == len(prompt) - len(held) == len(chat_tokens(
        llm, "And the mill?<|im_end|>\n<|im_start|>assistant\n"))


def test_without_flash_attention_a_follow_up_that_continues_otherwise_keeps_the_part_that_matches(
        llm_no_flash, model_path, decoded):
    """A system message after the answer, not a user one: the cache is kept up to the turn's
    opening marker, and the output is still a fresh LLM's."""
    llm = llm_no_flash
    messages = [SYSTEM, {"role": "user", "content": "When does the bakery open?"}]
    answer = llm.chat(messages).text
    llm._seq.settle(finish_reread=True)
    held = list(llm._seq.tokens)
    messages = messages + [{"role": "assistant", "content": answer},
                           {"role": "system", "content": "Answer in French."}]
    expected = fresh_no_flash(model_path, messages, chat=True)
    decoded.clear()
    assert llm.chat(messages).text == expected
    prompt = chat_tokens(llm, llm.format_chat(messages))
    kept = common_prefix(held, prompt)
    assert held[kept:] == chat_tokens(llm, "user\n") and kept == len(held) - 2
    assert decoded[0] == len(prompt) - kept


@pytest.mark.parametrize("holds", ["all", "some", "none"])
def test_a_reread_is_waited_for_by_a_prompt_that_holds_it_and_stopped_otherwise(llm_no_flash, holds):
    """A re-read that goes on until the C flag stops it or the test lets it end: settle() with
    a prompt that holds its tokens, or the first of them, lets it end; with another prompt it
    raises the flag, and lowers it again once the re-read has stopped (the caller's own decodes
    must run)."""
    import threading

    from cyllama_cffi._background import Job

    llm = llm_no_flash
    llm("The bakery")
    seq = llm._seq
    seq.settle(finish_reread=True)
    let_go = threading.Event()
    stopped_by_flag = []

    def reread():  # stands in for a long decode: it ends on the flag, as ggml does
        while not seq.ctx.cancel and not let_go.wait(0.01):
            pass
        stopped_by_flag.append(bool(seq.ctx.cancel))

    seq._reread_target, seq._reread_from = list(seq.tokens) + [11, 12], len(seq.tokens)
    helper = seq.start_helper()
    helper.submit(Job(reread))
    helper.stop()
    follows = holds != "none"
    prompt = {"all": seq._reread_target + [13, 14], "some": seq._reread_target[:-1] + [13, 14],
              "none": [15, 16, 17]}[holds]
    # follows: the re-read is let go after a moment; otherwise only a missing flag would leave
    # it running, until this timer ends the test's wait with a failure rather than a hang.
    let_go_timer = threading.Timer(0.2 if follows else 60.0, let_go.set)
    let_go_timer.start()
    seq.settle(prompt)
    let_go_timer.cancel()
    assert stopped_by_flag == [not follows]
    assert seq.ctx.cancel is False
    assert seq._helper is None and seq._reread_target is None
    assert llm(prompt="The bakery").text  # the context decodes again


def test_without_flash_attention_another_prompt_after_an_answer_matches_fresh(llm_no_flash, model_path):
    llm_no_flash.chat([SYSTEM, {"role": "user", "content": "Describe the market."}])
    other = "An unrelated question: what is two and two?"
    assert llm_no_flash(other).text == fresh_no_flash(model_path, other)


def test_without_flash_attention_save_state_waits_for_the_reread(llm_no_flash, model_path):
    llm = llm_no_flash
    messages = [SYSTEM, {"role": "user", "content": "Where is the chapel?"}]
    llm.chat(messages)
    data = llm.save_state()
    with LLM(model_path, config=NO_FLASH) as other:
        other.load_state(data)
        assert other._seq.n_prefilled == len(other._seq.tokens) > n_tokens(other, messages)


def test_without_flash_attention_a_retry_decodes_two_tokens(llm_no_flash, model_path, decoded):
    prompt = SYSTEM["content"] + " The chapel"
    first = llm_no_flash(prompt).text
    assert first == fresh_no_flash(model_path, prompt)
    llm_no_flash._seq.settle(finish_reread=True)  # the answer's re-read, started as it ended
    decoded.clear()
    assert llm_no_flash(prompt).text == first
    llm_no_flash._seq.settle(finish_reread=True)
    n_answer = len(llm_no_flash._seq.tokens) - len(llm_no_flash.tokenize(prompt))
    assert decoded == [2, n_answer]  # a lone last token would take the one-token path; the re-read


def test_without_flash_attention_cancel_mid_generation_then_next_turn_matches_fresh(llm_no_flash, model_path):
    messages = [SYSTEM, {"role": "user", "content": "Describe the market."}]
    chunks = []

    def cancel_at_two(chunk):
        chunks.append(chunk)
        if len(chunks) == 2:
            llm_no_flash.cancel()

    partial = "".join(llm_no_flash.stream(llm_no_flash.format_chat(messages), on_token=cancel_at_two))
    follow = messages + [{"role": "assistant", "content": partial}, {"role": "user", "content": "Go on."}]
    assert llm_no_flash.chat(follow).text == fresh_no_flash(model_path, follow, chat=True)
    assert llm_no_flash.chat(messages).text == fresh_no_flash(model_path, messages, chat=True)
