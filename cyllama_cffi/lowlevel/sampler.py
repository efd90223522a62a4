"""``LlamaSampler``: owns one sampler chain (``llama_sampler_chain_init``).

Samplers added to the chain are owned by the chain and freed with it.
``sample`` refuses to run when the context has no logits at the requested row
(llama.cpp aborts the process in that case).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from .._ffi import ffi, lib
from ._handle import CHandle
from .vocab import check_token_ids

if TYPE_CHECKING:
    from .context import LlamaContext
    from .vocab import LlamaVocab

DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: a random seed per sampler


class LlamaSampler(CHandle):
    """A chain of samplers; add stages in order, finish with ``greedy``/``dist``/``mirostat``."""

    _kind = "sampler"

    def __init__(self, no_perf: bool = True) -> None:
        params = lib.llama_sampler_chain_default_params()
        params.no_perf = no_perf
        pointer = lib.llama_sampler_chain_init(params)
        if pointer == ffi.NULL:
            raise MemoryError("llama_sampler_chain_init failed")
        super().__init__(pointer, lib.llama_sampler_free)
        self.stages: list = []
        self._n_vocab: Optional[int] = None  # set by stages that look token ids up (grammar)

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
        if repeat <= 0:
            raise ValueError(f"repeat penalty must be > 0, got {repeat}")
        return self._add("penalties", lib.llama_sampler_init_penalties(n_vocab, last_n, repeat, frequency, presence))

    def add_grammar(self, vocab: "LlamaVocab", grammar: str, root: str = "root") -> "LlamaSampler":
        """GBNF grammar; a grammar llama.cpp cannot parse raises ``ValueError``."""
        sampler = lib.llama_sampler_init_grammar(vocab.ptr, grammar.encode("utf-8"), root.encode("utf-8"))
        if sampler == ffi.NULL:
            raise ValueError("invalid GBNF grammar (see the cyllama_cffi.llama log for llama.cpp's parse error)")
        self._add("grammar", sampler)
        self._n_vocab = vocab.n_tokens
        self._depend_on_vocab(vocab)
        return self

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
            return lib.llama_sampler_sample(pointer, context_pointer, index)
        finally:
            context._busy.release()

    def accept(self, token: int) -> None:
        """Tell the chain ``token`` was chosen (penalties, grammar state advance).

        A grammar stage looks the id up in its vocabulary and aborts the process
        for one outside it, so with a grammar the id is checked first.
        """
        if self._n_vocab is not None:
            check_token_ids([token], self._n_vocab)
        lib.llama_sampler_accept(self.ptr, token)

    def reset(self) -> None:
        lib.llama_sampler_reset(self.ptr)

    def __repr__(self) -> str:
        return f"<LlamaSampler {' -> '.join(self.stages) or 'empty'}>"


def _seed(seed: Optional[int]) -> int:
    if seed is None or seed < 0:
        return DEFAULT_SEED
    return seed & 0xFFFFFFFF
