"""Misuse of the API that must end in a clean Python exception, never a crash.

Each case runs inside a ``crashproof`` worker child (a crash would otherwise
take pytest down) and asserts, in the child, the exact exception it expects;
``test_robustness.py`` then only checks that every case reported success.
A case gets the model path to use (the tiny SentencePiece model or the
default BPE model: tokenizer paths differ).
"""

from __future__ import annotations

import gc
import re
from typing import Any, Callable, Dict, Optional, Tuple, Type, Union

from cyllama_cffi import (LLM, ClosedError, GenerationConfig, LlamaBatch, LlamaContext, LlamaModel, LlamaSampler,
                          LlamaError)

Case = Callable[[str], Any]
CASES: Dict[str, Case] = {}
Expected = Union[Type[BaseException], Tuple[Type[BaseException], ...]]


def case(function: Case) -> Case:
    """Register a case under its function name."""
    CASES[function.__name__] = function
    return function


def expect(expected: Expected, function: Callable[..., Any], *args: Any, match: Optional[str] = None,
           **kwargs: Any) -> BaseException:
    """Call ``function`` and assert it raises ``expected`` (and ``match`` is in its message)."""
    try:
        function(*args, **kwargs)
    except expected as error:
        if match is not None:
            assert re.search(match, str(error)), f"{error!r} does not match {match!r}"
        return error
    raise AssertionError(f"{getattr(function, '__name__', function)}{args} did not raise {expected}")


def _llm(path: str, **overrides: Any) -> LLM:
    settings = dict(temperature=0.0, max_tokens=4, n_threads=1)
    settings.update(overrides)
    return LLM(path, **settings)


def _usable(llm: LLM) -> None:
    """After a refused call the LLM still generates."""
    response = llm("the cat sat", config=llm.config.replace(max_tokens=2))
    assert response.finish_reason in ("stop", "length"), response.finish_reason


# -- prompts ---------------------------------------------------------------------------------

@case
def prompt_longer_than_explicit_n_ctx(path: str) -> None:
    with _llm(path) as llm:
        expect(ValueError, llm, "the cat sat on the mat " * 100, config=llm.config.replace(n_ctx=64),
               match=r"prompt has \d+ tokens but the context holds 64")
        _usable(llm)


@case
def prompt_longer_than_trained_context(path: str) -> None:
    with _llm(path) as llm:
        n_train = llm.model.n_ctx_train
        prompt = "the cat sat on the mat " * (n_train // 4 + 10)
        assert len(llm.tokenize(prompt)) > n_train
        expect(ValueError, llm, prompt, match="but the context holds")
        _usable(llm)


@case
def prompt_exactly_filling_the_context(path: str) -> None:
    with _llm(path) as llm:
        config = llm.config.replace(n_ctx=32, max_tokens=50)
        tokens = llm.tokenize("a b c d e f g h i j k l m n o p q r s t u v w x y z a b c d e f g h")
        prompt = llm.detokenize(tokens[1:31])  # 30 text tokens + BOS = 31 of 32 positions
        n_prompt = len(llm.tokenize(prompt))
        if n_prompt >= 32:
            expect(ValueError, llm, prompt, config=config)
        else:
            response = llm(prompt, config=config)
            assert response.finish_reason in ("stop", "length")


@case
def empty_and_non_text_prompts(path: str) -> None:
    with _llm(path) as llm:
        expect(ValueError, llm, "", match="empty")
        for bad in (None, b"the cat", 42, ["the"]):
            expect(TypeError, llm, bad)
        expect(TypeError, llm, "the cat", config={"max_tokens": 2})
        _usable(llm)


@case
def prompt_that_tokenizes_to_nothing(path: str) -> None:
    with _llm(path, add_bos=False) as llm:
        # SmolLM2's BPE vocabulary has no token for U+0004; a SentencePiece
        # vocabulary with byte tokens has one, so there it generates.
        if llm.tokenize("\x04", add_special=False):
            assert llm("\x04").finish_reason in ("stop", "length")
        else:
            expect(ValueError, llm, "\x04", match="no tokens")
        _usable(llm)


# -- token ids outside the vocabulary -------------------------------------------------------

_BAD_IDS = (-1, -(2 ** 31), 2 ** 31 - 1, 2 ** 31, 2 ** 63, -(2 ** 63) - 1)


@case
def out_of_vocabulary_ids_in_the_vocab(path: str) -> None:
    with LlamaModel(path) as model:
        vocab = model.vocab
        for bad in _BAD_IDS + (vocab.n_tokens, vocab.n_tokens + 1):
            for method in (vocab.token_to_piece, vocab.token_to_bytes, vocab.get_text, vocab.get_score,
                           vocab.is_eog, vocab.is_control):
                expect(ValueError, method, bad, match="outside the vocabulary")
            expect(ValueError, vocab.detokenize, [1, bad], match="outside the vocabulary")
            expect(ValueError, vocab.detokenize_bytes, [bad])
        assert vocab.detokenize([]) == ""


@case
def out_of_vocabulary_ids_in_llm_detokenize(path: str) -> None:
    with _llm(path) as llm:
        for bad in (-5, llm.vocab.n_tokens, 10 ** 12):
            expect(ValueError, llm.detokenize, [bad], match="outside the vocabulary")
        _usable(llm)


@case
def out_of_vocabulary_ids_in_decode(path: str) -> None:
    with LlamaModel(path) as model, LlamaContext(model, n_ctx=64, n_threads=1) as ctx, LlamaBatch(8) as batch:
        n_vocab = model.vocab.n_tokens
        for bad in (-1, n_vocab, 2 ** 31 - 1, -(2 ** 31)):
            batch.set_single(bad, 0)
            expect(ValueError, ctx.decode, batch, match="outside the vocabulary")
            batch.set_tokens([1, 2, bad], 0)
            expect(ValueError, ctx.decode, batch, match="outside the vocabulary")
        for huge in (2 ** 31, 2 ** 40, -(2 ** 31) - 1):
            expect(ValueError, batch.set_tokens, [1, huge], 0)  # does not fit llama_token (int32)
            expect(OverflowError, batch.set_single, huge, 0)
        batch.set_tokens([1, 2, 3], 0)
        ctx.decode(batch)  # still works


@case
def out_of_range_sequence_ids_and_positions(path: str) -> None:
    with LlamaModel(path) as model, LlamaContext(model, n_ctx=64, n_threads=1) as ctx, LlamaBatch(8) as batch:
        batch.add(1, 0, seq_ids=(0,), logits=True)
        ctx.decode(batch)
        for seq in (1, 5, 1000):  # the context was made for one sequence
            batch.clear()
            batch.add(2, 1, seq_ids=(seq,), logits=True)
            expect((ValueError, LlamaError), ctx.decode, batch)
        batch.clear()
        batch.add(2, -7, logits=True)
        expect((ValueError, LlamaError), ctx.decode, batch)
        expect(ValueError, batch.add, 3, 1, seq_ids=())
        expect(ValueError, batch.add, 3, 1, seq_ids=(0, 1))  # more sequences than the batch has room for


@case
def sampling_rows_that_have_no_logits(path: str) -> None:
    with LlamaModel(path) as model, LlamaContext(model, n_ctx=64, n_threads=1) as ctx, LlamaBatch(8) as batch, \
            LlamaSampler() as sampler:
        expect(RuntimeError, sampler.sample, ctx)  # empty chain, no decode yet
        sampler.add_greedy()
        batch.set_tokens([1, 2, 3], 0)
        ctx.decode(batch)
        for index in (0, 1, 3, 7, 10 ** 6, -2):
            expect(RuntimeError, sampler.sample, ctx, index, match="no logits")
            expect(RuntimeError, ctx.get_logits_ith, index)
        assert 0 <= sampler.sample(ctx, 2) < model.vocab.n_tokens


# -- text that is not valid UTF-8 ------------------------------------------------------------

_INVALID_UTF8 = (b"\xff", b"\xc3", b"abc\x80def", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82")
_SURROGATES = ("\ud800", "a\udcffb", "\udfff\ud800")


@case
def invalid_utf8_bytes_to_tokenize(path: str) -> None:
    with LlamaModel(path) as model:
        vocab = model.vocab
        for data in _INVALID_UTF8:
            expect(UnicodeDecodeError, vocab.tokenize, data)
        assert vocab.tokenize(b"the cat", add_special=False) == vocab.tokenize("the cat", add_special=False)


@case
def lone_surrogates_where_text_is_expected(path: str) -> None:
    with _llm(path) as llm:
        for text in _SURROGATES:
            expect(UnicodeEncodeError, llm, text)
            expect(UnicodeEncodeError, llm.tokenize, text)
            expect(UnicodeEncodeError, llm.model.meta, text)
            # a stop sequence is only compared with decoded text: it never matches, nothing breaks
            stopped = llm("the cat", config=llm.config.replace(stop_sequences=[text]))
            assert stopped.finish_reason in ("stop", "length")
        _usable(llm)


@case
def lone_surrogates_in_chat_messages_and_grammars(path: str) -> None:
    with _llm(path) as llm:
        surrogate = [{"role": "user", "content": "\ud800"}]
        expect(UnicodeEncodeError, llm.chat, surrogate)  # Jinja renders it; the tokenizer refuses it
        expect(UnicodeEncodeError, llm.format_chat, surrogate, template="chatml")  # llama.cpp's engine refuses it
        expect(UnicodeEncodeError, LlamaSampler().add_grammar, llm.vocab, 'root ::= "\ud800"')
        expect(ValueError, LlamaSampler().add_grammar, llm.vocab, 'root ::= "\xff')  # unterminated
        _usable(llm)


@case
def detokenizing_partial_utf8_gives_replacement_characters(path: str) -> None:
    with LlamaModel(path) as model:
        vocab = model.vocab
        raw = b"\xe2\x82\xac"  # the euro sign, cut into tokens that may split it
        tokens = vocab.tokenize(raw.decode(), add_special=False)
        for cut in range(len(tokens) + 1):
            text = vocab.detokenize(tokens[:cut])
            assert isinstance(text, str)
            data = vocab.detokenize_bytes(tokens[:cut])
            assert raw.startswith(data) or "\ufffd" in data.decode("utf-8", "replace") or data.strip() == raw


# -- absurd configuration values ---------------------------------------------------------------

_ABSURD_CONFIG = {
    "max_tokens": (-1, 2.5, "10", None, True), "temperature": (-1.0, float("nan"), float("inf"), "hot"),
    "top_k": (-1, 1.5, 2 ** 31), "top_p": (-0.1, 1.01, float("nan")), "min_p": (2.0, float("-inf")),
    "repeat_penalty": (-1.0, float("nan")), "penalty_last_n": (-2, 1.5, 2 ** 31, 10 ** 30),
    "frequency_penalty": (float("nan"), -1.0), "presence_penalty": (float("inf"),),
    "dry_multiplier": (-1.0, float("nan")), "dry_base": (-0.5, float("inf")), "dry_allowed_length": (-1, 2 ** 31),
    "dry_penalty_last_n": (-2, 2 ** 31), "dry_sequence_breakers": ("\n", [None], ["a\0"]),
    "top_n_sigma": (float("nan"), "1"), "mirostat": (3, -1, 1.0),
    "mirostat_tau": (0.0, float("nan")), "mirostat_eta": (-1.0,), "n_gpu_layers": (-2, 1.5, 2 ** 31),
    "main_gpu": (-1, 2 ** 31), "split_mode": (3, -1), "tensor_split": ([float("nan")], [-1.0], "1,2", [1e400]),
    "n_ctx": (0, -1, 2 ** 31, 2 ** 64, 4096.0), "n_batch": (0, -1, 2 ** 31), "n_ubatch": (0, 2 ** 40),
    "seed": (-2, 2 ** 32, 2 ** 64, 1.5), "stop_sequences": ("stop", [b"x"], [None]),
    "add_bos": (1, "yes"), "parse_special": (0,), "n_threads": (0, -1, 10 ** 6, 2.0),
}


@case
def absurd_generation_config_values(path: str) -> None:
    for field, values in _ABSURD_CONFIG.items():
        for value in values:
            expect(ValueError, GenerationConfig, **{field: value}, match="Invalid GenerationConfig")
    expect(TypeError, GenerationConfig().replace, no_such_field=1)
    expect(TypeError, LLM, path, no_such_field=1)
    expect(ValueError, LLM, path, n_ctx=-5)
    # int32 fields are refused when the config is made, not later when the sampler is built
    with _llm(path) as llm:
        expect(ValueError, llm.config.replace, penalty_last_n=10 ** 30, match="penalty_last_n")
        _usable(llm)


@case
def model_level_settings_cannot_change_per_call(path: str) -> None:
    with _llm(path) as llm:
        expect(ValueError, llm, "the cat", config=llm.config.replace(n_gpu_layers=0),
               match="can only be set when the LLM is created")
        _usable(llm)


@case
def absurd_low_level_values(path: str) -> None:
    with LlamaModel(path) as model:
        for kwargs in ({"n_ctx": -1}, {"n_batch": 0}, {"n_ubatch": 0}, {"n_batch": -5},
                       {"n_threads": 0}, {"n_threads": -3}, {"n_threads_batch": 0}):
            expect(ValueError, LlamaContext, model, **kwargs)
        for kwargs in ({"n_ctx": 2 ** 32}, {"n_batch": 2 ** 32}, {"n_seq_max": -1}, {"n_threads": 2 ** 31}):
            expect((OverflowError, ValueError), LlamaContext, model, **kwargs)
        expect((ValueError, LlamaError), LlamaContext, model, n_ctx=64, n_seq_max=100000)
        for capacity in (0, -1):
            expect(ValueError, LlamaBatch, capacity)
        expect(OverflowError, LlamaBatch, 2 ** 31)
        expect(ValueError, LlamaBatch, 4, n_seq_max=0)
        with LlamaContext(model, n_ctx=64, n_batch=4, n_threads=1) as ctx, LlamaBatch(16) as batch:
            batch.set_tokens(list(range(1, 10)), 0)
            expect(ValueError, ctx.decode, batch, match="n_batch")
            expect(ValueError, batch.set_tokens, list(range(1, 20)), 0)
            expect(ValueError, ctx.set_n_threads, 0)
            expect(ValueError, ctx.set_n_threads, 1, -1)
        expect(ValueError, LlamaSampler().add_penalties, 64, 0.0)
        expect(ValueError, LlamaSampler().add_penalties, 2 ** 30, 1.1)  # a window llama.cpp cannot allocate
        for args in ((1.0, 1.75, 2, 2 ** 30), (float("nan"),), ("1",), (1.0, 1.75, 2.5), (1.0, 1.75, 2, -1, "\n"),
                     (1.0, 1.75, 2, -1, ["a\0"]), (1.0, 1.75, 2 ** 31)):
            expect(ValueError, LlamaSampler().add_dry, model.vocab, *args)
        expect(ValueError, LlamaModel, path, tensor_split=[1.0] * 1000)


@case
def generation_with_extreme_but_valid_sampling_values(path: str) -> None:
    """Values GenerationConfig accepts that llama.cpp's samplers take to infinities: no crash, text out."""
    with _llm(path, max_tokens=24, seed=3) as llm:
        for overrides in ({"repeat_penalty": 0.0, "penalty_last_n": -1}, {"repeat_penalty": 1e-6},
                          {"dry_multiplier": 1e30, "dry_base": 1e30, "dry_allowed_length": 0},
                          {"dry_multiplier": 5.0, "dry_penalty_last_n": 1, "dry_sequence_breakers": []},
                          {"top_n_sigma": 1e-9}, {"top_n_sigma": 1e30}, {"frequency_penalty": 1e30}):
            for temperature in (0.0, 0.8):
                response = llm("the cat the cat the cat", config=llm.config.replace(temperature=temperature, **overrides))
                assert response.finish_reason in ("stop", "length") and isinstance(response.text, str)
        one_token = llm.tokenize("the", add_special=False)[:1]
        for n_ctx in range(2, 8):  # llama.cpp pads such a context to 256 cells and caps n_batch at n_ctx
            response = llm(one_token, config=llm.config.replace(n_ctx=n_ctx, max_tokens=50))
            generated = response.stats.generated_tokens
            assert generated == n_ctx if response.finish_reason == "length" else generated < n_ctx


@case
def sampler_with_absurd_parameters_still_samples(path: str) -> None:
    with LlamaModel(path) as model, LlamaContext(model, n_ctx=64, n_threads=1) as ctx, LlamaBatch(8) as batch:
        batch.set_tokens([1, 2, 3], 0)
        ctx.decode(batch)
        chains = [
            LlamaSampler().add_top_k(-5).add_top_p(float("nan")).add_min_p(7.0).add_temp(float("inf")).add_dist(1),
            LlamaSampler().add_top_k(10 ** 9).add_top_p(-1.0).add_temp(-3.0).add_dist(2 ** 40),
            LlamaSampler().add_mirostat(0, tau=float("nan"), eta=-1.0, m=0),
            LlamaSampler().add_mirostat_v2(tau=-5.0, eta=float("inf")),
            LlamaSampler().add_typical(float("nan")).add_penalties(-7, 1e30, float("nan"), -1e30).add_greedy(),
        ]
        for chain in chains:
            with chain:
                token = chain.sample(ctx)
                assert isinstance(token, int)


# -- after close(), and closing twice -----------------------------------------------------------

@case
def llm_after_close(path: str) -> None:
    llm = _llm(path)
    llm("the cat")
    llm.close()  # frees the context; the model stays
    llm.close()
    llm.reset_context()
    _usable(llm)
    with llm:
        pass  # leaving the block frees the model too
    for call in (lambda: llm("the cat"), lambda: llm.stream("the cat"), lambda: llm.generate("x"),
                 lambda: llm.generate_with_stats("x"), lambda: llm.tokenize("x"), lambda: llm.detokenize([1]),
                 lambda: llm.format_chat([{"role": "user", "content": "x"}]),
                 lambda: llm.chat([{"role": "user", "content": "x"}]), lambda: llm.get_chat_template()):
        expect((ClosedError, ValueError), call)
    llm.cancel()  # harmless after close
    assert llm.cancel_requested
    llm.close()
    llm.reset_context()
    with llm:  # the context manager on a released LLM only closes again
        pass


@case
def model_after_close(path: str) -> None:
    model = LlamaModel(path)
    vocab = model.vocab
    model.close()
    model.close()
    for call in (lambda: vocab.tokenize("x"), lambda: vocab.detokenize([1]), lambda: vocab.token_to_piece(1),
                 lambda: vocab.bos, lambda: model.n_ctx_train, lambda: model.metadata, lambda: model.meta("x"),
                 lambda: model.description, lambda: model.chat_template(), lambda: model.n_params,
                 lambda: LlamaContext(model), lambda: LlamaSampler().add_grammar(vocab, 'root ::= "a"')):
        expect(ClosedError, call)
    assert "closed" in repr(model)


@case
def context_sampler_batch_after_close(path: str) -> None:
    with LlamaModel(path) as model:
        ctx = LlamaContext(model, n_ctx=64, n_threads=1)
        batch = LlamaBatch(8)
        sampler = LlamaSampler().add_greedy()
        batch.set_tokens([1, 2, 3], 0)
        ctx.decode(batch)
        ctx.close()
        ctx.close()
        for call in (lambda: ctx.decode(batch), lambda: ctx.get_logits_ith(-1), lambda: ctx.memory_clear(),
                     lambda: ctx.memory_seq_rm(0), lambda: ctx.memory_seq_pos_max(0), lambda: ctx.n_threads,
                     lambda: ctx.set_n_threads(1), lambda: ctx.set_abort_callback(lambda: False),
                     lambda: sampler.sample(ctx)):
            expect((ClosedError, RuntimeError), call)
        sampler.close()
        sampler.close()
        for call in (lambda: sampler.accept(1), lambda: sampler.reset(), lambda: sampler.add_greedy()):
            expect(ClosedError, call)
        batch.close()
        batch.close()
        for call in (lambda: batch.set_single(1, 0), lambda: batch.set_tokens([1], 0), lambda: batch.n_tokens,
                     lambda: batch.add(1, 0), lambda: batch.token_list(), lambda: batch.clear()):
            expect(ClosedError, call)


@case
def closing_in_every_order(path: str) -> None:
    for order in ("model_first", "context_first", "gc_only"):
        model = LlamaModel(path)
        ctx = LlamaContext(model, n_ctx=64, n_threads=1)
        grammar = LlamaSampler().add_grammar(model.vocab, 'root ::= "a"').add_greedy()
        batch = LlamaBatch(4)
        if order == "model_first":
            model.close()  # closes the context and the grammar sampler first
            assert ctx.closed and grammar.closed
            ctx.close()
            grammar.close()
        elif order == "context_first":
            ctx.close()
            grammar.close()
            model.close()
        del model, ctx, grammar, batch
        gc.collect()


@case
def stream_after_close(path: str) -> None:
    llm = _llm(path, max_tokens=50)
    stream = llm.stream("the cat")
    next(stream)
    stream.close()
    stream.close()
    assert list(stream) == [] and stream.finish_reason == "cancelled"
    _usable(llm)
    llm.close()


@case
def sampler_accept_of_out_of_vocabulary_ids(path: str) -> None:
    with LlamaModel(path) as model:
        for sampler in (LlamaSampler().add_greedy(), LlamaSampler().add_penalties(64, 1.2).add_greedy()):
            with sampler:
                for bad in (-1, model.vocab.n_tokens, 10 ** 9):
                    sampler.accept(bad)  # no vocabulary lookup in these samplers
                    sampler.reset()


# -- use after close, and ids a grammar would look up -------------------------------------------

@case
def context_cancel_flag_after_close(path: str) -> None:
    """``ctx.cancel = True`` after ``close()`` writes into the freed C cancel state."""
    with LlamaModel(path) as model:
        ctx = LlamaContext(model, n_ctx=64, n_threads=1)
        ctx.close()
        expect(ClosedError, setattr, ctx, "cancel", True)
        for _ in range(200):  # heap corruption shows on the next allocations
            LlamaContext(model, n_ctx=64, n_threads=1).close()


@case
def context_trim_after_close(path: str) -> None:
    """``ctx.trim_to_committed()`` after ``close()`` uses the freed KV memory handle."""
    with LlamaModel(path) as model:
        ctx = LlamaContext(model, n_ctx=64, n_threads=1)
        ctx.close()
        expect(ClosedError, ctx.trim_to_committed)


@case
def stream_close_after_llm_close(path: str) -> None:
    """``stream.close()`` after ``llm.close()`` sets the freed context's cancel flag."""
    llm = _llm(path, max_tokens=50)
    stream = llm.stream("the cat")
    next(stream)
    llm.close()
    stream.close()
    for _ in range(100):
        with _llm(path) as other:
            other("hi")


@case
def grammar_sampler_accept_of_out_of_vocabulary_id(path: str) -> None:
    """``LlamaSampler.accept`` passes any id to a grammar sampler, which looks it up with ``.at()``."""
    with LlamaModel(path) as model:
        sampler = LlamaSampler().add_grammar(model.vocab, 'root ::= "a"').add_greedy()
        expect(ValueError, sampler.accept, model.vocab.n_tokens + 5)


@case
def cancel_from_threads_while_the_context_is_replaced(path: str) -> None:
    """``llm.cancel()`` from other threads while a call with a different n_ubatch makes the LLM
    replace its context: cancel() writes into the old context's freed C cancel state."""
    import threading
    import time

    with _llm(path, max_tokens=4) as llm:
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                llm.cancel()

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            deadline = time.monotonic() + 30.0  # it crashes within about a second today
            round_ = 0
            while time.monotonic() < deadline:
                llm("the cat sat", config=llm.config.replace(n_ubatch=8 + round_ % 2))
                round_ += 1
        finally:
            stop.set()
            for thread in threads:
                thread.join()
