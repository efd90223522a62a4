"""``LlamaSampler``: owns one sampler chain (``llama_sampler_chain_init``).

Samplers added to the chain are owned by the chain and freed with it.
``sample`` refuses to run when the context has no logits at the requested row
(llama.cpp aborts the process in that case).

A grammar stage is wrapped in a small guard stage (``_GrammarGuard``): llama.cpp's grammar
sampler throws a C++ exception, which ends the process, when it is told to accept a token it
rejects, and a chain accepts whatever its last stage picked, even when the grammar had
rejected every candidate (a grammar that needs a character no token can produce). The guard
checks the chosen token against the grammar first and turns that dead end into a
``GrammarDeadEnd`` raised by ``sample``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, List, Mapping, Optional, Sequence

from .._ffi import ffi, lib
from ..errors import GrammarDeadEnd
from ..grammar import Grammar
from ._handle import CHandle
from .vocab import check_token_ids

if TYPE_CHECKING:
    from .context import LlamaContext
    from .vocab import LlamaVocab

DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: a random seed per sampler
# Look-back windows are allocated in full when the sampler is made (a ring buffer of that many
# tokens, and a count per slot for DRY): a window of 2**31 makes llama.cpp's allocation throw
# through C and end the process. No context is longer than this.
MAX_LAST_N = 1 << 24
_FLOAT32_MAX = 3.4028234663852886e38  # a larger bias would reach llama.cpp as inf


class LlamaSampler(CHandle):
    """A chain of samplers; add stages in order, finish with ``greedy``/``dist``/``mirostat``."""

    _kind = "sampler"

    def __init__(self, no_perf: bool = True) -> None:
        params = lib.llama_sampler_chain_default_params()
        params.no_perf = no_perf
        pointer = lib.llama_sampler_chain_init(params)
        if pointer == ffi.NULL:
            raise MemoryError("llama_sampler_chain_init failed")
        # What the chain's guard stages use, freed after the chain (see _free_chain).
        self._owned: List[Any] = []
        super().__init__(pointer, _free_chain_with(self._owned))
        self.stages: list = []
        self._n_vocab: Optional[int] = None  # set by stages that look token ids up (grammar)
        self._guards: List[_GrammarGuard] = []

    def _add(self, name: str, sampler) -> "LlamaSampler":
        if sampler == ffi.NULL:
            raise ValueError(f"llama.cpp could not create the {name} sampler")
        lib.llama_sampler_chain_add(self.ptr, sampler)  # the chain owns it now
        self.stages.append(name)
        return self

    @property
    def greedy_only(self) -> bool:
        """A chain of just ``greedy``: its choice is the first largest logit, and accept() is a no-op."""
        return self.stages == ["greedy"]

    # -- terminal stages --------------------------------------------------------
    def add_greedy(self) -> "LlamaSampler":
        return self._add("greedy", lib.llama_sampler_init_greedy())

    def add_dist(self, seed: Optional[int] = None) -> "LlamaSampler":
        return self._add("dist", lib.llama_sampler_init_dist(_seed(seed)))

    def add_mirostat(self, n_vocab: int, tau: float = 5.0, eta: float = 0.1, m: int = 100,
                     seed: Optional[int] = None) -> "LlamaSampler":
        return self._add("mirostat", lib.llama_sampler_init_mirostat(n_vocab, _seed(seed), tau, eta, m))

    def add_mirostat_v2(self, tau: float = 5.0, eta: float = 0.1, seed: Optional[int] = None) -> "LlamaSampler":
        return self._add("mirostat_v2", lib.llama_sampler_init_mirostat_v2(_seed(seed), tau, eta))

    # -- filters ------------------------------------------------------------------
    def add_top_k(self, k: int) -> "LlamaSampler":
        return self._add("top_k", lib.llama_sampler_init_top_k(k))

    def add_top_p(self, p: float, min_keep: int = 1) -> "LlamaSampler":
        return self._add("top_p", lib.llama_sampler_init_top_p(p, min_keep))

    def add_min_p(self, p: float, min_keep: int = 1) -> "LlamaSampler":
        return self._add("min_p", lib.llama_sampler_init_min_p(p, min_keep))

    def add_typical(self, p: float, min_keep: int = 1) -> "LlamaSampler":
        return self._add("typical", lib.llama_sampler_init_typical(p, min_keep))

    def add_temp(self, temperature: float) -> "LlamaSampler":
        return self._add("temp", lib.llama_sampler_init_temp(temperature))

    def add_penalties(self, last_n: int = 64, repeat: float = 1.0, frequency: float = 0.0,
                      presence: float = 0.0, n_vocab: int = 0) -> "LlamaSampler":
        """Repeat, frequency and presence penalties over the last ``last_n`` tokens (0 or less = off)."""
        if repeat <= 0:
            raise ValueError(f"repeat penalty must be > 0, got {repeat}")
        _check_last_n("last_n", last_n)
        return self._add("penalties", lib.llama_sampler_init_penalties(n_vocab, last_n, repeat, frequency, presence))

    def add_grammar(self, vocab: "LlamaVocab", grammar: Any, root: str = "root") -> "LlamaSampler":
        """A GBNF grammar stage: GBNF text or a :class:`~cyllama_cffi.grammar.Grammar`.

        Put it first in the chain, so the filters after it see only allowed tokens. Text is
        checked as ``Grammar.from_string`` checks it (llama.cpp aborts on some grammars it
        parses, e.g. nesting deep enough to overflow its parser's stack); a grammar it cannot
        use raises ``ValueError``.
        """
        if not isinstance(grammar, Grammar):
            grammar = Grammar.from_string(grammar, root=root)
        vocab_pointer = vocab.ptr
        grammar.check_tokens(vocab.n_tokens)
        inner = lib.llama_sampler_init_grammar(vocab_pointer, grammar.gbnf.encode("utf-8"),
                                               grammar.root.encode("utf-8"))
        if inner == ffi.NULL:
            raise ValueError("llama.cpp could not use this grammar with this vocabulary (a <token> it cannot "
                             "find?); see the cyllama_cffi.llama log for its reason")
        guard = _GrammarGuard(inner)
        self._owned.extend((inner, guard))  # the guard's handle must outlive the chain that calls it
        wrapper = lib.llama_sampler_init(_guard_interface(), guard.handle)
        if wrapper == ffi.NULL:
            raise MemoryError("llama_sampler_init failed")
        self._add("grammar", wrapper)
        self._guards.append(guard)
        self._n_vocab = vocab.n_tokens
        self._depend_on_vocab(vocab)
        return self

    def add_dry(self, vocab: "LlamaVocab", multiplier: float, base: float = 1.75, allowed_length: int = 2,
                penalty_last_n: int = -1, sequence_breakers: Sequence[str] = ("\n", ":", "\"", "*")
                ) -> "LlamaSampler":
        """DRY ("don't repeat yourself"): penalise a token that would extend a repetition.

        A token continuing a repeat longer than ``allowed_length`` loses
        ``multiplier * base ** (length - allowed_length)`` of its logit. The look-back is the last
        ``penalty_last_n`` tokens; llama.cpp treats 0 or less as off (``GenerationConfig`` turns
        its -1 into the context size). A repetition is not followed across a
        ``sequence_breakers`` string. llama.cpp leaves the stage out when ``multiplier`` is 0 or
        ``base`` is below 1. Making it scans the whole vocabulary once per breaker.
        """
        for name, value in (("multiplier", multiplier), ("base", base)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ValueError(f"DRY {name} must be a number, got {value!r}")
        for name, value in (("allowed_length", allowed_length), ("penalty_last_n", penalty_last_n)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"DRY {name} must be an int, got {value!r}")
        if not -(2**31) <= allowed_length < 2**31:
            raise ValueError(f"DRY allowed_length must fit in int32, got {allowed_length}")
        _check_last_n("DRY penalty_last_n", penalty_last_n)
        if isinstance(sequence_breakers, (str, bytes)) or not all(isinstance(b, str) for b in sequence_breakers):
            raise ValueError(f"DRY sequence_breakers must be a list of str, got {sequence_breakers!r}")
        encoded = [b.encode("utf-8") for b in sequence_breakers if b]  # llama.cpp skips empty ones, with a warning
        if any(b"\0" in b for b in encoded):
            raise ValueError(f"DRY sequence_breakers must not contain NUL characters, got {sequence_breakers!r}")
        # The C strings and the array of pointers to them live until the call returns: llama.cpp
        # copies what it needs (the breakers' token sequences) while it makes the sampler.
        strings = [ffi.new("char[]", b) for b in encoded]
        array = ffi.new("char *[]", strings) if strings else ffi.NULL
        sampler = lib.llama_sampler_init_dry(vocab.ptr, multiplier, base, allowed_length, penalty_last_n,
                                             array, len(strings))
        return self._add("dry", sampler)

    def add_logit_bias(self, n_vocab: int, biases: Mapping[int, float]) -> "LlamaSampler":
        """Add ``biases[token]`` to each listed token's logit; ``-inf`` bans a token.

        Put it first, so that every later stage sees the biased logits (llama.cpp's own chain
        does). Token ids are checked against ``n_vocab``; a bias must be a finite number or
        ``-inf`` (+inf or NaN would turn the probabilities into NaN).
        """
        tokens = list(biases)
        check_token_ids(tokens, n_vocab)
        for token, bias in biases.items():
            number = isinstance(bias, (int, float)) and not isinstance(bias, bool)
            if not number or not (bias == -math.inf or abs(bias) <= _FLOAT32_MAX):  # NaN fails both
                raise ValueError(f"logit bias of token {token} must be a finite float32 number or -inf, got {bias!r}")
        entries = ffi.new("llama_logit_bias[]", [(token, float(biases[token])) for token in tokens]) \
            if tokens else ffi.NULL
        # llama.cpp copies the entries while it makes the sampler.
        return self._add("logit_bias", lib.llama_sampler_init_logit_bias(n_vocab, len(tokens), entries))

    def add_top_n_sigma(self, n: float) -> "LlamaSampler":
        """Keep the tokens whose logit is within ``n`` standard deviations of the largest (``n <= 0``: off)."""
        return self._add("top_n_sigma", lib.llama_sampler_init_top_n_sigma(n))

    def _depend_on_vocab(self, vocab: "LlamaVocab") -> None:
        self._depend_on(vocab._model)

    # -- use ------------------------------------------------------------------------
    def sample(self, context: "LlamaContext", index: int = -1) -> int:
        """Sample (and accept) a token from row ``index`` of the last decode's logits."""
        if not context.has_logits(index):
            raise RuntimeError(f"no logits to sample at batch index {index}: "
                               "decode a batch with logits first (the last decode failed or had none)")
        if not self.stages:
            raise RuntimeError("the sampler chain is empty: add a stage such as add_greedy() first")
        pointer = self.ptr
        context_pointer = context._acquire()  # ContextBusyError / ClosedError
        try:
            if self.greedy_only:
                # llama_sampler_sample would fill an n_vocab-entry candidate array first
                # (~60 us a token at 49k); the first maximum is the same token.
                logits = lib.llama_get_logits_ith(context_pointer, index)
                if logits == ffi.NULL:
                    raise RuntimeError(f"llama.cpp has no logits at batch index {index}")
                token = lib.cyl_argmax(logits, context._n_vocab)
                lib.llama_sampler_accept(pointer, token)  # what the chain does after choosing
                return token
            token = lib.llama_sampler_sample(pointer, context_pointer, index)
        finally:
            context._busy.release()
        self._raise_from_guards()
        for guard in self._guards:
            if guard.dead_end:
                raise GrammarDeadEnd("the grammar allows no token here: it needs text that no token of this "
                                     "vocabulary can produce (e.g. a NUL character, or a token id outside it)")
        return token

    def accept(self, token: int) -> None:
        """Tell the chain ``token`` was chosen (penalties, grammar state advance).

        A grammar stage looks the id up in its vocabulary and aborts the process
        for one outside it, so with a grammar the id is checked first; a token the grammar
        does not allow raises ``GrammarDeadEnd`` (llama.cpp would abort) and leaves the grammar
        stopped until ``reset()``.
        """
        if self._n_vocab is not None:
            check_token_ids([token], self._n_vocab)
        lib.llama_sampler_accept(self.ptr, token)
        self._raise_from_guards()
        for guard in self._guards:
            if guard.dead_end:
                raise GrammarDeadEnd(f"token {token} is not allowed by the grammar here; reset() the sampler "
                                     "to start the grammar again")

    def _raise_from_guards(self) -> None:
        for guard in self._guards:
            error, guard.raised = guard.raised, None
            if error is not None:
                guard.dead_end = True  # the grammar may have missed a token: it cannot be trusted now
                raise error

    def reset(self) -> None:
        lib.llama_sampler_reset(self.ptr)  # the guards' reset runs inside, and forgets a dead end

    def __repr__(self) -> str:
        return f"<LlamaSampler {' -> '.join(self.stages) or 'empty'}>"


def _check_last_n(name: str, value: int) -> None:
    if value > MAX_LAST_N:
        raise ValueError(f"{name} must be at most {MAX_LAST_N} (the longest context), got {value}")


def _seed(seed: Optional[int]) -> int:
    if seed is None or seed < 0:
        return DEFAULT_SEED
    return seed & 0xFFFFFFFF


def _free_chain_with(owned: List[Any]):
    """The chain's free function: the chain first (its guard stages call into ``owned``), then ``owned``."""

    def free(pointer: Any) -> None:
        lib.llama_sampler_free(pointer)
        for item in owned:
            if isinstance(item, _GrammarGuard):
                continue
            lib.llama_sampler_free(item)  # the grammar samplers the guards wrapped
        del owned[:]

    return free


class _GrammarGuard:
    """The state of one guard stage: the llama.cpp grammar sampler it wraps, and whether it is stuck.

    A dead end (the chosen token is one the grammar rejects) is remembered instead of passed
    to the grammar, which would throw; from then on the stage does nothing until a reset.
    """

    __slots__ = ("inner", "dead_end", "raised", "handle", "probe", "probe_array", "__weakref__")

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.dead_end = False
        # An exception raised inside a callback (a KeyboardInterrupt delivered there): cffi can
        # only print it, so it is kept here and raised again once the C call has returned.
        self.raised: Optional[BaseException] = None
        self.handle = ffi.new_handle(self)
        # A one-candidate array: applying the grammar to it says whether a token is allowed.
        self.probe = ffi.new("llama_token_data[1]")
        self.probe_array = ffi.new("llama_token_data_array *", {"data": self.probe, "size": 1, "selected": -1,
                                                                "sorted": False})

    def allows(self, token: int) -> bool:
        self.probe[0].id = token
        self.probe[0].logit = 0.0
        self.probe[0].p = 0.0
        self.probe_array.size = 1
        self.probe_array.selected = -1
        lib.llama_sampler_apply(self.inner, self.probe_array)
        return not math.isinf(self.probe[0].logit)


_INTERFACE: List[Any] = []  # [the llama_sampler_i, and the callbacks and name it points to]


def _guard_interface() -> Any:
    """The guard stage's ``llama_sampler_i``, made once per process and never freed."""
    if _INTERFACE:
        return _INTERFACE[0]
    field_types = dict((name, field.type) for name, field in ffi.typeof("struct llama_sampler_i").fields)

    @ffi.callback(field_types["name"])
    def name(sampler):
        return _NAME

    @ffi.callback(field_types["accept"])
    def accept(sampler, token):
        guard = ffi.from_handle(sampler.ctx)
        if guard.dead_end:
            return
        try:
            allowed = guard.allows(token)
        except BaseException as error:  # a KeyboardInterrupt from a signal handler: re-raised by sample()
            guard.raised = error
            allowed = False
        if allowed:
            lib.llama_sampler_accept(guard.inner, token)
        else:
            guard.dead_end = True  # not told to the grammar: it would throw

    @ffi.callback(field_types["apply"])
    def apply(sampler, candidates):
        guard = ffi.from_handle(sampler.ctx)
        try:
            if not guard.dead_end:
                lib.llama_sampler_apply(guard.inner, candidates)
        except BaseException as error:  # cffi would print and drop it; sample() re-raises it
            guard.raised = error

    @ffi.callback(field_types["reset"])
    def reset(sampler):
        guard = ffi.from_handle(sampler.ctx)
        guard.dead_end = False
        lib.llama_sampler_reset(guard.inner)

    interface = ffi.new("struct llama_sampler_i *")
    interface.name = name
    interface.accept = accept
    interface.apply = apply
    interface.reset = reset
    # clone and free stay NULL: nothing clones a chain here, and the guard's state is freed by
    # the chain's owner (_free_chain_with), not by a callback run while the chain is freed.
    _INTERFACE.extend((interface, name, accept, apply, reset))
    return interface


_NAME = ffi.new("char[]", b"grammar")
