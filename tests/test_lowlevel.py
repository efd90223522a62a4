"""The thin low-level layer: load, tokenize, decode, sample, and refused inputs."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from cyllama_cffi._ffi import lib
from cyllama_cffi.lowlevel.batch import LlamaBatch
from cyllama_cffi.lowlevel.context import LlamaContext, usable_cores
from cyllama_cffi.errors import ClosedError, ContextBusyError, DecodeAborted, LoadCancelled
from cyllama_cffi.lowlevel.model import LlamaModel
from cyllama_cffi.lowlevel.sampler import LlamaSampler

PROMPT = "The capital of France is"


def greedy_continuation(model, prompt: str, n_tokens: int = 24, sampler=None) -> str:
    """Decode a prompt and sample with the low-level classes only."""
    vocab = model.vocab
    tokens = vocab.tokenize(prompt)
    with LlamaContext(model, n_ctx=256) as ctx, LlamaBatch(ctx.n_batch) as batch, \
            (sampler or LlamaSampler().add_greedy()) as sampler:
        batch.set_tokens(tokens, 0)
        ctx.decode(batch)
        out = []
        for pos in range(len(tokens), len(tokens) + n_tokens):
            token = sampler.sample(ctx)
            if vocab.is_eog(token):
                break
            out.append(token)
            batch.set_single(token, pos)
            ctx.decode(batch)
    return vocab.detokenize(out)


def test_model_properties(model):
    assert model.n_ctx_train == 8192
    assert model.vocab.n_tokens == 49152
    assert "llama" in model.description
    assert model.size > 50_000_000 and model.n_params > 100_000_000
    assert model.metadata["general.architecture"] == "llama"
    assert "message" in model.chat_template()
    assert model.meta("no.such.key") is None


def test_tokenize_detokenize(model):
    vocab = model.vocab
    tokens = vocab.tokenize(PROMPT, add_special=False)
    assert vocab.detokenize(tokens) == PROMPT
    assert "".join(vocab.token_to_piece(t) for t in tokens) == PROMPT


def test_greedy_generation_is_deterministic(model):
    first = greedy_continuation(model, PROMPT)
    second = greedy_continuation(model, PROMPT)
    assert first == second
    assert "Paris" in first


def test_greedy_fast_path_picks_what_llama_cpp_greedy_picks(model):
    """A chain of just "greedy" samples by the shim's argmax; a chain with a no-op stage in front
    (top-k 0) goes through llama_sampler_sample. Both must choose the same tokens."""
    def fast() -> LlamaSampler:
        return LlamaSampler().add_greedy()

    def slow() -> LlamaSampler:
        return LlamaSampler().add_top_k(0).add_greedy()

    assert fast().greedy_only and not slow().greedy_only
    prompts = [PROMPT, "Once upon a time, in a land far away,", "def fibonacci(n):", "1, 2, 3, 5, 8,"]
    for prompt in prompts:
        assert greedy_continuation(model, prompt, 48, fast()) == greedy_continuation(model, prompt, 48, slow())


def test_decode_token_picks_the_greedy_next_token_in_the_same_call(model):
    """decode_token with an argmax output decodes and chooses in one C call: the same token as
    llama.cpp's greedy sampler (through llama_sampler_sample) and numpy on the logits."""
    from cyllama_cffi._ffi import ffi

    tokens = model.vocab.tokenize(PROMPT)
    with LlamaContext(model, n_ctx=256) as ctx, LlamaBatch(ctx.n_batch) as batch, \
            LlamaSampler().add_top_k(0).add_greedy() as reference:
        batch.set_tokens(tokens, 0)
        ctx.decode(batch)
        token = reference.sample(ctx)
        chosen = ffi.new("int32_t *")
        for pos in range(len(tokens), len(tokens) + 24):
            chosen[0] = -7
            ctx.decode_token(batch, token, pos, chosen)
            expected = reference.sample(ctx)
            assert chosen[0] == expected == int(np.argmax(ctx.get_logits_ith(-1)))
            token = expected
        ctx.decode_token(batch, token, len(tokens) + 24)  # without the output: logits for any sampler
        assert ctx.has_logits(-1) and reference.sample(ctx) == int(np.argmax(ctx.get_logits_ith(-1)))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            ctx.decode_token(batch, model.vocab.n_tokens, 0)
    with pytest.raises(ClosedError):
        ctx.decode_token(batch, token, 0)


@pytest.mark.parametrize("values, expected", [
    ([1.0, 3.0, 3.0, 2.0], 1),                      # ties: the lowest id, like llama.cpp's greedy
    ([float("nan"), 1.0, 5.0, 5.0], 2),             # NaN is never chosen
    ([float("nan")] * 9, 0),                        # nothing but NaN: 0, as the greedy sampler
    ([float("-inf")] * 3, 0),
    (list(range(17)), 16),                          # a tail past the 8-wide lanes
    ([0.0] * 8 + [1.0] * 9, 8),
    ([-1e30] * 1000 + [-1e29] + [5.0] * 3, 1001),
])
def test_shim_argmax(values, expected):
    from cyllama_cffi._ffi import ffi, lib

    assert lib.cyl_argmax(ffi.new("float[]", values), len(values)) == expected


def test_shim_argmax_matches_numpy_on_random_logits():
    from cyllama_cffi._ffi import ffi, lib

    rng = np.random.default_rng(7)
    for size in (1, 7, 8, 9, 49152):
        for _ in range(20):
            values = rng.standard_normal(size).astype(np.float32)
            values[rng.integers(0, size)] = values.max()  # a tie now and then
            buffer = ffi.from_buffer("float[]", values)
            assert lib.cyl_argmax(buffer, size) == int(values.argmax())


def test_thread_count_defaults_to_usable_cores(model):
    with LlamaContext(model, n_ctx=64) as ctx:
        assert ctx.n_threads == usable_cores()


def test_logits_are_a_zero_copy_view(model):
    with LlamaContext(model, n_ctx=64) as ctx, LlamaBatch(64) as batch:
        batch.set_tokens(model.vocab.tokenize(PROMPT), 0)
        ctx.decode(batch)
        logits = ctx.get_logits_ith(-1)
        assert logits.shape == (model.vocab.n_tokens,)
        assert logits.base is not None  # a view on llama.cpp's buffer, no copy
        assert int(np.argmax(logits)) == LlamaSampler().add_greedy().sample(ctx)


# -- process killers refused with exceptions -----------------------------------------

def test_batch_larger_than_n_batch_is_refused(model):
    with LlamaContext(model, n_ctx=256, n_batch=32) as ctx, LlamaBatch(64) as batch:
        batch.set_tokens([1] * 40, 0)
        with pytest.raises(ValueError, match="n_batch"):
            ctx.decode(batch)


@pytest.mark.parametrize("bad", [-1, 49152, 10**9])
def test_out_of_vocabulary_ids_are_refused(model, bad):
    vocab = model.vocab
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.token_to_piece(bad)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.get_text(bad)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.detokenize([1, bad])
    with LlamaContext(model, n_ctx=64) as ctx, LlamaBatch(8) as batch:
        batch.set_single(bad, 0)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            ctx.decode(batch)
        batch.set_tokens([1, 2, bad], 0)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            ctx.decode(batch)


def test_sampling_without_logits_is_refused(model):
    sampler = LlamaSampler().add_greedy()
    with LlamaContext(model, n_ctx=64) as ctx, LlamaBatch(8) as batch:
        with pytest.raises(RuntimeError, match="no logits"):
            sampler.sample(ctx)  # before any decode
        batch.set_tokens([1, 2, 3], 0, logits_last=False)
        ctx.decode(batch)
        with pytest.raises(RuntimeError, match="no logits"):
            sampler.sample(ctx)  # decode without a logits row
        batch.set_tokens([1, 2, 3], 3)
        ctx.decode(batch)
        with pytest.raises(RuntimeError, match="no logits"):
            sampler.sample(ctx, 0)  # a row without the logits flag
        assert sampler.sample(ctx, 2) >= 0
        ctx.cancel = True
        batch.set_single(5, 6)
        with pytest.raises(DecodeAborted):
            ctx.decode(batch)
        with pytest.raises(RuntimeError, match="no logits"):
            sampler.sample(ctx)  # after a failed decode


def test_vocab_only_model_cannot_decode(model_path):
    with LlamaModel(model_path, vocab_only=True) as vocab_model:
        assert vocab_model.vocab.tokenize("hi")
        with pytest.raises(ValueError, match="vocab_only"):
            LlamaContext(vocab_model)


def test_empty_batch_is_refused(model):
    with LlamaContext(model, n_ctx=64) as ctx, LlamaBatch(8) as batch:
        with pytest.raises(ValueError, match="empty"):
            ctx.decode(batch)


def test_use_after_close_raises(model_path):
    model = LlamaModel(model_path)
    ctx = LlamaContext(model, n_ctx=64)
    sampler = LlamaSampler().add_greedy()
    batch = LlamaBatch(4)
    model.close()
    assert ctx.closed  # closing the model closed its context first
    with pytest.raises(ClosedError):
        model.vocab.tokenize("x")
    with pytest.raises(ClosedError):
        ctx.decode(batch)
    model.close()  # closing twice is fine
    sampler.close(); sampler.close()
    batch.close()
    with pytest.raises(ClosedError):
        batch.set_single(1, 0)


def test_concurrent_decode_on_one_context_is_refused(model):
    with LlamaContext(model, n_ctx=4096, n_batch=4096, n_ubatch=512) as ctx, LlamaBatch(4096) as batch:
        batch.set_tokens([100 + (i % 1000) for i in range(3000)], 0)
        started = threading.Event()
        errors = []

        def slow_abort_check():
            started.set()
            return False

        ctx.set_abort_callback(slow_abort_check)
        worker = threading.Thread(target=lambda: errors.append(_decode_or_error(ctx, batch)))
        worker.start()
        assert started.wait(30)
        with pytest.raises(ContextBusyError):
            ctx.decode(batch)
        with pytest.raises(ContextBusyError):  # the running decode reads the thread counts
            ctx.set_n_threads(1)
        worker.join()
        assert errors == [None]
        ctx.set_n_threads(1)
        assert ctx.n_threads == 1


def test_close_from_another_thread_aborts_and_waits_for_the_running_decode(model):
    """close() raises the abort flag, waits for llama_decode to return, then frees: the decoding
    thread sees DecodeAborted, never a freed context, and the context is closed afterwards."""
    ctx = LlamaContext(model, n_ctx=4096, n_batch=4096, n_ubatch=512)
    batch = LlamaBatch(4096)
    batch.set_tokens([100 + (i % 1000) for i in range(3000)], 0)
    inside = threading.Event()
    state = ctx._cancel_state  # a Python callback that also honours the C flag, to see "inside"
    ctx.set_abort_callback(lambda: inside.set() or bool(lib.cyl_cancel_get(state)))
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(_decode_or_error(ctx, batch)))
    worker.start()
    assert inside.wait(30)
    ctx.close()
    worker.join()
    assert isinstance(outcome[0], DecodeAborted) and ctx.closed
    with pytest.raises(ClosedError):
        ctx.cancel = True
    batch.close()


def test_close_with_a_timeout_leaks_rather_than_frees_under_a_decode(model, caplog):
    """A decode that ignores the abort (a backend without abort support, simulated by a callback
    that blocks) is not freed under: close(timeout) gives up, logs, and leaks the context."""
    ctx = LlamaContext(model, n_ctx=256, n_batch=256)
    batch = LlamaBatch(256)
    batch.set_tokens([100 + i for i in range(200)], 0)
    inside, release = threading.Event(), threading.Event()
    ctx.set_abort_callback(lambda: inside.set() or release.wait(30) and False)
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(_decode_or_error(ctx, batch)))
    worker.start()
    assert inside.wait(30)
    ctx.close(timeout=0.2)
    assert ctx.closed and "leaking its context" in caplog.text
    assert ctx._finalizer.alive is False  # detached: nothing will free it under the decode
    release.set()
    worker.join()
    assert outcome == [None]  # the decode finished normally on the leaked context


def _decode_or_error(ctx, batch):
    try:
        ctx.decode(batch)
        return None
    except Exception as error:  # pragma: no cover - reported through the list
        return error


def test_bad_grammar_is_a_value_error(model):
    with pytest.raises(ValueError, match="grammar"):
        LlamaSampler().add_grammar(model.vocab, "root ::= (")


def test_grammar_constrains_output(model):
    sampler = LlamaSampler().add_grammar(model.vocab, 'root ::= "yes" | "no"').add_greedy()
    assert greedy_continuation(model, "Is the sky blue? Answer:", 8, sampler) in ("yes", "no")


def test_model_load_reports_progress(model_path):
    seen = []
    with LlamaModel(model_path, progress_callback=seen.append):
        pass
    assert seen and seen[-1] == pytest.approx(1.0)
    assert seen == sorted(seen)


def test_model_load_can_be_cancelled(model_path):
    with pytest.raises(LoadCancelled, match="cancelled"):
        LlamaModel(model_path, progress_callback=lambda progress: False)
    event = threading.Event()
    event.set()
    with pytest.raises(LoadCancelled):
        LlamaModel(model_path, cancel_event=event)


def test_progress_callback_errors_propagate(model_path):
    def broken(progress):
        raise KeyError("from the callback")

    with pytest.raises(KeyError, match="from the callback"):
        LlamaModel(model_path, progress_callback=broken)


def test_kv_memory_helpers(model):
    with LlamaContext(model, n_ctx=64) as ctx, LlamaBatch(16) as batch:
        assert ctx.memory_seq_pos_max(0) == -1
        batch.set_tokens(model.vocab.tokenize(PROMPT), 0)
        ctx.decode(batch)
        n = len(model.vocab.tokenize(PROMPT))
        assert (ctx.memory_seq_pos_min(0), ctx.memory_seq_pos_max(0)) == (0, n - 1)
        assert ctx.memory_seq_rm(0, 2, -1)
        assert ctx.memory_seq_pos_max(0) == 1
        ctx.memory_clear()
        assert ctx.memory_seq_pos_max(0) == -1
