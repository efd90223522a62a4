"""Log-probabilities and logit bias in the multi-sequence engine, on the real model.

What is proven: a sequence made with ``logprobs=n`` keeps the entries ``LLM`` gives for the
same prompt and greedy config (the same tokens and top ids, log-probabilities within 1e-4: the
two read prompts in other chunks, whose sums differ in the last bits), alone and with other
sequences, sampled or not, running beside it; an entry is on record before its text goes out;
the end-of-generation token has none, the tokens of a stop sequence have theirs; no row of
logits is read when no sequence asks; a greedy chain with a logit bias is not taken for the
C argmax shortcut (the bias forces and bans); ``BatchGenerator`` fills ``Response.logprobs``.
"""

from __future__ import annotations

import math

import pytest

from cyllama_cffi import LLM, BatchGenerator, BatchRequest, FinishReason, GenerationConfig
from cyllama_cffi._engine import Engine, EngineSequence
from cyllama_cffi.chat_template import apply_chat_template
from cyllama_cffi.sampling import build_sampler

PROMPT = "The capital of France is"
GREEDY = GenerationConfig(temperature=0.0, max_tokens=12, logprobs=5)
NEIGHBOURS = ["Once upon a time, in a land far away,", "def fibonacci(n):", "List three colours:"]


@pytest.fixture(scope="module")
def llm(model_path):
    with LLM(model_path, n_ctx=512) as instance:
        yield instance


@pytest.fixture
def engine(model):
    instance = Engine(model, n_ctx=2048, n_seq_max=4, n_batch=72, n_ubatch=72)
    yield instance
    instance.close()


def sequence(engine, prompt, config=GREEDY, logprobs=None, **kwargs):
    tokens = engine.ctx.vocab.tokenize(prompt, add_special=True, parse_special=True)
    sampler = build_sampler(config, engine.ctx.vocab, engine.seq_capacity)
    return engine.add(EngineSequence(tokens, sampler, config.max_tokens, config.stop_sequences,
                                     logprobs=logprobs, **kwargs))


def assert_same_entries(got, expected):
    assert [e.token for e in got] == [e.token for e in expected]
    for mine, theirs in zip(got, expected):
        assert (mine.text, mine.piece) == (theirs.text, theirs.piece)
        assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-4)
        assert [t.token for t in mine.top] == [t.token for t in theirs.top]
        assert [t.logprob for t in mine.top] == pytest.approx([t.logprob for t in theirs.top], abs=1e-4)


def test_a_sequence_alone_has_the_entries_llm_gives(llm, engine):
    expected = llm(PROMPT, GREEDY).logprobs
    seq = sequence(engine, PROMPT, logprobs=5)
    engine.run()
    assert seq.finish_reason is FinishReason.LENGTH and len(seq.logprobs) == len(seq.generated) == 12
    assert_same_entries(seq.logprobs, expected)
    assert all(len(entry.top) == 5 and entry.top[0].token == entry.token for entry in seq.logprobs)


def test_neighbours_change_nothing_and_only_the_askers_get_entries(llm, engine):
    expected = llm(PROMPT, GREEDY).logprobs
    sampled = GREEDY.replace(temperature=0.9, seed=11, max_tokens=20)
    others = [sequence(engine, NEIGHBOURS[0], sampled, logprobs=3),
              sequence(engine, NEIGHBOURS[1], sampled),
              sequence(engine, NEIGHBOURS[2], GREEDY.replace(max_tokens=30))]
    engine.step()  # the neighbours' prompts are in; ours joins while they generate
    seq = sequence(engine, PROMPT, logprobs=5)
    engine.run()
    assert_same_entries(seq.logprobs, expected)
    assert [e.token for e in others[0].logprobs] == others[0].generated
    assert all(len(e.top) == 3 for e in others[0].logprobs)
    assert others[1].logprobs is None and others[2].logprobs is None


def test_entries_are_on_record_before_their_text_and_end_of_generation_has_none(engine):
    seen = []
    chat = apply_chat_template(engine.ctx.model, [{"role": "user", "content": "What is 2+2?"}])
    config = GREEDY.replace(max_tokens=60)
    seq = sequence(engine, chat, config, logprobs=0,
                   on_text=lambda text: seen.append((text, len(seq.logprobs), len(seq.generated))))
    engine.run()
    assert seq.finish_reason is FinishReason.STOP and seq.generated  # ended by the end-of-generation token
    assert all(n_entries == n_generated for _, n_entries, n_generated in seen)
    assert [e.token for e in seq.logprobs] == seq.generated
    assert not any(engine.ctx.vocab.is_eog(e.token) for e in seq.logprobs)
    assert all(e.top == () for e in seq.logprobs)  # logprobs=0: the token's own log-probability only
    assert b"".join(e.piece for e in seq.logprobs).decode() == "".join(text for text, _, _ in seen)


def test_the_tokens_of_a_stop_sequence_have_entries(engine):
    free = sequence(engine, PROMPT, logprobs=1)
    engine.run()
    stop = free.text[free.text.index(" ", 3):][:6]  # a stop sequence met a few tokens in
    seq = sequence(engine, PROMPT, GREEDY.replace(stop_sequences=[stop]), logprobs=1)
    engine.run()
    assert seq.finish_reason is FinishReason.STOP and stop not in seq.text
    assert [e.token for e in seq.logprobs] == seq.generated
    assert stop in b"".join(e.piece for e in seq.logprobs).decode()


def test_no_row_is_read_when_no_sequence_asks(engine, monkeypatch):
    def refuse(*args):
        raise AssertionError("the engine copied logits for sequences that did not ask for logprobs")

    monkeypatch.setattr(engine.ctx, "copy_logits", refuse)
    seqs = [sequence(engine, prompt, GREEDY.replace(max_tokens=6)) for prompt in [PROMPT] + NEIGHBOURS[:2]]
    engine.run()
    assert all(s.logprobs is None and len(s.generated) == 6 for s in seqs)
    assert engine._logits_row is None


def test_a_greedy_chain_with_a_bias_is_not_the_argmax_shortcut(engine):
    vocab = engine.ctx.vocab
    london = vocab.tokenize(" London", add_special=False)[0]
    forced = sequence(engine, PROMPT, GREEDY.replace(logit_bias={london: 100.0}, max_tokens=3), logprobs=2)
    paris_first = sequence(engine, PROMPT, GREEDY.replace(max_tokens=1))
    engine.run()
    assert forced.generated == [london] * 3
    # the entries describe the model: " London" is not what it found most likely
    assert forced.logprobs[0].top[0].token == paris_first.generated[0] != london
    assert forced.logprobs[0].logprob < forced.logprobs[0].top[0].logprob
    paris = paris_first.generated[0]
    banned = sequence(engine, PROMPT, GREEDY.replace(logit_bias={paris: -math.inf}, max_tokens=4))
    engine.run()
    assert banned.generated[0] != paris and paris not in banned.generated


def test_a_bad_logprobs_value_is_refused(engine):
    sampler = build_sampler(GREEDY, engine.ctx.vocab, engine.seq_capacity)
    try:
        for bad in (21, -1, True, 2.0):
            with pytest.raises(ValueError, match="logprobs must be None or an int between 0 and 20"):
                EngineSequence([1, 2], sampler, 4, logprobs=bad)
    finally:
        sampler.close()


def test_batch_generator_fills_the_responses_logprobs(llm, model_path):
    expected = llm(PROMPT, GREEDY).logprobs
    with BatchGenerator(model_path, n_ctx=1024, n_seq_max=4, batch_size=72) as generator:
        responses = generator.generate_batch([PROMPT, NEIGHBOURS[0]], GREEDY)
        detailed = generator.generate_batch_detailed([BatchRequest(0, PROMPT, max_tokens=12, temperature=0.0)],
                                                     GREEDY)
        plain = generator.generate_batch([PROMPT], GREEDY.replace(logprobs=None))
    assert_same_entries(responses[0].logprobs, expected)
    assert_same_entries(detailed[0].logprobs, expected)
    assert len(responses[1].logprobs) == responses[1].stats.generated_tokens
    assert responses[0].to_dict()["logprobs"][0]["token"] == expected[0].text
    assert plain[0].logprobs is None
