"""The engine's prefix affinity (``keep_prefixes``) and its prompt chunks, on the real model.

What is proven: a finished sequence's cells stay in its sequence id; a prompt that extends them
gets that id and decodes only its new tokens, with the same greedy text as a fresh engine; a
repeated prompt decodes its last two tokens again and gets a fresh engine's logits; a cancelled sequence leaves nothing behind; without ``keep_prefixes`` nothing is kept;
a prompt's chunks are those of its plan (``prefill_plan``) whatever else the step holds. A unified cache still gives
each sequence only its share of the cells.
"""

from __future__ import annotations

import pytest

from cyllama_cffi import GenerationConfig
from cyllama_cffi._engine import Engine, EngineSequence
from cyllama_cffi._sequence import prefill_plan
from cyllama_cffi.sampling import build_sampler

GREEDY = GenerationConfig(temperature=0.0, max_tokens=16)


@pytest.fixture
def make(model):
    engines = []

    def build(**kwargs):
        engine = Engine(model, n_ctx=2048, n_seq_max=2, n_batch=72, n_ubatch=72, **kwargs)
        engines.append(engine)
        return engine

    yield build
    for engine in engines:
        engine.close()


def sequence(engine, tokens, max_tokens=16):
    return EngineSequence(tokens, build_sampler(GREEDY.replace(max_tokens=max_tokens), engine.ctx.vocab,
                                                engine.seq_capacity), max_tokens)


def count_rows(engine, monkeypatch):
    """The row count of each step ``engine`` decodes from now on, in a list that grows."""
    rows = []
    original = engine.ctx.decode_rows

    def counting(batch, n_rows, *args):
        rows.append(n_rows)
        return original(batch, n_rows, *args)

    monkeypatch.setattr(engine.ctx, "decode_rows", counting)
    return rows


def run(engine, tokens, max_tokens=16):
    seq = engine.add(sequence(engine, tokens, max_tokens))
    engine.run()
    return seq


def test_a_prompt_extending_a_finished_sequence_decodes_only_its_new_tokens(model, make):
    vocab = model.vocab
    engine = make(keep_prefixes=True, prompt_budget=64)
    first = run(engine, vocab.tokenize("Once upon a time, in a land far away,", add_special=True))
    run(engine, vocab.tokenize("The capital of France is", add_special=True))  # the other id
    follow = vocab.tokenize("Once upon a time, in a land far away," + first.text + " Then", add_special=True)
    second = run(engine, follow)
    assert second.seq_id == first.seq_id
    # the prompt and (as far as the text tokenizes the same again) the answer were in the cells
    assert len(first.prompt) < second.n_reused <= len(first.cached)
    assert second.n_reused == next(i for i, (a, b) in enumerate(zip(first.cached + [-1], follow)) if a != b)
    fresh = run(make(prompt_budget=64), follow)
    assert fresh.n_reused == 0 and second.text == fresh.text


def test_a_repeated_prompt_decodes_its_last_two_tokens_and_gets_a_fresh_engines_logits(model, make):
    # A lone token takes other kernels than a chunk: on some CPUs its logits differ by
    # hundredths. Two tokens or more, without flash attention, get the sums of a fresh read.
    engine = make(keep_prefixes=True, prompt_budget=16, flash_attn=False)
    prompt = model.vocab.tokenize("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                  "<|im_start|>assistant\n", add_special=False, parse_special=True)

    def generate():
        seq = engine.add(EngineSequence(prompt, build_sampler(GREEDY, model.vocab, engine.seq_capacity), 16,
                                        logprobs=3))
        engine.run()
        return seq

    first, again = generate(), generate()
    assert again.seq_id == first.seq_id and (first.n_reused, again.n_reused) == (0, len(prompt) - 2)
    assert again.generated == first.generated
    assert [(e.logprob, [t.logprob for t in e.top]) for e in again.logprobs] == \
           [(e.logprob, [t.logprob for t in e.top]) for e in first.logprobs]


def test_cancelled_sequences_and_plain_engines_keep_nothing(model, make):
    vocab = model.vocab
    prompt = vocab.tokenize("Water boils at", add_special=True)
    engine = make(keep_prefixes=True)
    seq = engine.add(sequence(engine, prompt))
    engine.step()
    seq.cancel()
    engine.step()
    assert seq.finish_reason == "cancelled"
    assert run(engine, prompt).n_reused == 0
    plain = make()
    run(plain, prompt)
    assert run(plain, prompt).n_reused == 0


def test_prompt_chunks_follow_the_plan_whatever_else_the_step_holds(model, make, monkeypatch):
    vocab = model.vocab
    engine = make(prompt_budget=64)
    rows = count_rows(engine, monkeypatch)
    short = vocab.tokenize("The capital of France is", add_special=True)
    long = vocab.tokenize("Tell me a story. " * 20, add_special=True)
    assert 64 < len(long) < 128
    engine.add(sequence(engine, short))
    engine.add(sequence(engine, long))
    engine.run()
    plan = [end - start for start, end in prefill_plan(0, len(long), 64)]
    assert len(plan) == 2 and abs(plan[0] - plan[1]) <= 1  # even chunks of at most 64
    # Step 1: the short prompt and the long one's first chunk; step 2: the short one's token
    # and the long one's second chunk, not cut by the row the short one takes.
    assert rows[:2] == [len(short) + plan[0], 1 + plan[1]]


def test_without_flash_attention_a_step_nobody_waits_for_reads_whole_chunks_as_the_batch_holds(model, make,
                                                                                                 monkeypatch):
    """flash_attn=False: the budget holds only while a sequence generates; alone, a prompt is read
    in as few steps as the batch allows, and the text is that of a read in budget-sized chunks."""
    vocab = model.vocab
    long = vocab.tokenize("Tell me a story. " * 13, add_special=True)
    assert 48 < len(long) <= 72
    chunked = make(prompt_budget=16, flash_attn=False)
    rows = count_rows(chunked, monkeypatch)
    alone = run(chunked, long)
    assert rows[0] == len(long)  # the whole prompt in the first step: no sequence was waiting
    # Beside a generating sequence the same prompt is read 16 tokens a step; same text.
    rows.clear()
    first = chunked.add(sequence(chunked, vocab.tokenize("Count: 1, 2, 3,", add_special=True), max_tokens=40))
    chunked.step()
    beside = chunked.add(sequence(chunked, long))
    chunked.run()
    assert max(rows[1:5]) <= 16 + 1 and beside.text == alone.text and first.finished


def test_step_time_lets_steps_beside_generating_sequences_read_more_chunks_while_they_stay_short(model, make,
                                                                                                   monkeypatch):
    """With a step time no step reaches, the prompt rows beside a generating sequence double
    each step, in whole chunks of the plan (7 or 8 tokens); without one they stay within the budget.
    Same text either way."""
    vocab = model.vocab
    long = vocab.tokenize("Tell me a story. " * 13, add_special=True)
    texts = []
    for step_time, expected in ((None, [8, 8, 8]), (60.0, [8, 16, 28])):
        engine = make(prompt_budget=8, flash_attn=False, step_time=step_time)
        rows = count_rows(engine, monkeypatch)
        first = engine.add(sequence(engine, vocab.tokenize("Count: 1, 2, 3,", add_special=True), max_tokens=40))
        engine.step()
        beside = engine.add(sequence(engine, long))
        engine.run()
        assert [n - 1 for n in rows[1:4]] == expected, rows  # each step: the counting token + prompt rows
        texts.append(beside.text)
    assert texts[0] == texts[1]


def test_a_unified_cache_gives_each_sequence_its_share_so_steps_never_find_it_full(model):
    """With one cache for all sequences, a sequence that could grow into every free cell would
    leave the next one none (or a kept prefix would): each holds at most its share, as with
    split caches, so kept and running sequences together always fit."""
    vocab = model.vocab
    engine = Engine(model, n_ctx=256, n_seq_max=2, n_batch=64, n_ubatch=64, kv_unified=True, keep_prefixes=True)
    try:
        assert engine.seq_capacity == engine.ctx.n_ctx // 2
        never_end = GREEDY.replace(max_tokens=10_000, logit_bias={token: float("-inf") for token in range(len(vocab))
                                                                  if vocab.is_eog(token)})

        def endless(text):
            tokens = vocab.tokenize(text, add_special=True)
            return EngineSequence(tokens, build_sampler(never_end, vocab, engine.seq_capacity), 10_000)

        first = engine.add(endless("Once upon a time"))
        engine.run()  # kept: its cells stay behind
        second, third = engine.add(endless("The capital of France is")), engine.add(endless("Water boils at"))
        engine.run()
        for seq in (first, second, third):
            assert seq.finish_reason == "length" and len(seq.cached) == engine.seq_capacity
    finally:
        engine.close()


def test_pacing_scales_only_the_prompt_rows_share_of_a_step(make):
    """A step of 100 prompt rows beside generated tokens took 350 ms against a 200 ms step
    time, and a step of generated tokens alone takes 50 ms: the rows' own 300 ms must become
    150, so 50 rows (scaling the whole step would give 57, and steps would settle above 200 ms)."""
    engine = make(prompt_budget=8, flash_attn=False, step_time=0.2)
    engine._tokens_only_time = 0.05
    engine._pace(100, 0.35)
    assert engine._prompt_rows == 50
    engine._pace(20, 0.14)  # the rows' 90 ms may grow to 150 ms: 33 rows (not 28)
    assert engine._prompt_rows == 33
