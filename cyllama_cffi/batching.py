"""``BatchGenerator``: several prompts generated together, as parallel sequences of one context.

Every step is one ``llama_decode`` for all the prompts (see :mod:`cyllama_cffi._engine`), so on a
CPU eight prompts take far less than eight times one, and on a GPU the gain is larger still.
Each prompt has its own sampler chain: greedy output of a prompt is the same as that prompt
generated alone. ``cancel()`` (from any thread) stops the whole batch, even during its prompts.
``GenerationConfig(logprobs=n)`` fills each ``Response.logprobs`` as ``LLM`` does.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Union

from ._engine import Engine, EngineSequence
from ._ffi import lib
from ._logging import set_verbose
from .config import GenerationConfig
from .errors import ClosedError, LLMBusyError
from .lowlevel.model import LlamaModel
from .response import Response
from .sampling import build_sampler
from .sigint import SigintHandle, install_sigint_handler

if TYPE_CHECKING:
    from ._logprobs import TokenLogprob

__all__ = ["BatchGenerator", "BatchRequest", "BatchResponse", "batch_generate"]


@dataclass
class BatchRequest:
    """One prompt of :meth:`BatchGenerator.generate_batch_detailed`, with its own limits."""

    id: int
    prompt: str
    max_tokens: int = 128
    temperature: float = 0.7


@dataclass
class BatchResponse:
    """The answer to one :class:`BatchRequest`; ``logprobs`` as in ``Response`` (None unless asked)."""

    id: int
    prompt: str
    response: str
    tokens_generated: int
    time_taken: float
    logprobs: Optional[List["TokenLogprob"]] = None


class BatchGenerator:
    """Generate for up to ``n_seq_max`` prompts at once, in one context of ``n_ctx`` cells.

    Each prompt's sequence has ``n_ctx // n_seq_max`` cells (llama.cpp's split KV cache, the
    fastest attention): prompt plus generated tokens end there with finish reason "length".
    ``batch_size`` is the most tokens one decode takes (``n_batch``). ``use_pooling`` is
    accepted for compatibility: the batch and its row arrays are allocated once per generator.
    """

    def __init__(self, model_path: Union[str, "os.PathLike[str]"], batch_size: int = 512, n_ctx: int = 2048,
                 n_gpu_layers: int = -1, n_seq_max: int = 8, verbose: bool = False, use_pooling: bool = False,
                 n_threads: Optional[int] = None) -> None:
        for name, value, low in (("batch_size", batch_size, 1), ("n_ctx", n_ctx, 8), ("n_seq_max", n_seq_max, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if verbose:
            set_verbose(True)
        self.model_path = str(model_path)
        self.batch_size = batch_size
        self.n_ctx = n_ctx
        self.n_seq_max = n_seq_max
        self.verbose = verbose
        self.use_pooling = use_pooling
        self.model = LlamaModel(model_path, n_gpu_layers=n_gpu_layers)
        self.vocab = self.model.vocab
        try:
            self._engine = Engine(self.model, n_ctx=n_ctx, n_seq_max=n_seq_max, n_batch=batch_size,
                                  n_ubatch=batch_size, n_threads=n_threads)
        except BaseException:
            self.model.close()
            raise
        self._lock = threading.Lock()
        self._closed = False
        self._sigint_watchers = 0  # active handles of install_sigint_handler

    # -- generation -------------------------------------------------------------------------
    def generate_batch(self, prompts: List[str], config: Optional[GenerationConfig] = None) -> List[Response]:
        """One :class:`Response` per prompt, in prompt order, all generated together."""
        self._check_open()
        if prompts is None:
            raise TypeError("prompts cannot be None, expected a list of strings")
        if not isinstance(prompts, list):
            raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}. "
                            "For a single prompt, use: generate_batch([prompt])")
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"All prompts must be strings, but prompt at index {index} is {type(prompt).__name__}")
        config = config or GenerationConfig()
        if not isinstance(config, GenerationConfig):
            raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
        return self._generate(prompts, [config] * len(prompts))

    def generate_batch_detailed(self, requests: List[BatchRequest],
                                config: Optional[GenerationConfig] = None) -> List[BatchResponse]:
        """Like :meth:`generate_batch`, each request with its own ``max_tokens`` and ``temperature``."""
        self._check_open()
        if requests is None:
            raise TypeError("requests cannot be None, expected a list of BatchRequest objects")
        if not isinstance(requests, list):
            raise TypeError(f"requests must be a list of BatchRequest objects, got {type(requests).__name__}")
        if not requests:
            raise ValueError("requests list cannot be empty. Provide at least one BatchRequest.")
        for index, request in enumerate(requests):
            if not isinstance(request, BatchRequest):
                raise TypeError(f"All requests must be BatchRequest objects, but request at index {index} "
                                f"is {type(request).__name__}")
            if not isinstance(request.prompt, str):
                raise TypeError(f"the prompt of request {index} must be a str, got {type(request.prompt).__name__}")
        base = config or GenerationConfig()
        configs = [base.replace(max_tokens=r.max_tokens, temperature=r.temperature) for r in requests]
        responses = self._generate([r.prompt for r in requests], configs)
        return [BatchResponse(id=request.id, prompt=request.prompt, response=response.text,
                              tokens_generated=response.stats.generated_tokens, time_taken=response.stats.total_time,
                              logprobs=response.logprobs)
                for request, response in zip(requests, responses)]

    def cancel(self) -> None:
        """Stop the running batch soon, even inside a decode; safe from any thread.

        The prompts end with finish reason "cancelled" and the text they had; a cancel with
        nothing running is forgotten when the next batch starts.
        """
        self._engine.cancel()

    def install_sigint_handler(self) -> SigintHandle:
        """Make Ctrl-C call :meth:`cancel`, interrupting even a running decode.

        Without it Ctrl-C raises ``KeyboardInterrupt`` only once the running step's decode
        returns, and a step may read a whole batch of prompt tokens (seconds, on a large model).
        With it the decode stops within one graph node and the batch returns what it has, each
        prompt with finish reason "cancelled". Main thread only. Returns a handle: ``restore()``
        it (or use it as a context manager) to put the previous handler back.
        """
        self._check_open()
        handle = install_sigint_handler(self.cancel, on_restore=self._sigint_unwatch)
        self._sigint_watchers += 1
        self._engine.ctx.watch_sigint(True)
        return handle

    def _sigint_unwatch(self) -> None:
        self._sigint_watchers = max(0, self._sigint_watchers - 1)
        if self._sigint_watchers == 0:
            try:
                self._engine.ctx.watch_sigint(False)
            except ClosedError:  # closed meanwhile: nothing left to watch
                pass

    def _generate(self, prompts: Sequence[str], configs: Sequence[GenerationConfig]) -> List[Response]:
        if len(prompts) > self.n_seq_max:
            raise ValueError(f"Too many prompts ({len(prompts)}) for configured n_seq_max ({self.n_seq_max}). "
                             "Either reduce the number of prompts, increase n_seq_max when creating "
                             f"BatchGenerator, or process prompts in batches of {self.n_seq_max} or fewer.")
        if not prompts:
            return []
        token_lists = [self._tokens(prompt, config, index) for index, (prompt, config) in enumerate(zip(prompts, configs))]
        if not self._lock.acquire(blocking=False):
            raise LLMBusyError("another thread is generating on this BatchGenerator; a BatchGenerator is not "
                               "thread-safe: use one per thread, or take turns")
        engine = self._engine
        try:
            engine.begin()
            sequences = [engine.add(EngineSequence(tokens, build_sampler(config, self.vocab, engine.seq_capacity),
                                                   config.max_tokens, config.stop_sequences,
                                                   logprobs=config.logprobs or None))
                         for tokens, config in zip(token_lists, configs)]
            engine.run()
        finally:
            for sequence in engine.running:  # an exception (Ctrl-C) left them: free their cells
                engine.drop(sequence)
            # This thread's OpenMP workers would otherwise idle beside the next decoding
            # thread's (a thread pool taking turns), and libgomp, counting more threads than
            # cores, then sleeps at ggml's barriers: every later decode ~2.6x slower.
            lib.cyl_release_openmp_threads()
            self._lock.release()
        model = self.model_path
        return [Response(s.text, s.stats, s.finish_reason, model, logprobs=s.logprobs) for s in sequences]

    def _tokens(self, prompt: str, config: GenerationConfig, index: int) -> List[int]:
        tokens = self.vocab.tokenize(prompt, add_special=config.add_bos, parse_special=config.parse_special)
        if not tokens:
            raise ValueError(f"prompt {index} tokenizes to no tokens")
        capacity = self._engine.seq_capacity
        if len(tokens) >= capacity:
            raise ValueError(f"prompt {index} has {len(tokens)} tokens but a sequence holds {capacity} "
                             f"(n_ctx {self.n_ctx} / n_seq_max {self.n_seq_max}); shorten it or raise n_ctx")
        return tokens

    # -- lifetime -----------------------------------------------------------------------------
    @property
    def is_closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("BatchGenerator has been closed and cannot be used for generation. "
                              "Create a new BatchGenerator instance to continue.")

    def close(self) -> None:
        """Free the context and the model; idempotent. A running batch is cancelled first."""
        if self._closed:
            return
        self._closed = True
        self._engine.cancel()
        self._lock.acquire()  # a batch running in another thread ends within a graph node
        try:
            self._engine.close()
        finally:
            self._lock.release()
            self.model.close()

    def __enter__(self) -> "BatchGenerator":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<BatchGenerator {os.path.basename(self.model_path)} n_seq_max={self.n_seq_max}" \
               f"{' closed' if self._closed else ''}>"


def batch_generate(prompts: List[str], model_path: Union[str, "os.PathLike[str]"], batch_size: int = 512,
                   n_seq_max: int = 8, config: Optional[GenerationConfig] = None, **kwargs: Any) -> List[Response]:
    """Load the model, generate for ``prompts`` together, free it. ``kwargs`` override ``config`` fields."""
    config = (config or GenerationConfig()).replace(**kwargs) if kwargs else config
    with BatchGenerator(model_path, batch_size=batch_size, n_seq_max=max(n_seq_max, 1)) as generator:
        return generator.generate_batch(prompts, config)
