"""``LLM``: a model ready to generate, the owner of its context, and the one to cancel.

One generation at a time per ``LLM``. A call while another stream of the same LLM is being
consumed by a live thread raises :class:`LLMBusyError`; a stream that was finished,
cancelled, closed, or left behind by its own thread (``break``, an exception, Ctrl-C, a
dropped reference) or by a thread that has died is ended by the new call, which then waits at
most for one graph node of a decode still running for it. See ``docs/cancellation.md``.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from . import _generation
from ._cancel import Cancellation
from ._logging import set_verbose
from ._lora import LoraSpec, parse_lora
from ._response_cache import ResponseCacheInfo, cache_key, copy_response, make_cache
from . import _sequence
from ._sequence import KVSequence
from .chat_template import apply_chat_template, get_chat_template, text_after_answer
from .config import GenerationConfig
from . import _state_format
from .errors import ClosedError, LLMBusyError, StateError
from .lowlevel.adapter import LoraAdapter
from .lowlevel.batch import LlamaBatch
from .lowlevel.context import LlamaContext, usable_cores
from .lowlevel.model import LlamaModel, ProgressCallback
from .response import FinishReason, GenerationStats, Response
from .sampling import build_sampler
from .sigint import SigintHandle
from .sigint import install_sigint_handler as _install_sigint_handler
from .stream import Stream, StreamState, TokenCallback

if TYPE_CHECKING:
    from .embeddings import Embedder

__all__ = ["LLM", "Prompt"]

Prompt = Union[str, Sequence[int]]  # text, or token ids decoded as given

# Model-level settings: changing them needs a new model, not just a new context.
_MODEL_FIELDS = ("n_gpu_layers", "main_gpu", "split_mode", "tensor_split", "use_mmap")


class LLM:
    """A model ready to generate text.

    ``LLM(model_path, config=None, verbose=False, cache_size=0, cache_ttl=None, **overrides)``:
    fields in ``overrides`` replace those of ``config`` (unknown names raise ``TypeError``). The
    file is checked before llama.cpp reads it (``InvalidGGUFError``).

    ``cache_size > 0`` keeps that many finished responses of reproducible calls (fixed seed, no
    stream, no ``on_token``) and answers a repeated call from them without decoding;
    ``cache_ttl`` seconds bound their life (None: until evicted). See ``cache_info()``.

    ``progress_callback(fraction)`` is called while the weights load (fraction 0.0 to 1.0, in
    the loading thread); returning ``False`` or raising stops the load (``LoadCancelled``, or
    the exception raised), as for :class:`~cyllama_cffi.lowlevel.LlamaModel`.

    After each generation, ``last_stats``, ``last_finish_reason`` and ``last_finished_at`` (the
    ``time.perf_counter()`` at its end) describe it.

    ``lora`` applies LoRA adapters to every generation: a path (scale 1.0), a ``{path: scale}``
    mapping, or a list of paths and ``(path, scale)`` pairs; :meth:`set_lora` changes them
    later. See ``docs/lora.md``.

    ``close()`` (and ``reset_context()``) free the context and leave the model loaded, as in
    cyllama: the next call makes a new context. Leaving a ``with LLM(...)`` block frees the
    model as well, at once; the LLM then raises ``ClosedError``.
    """

    def __init__(self, model_path: Union[str, "os.PathLike[str]"], config: Optional[GenerationConfig] = None,
                 verbose: bool = False, cache_size: int = 0, cache_ttl: Optional[float] = None,
                 progress_callback: Optional[ProgressCallback] = None, lora: LoraSpec = None,
                 **overrides: Any) -> None:
        self._response_cache = make_cache(cache_size, cache_ttl)  # bad values fail before the model loads
        lora_spec = parse_lora(lora)
        base = config if config is not None else GenerationConfig()
        if not isinstance(base, GenerationConfig):
            raise TypeError(f"config must be a GenerationConfig, got {type(base).__name__}")
        self.config = base.replace(**overrides) if overrides else base.replace()
        self.verbose = verbose
        if verbose:
            set_verbose(True)
        cfg = self.config
        self.model = LlamaModel(model_path, n_gpu_layers=cfg.n_gpu_layers, main_gpu=cfg.main_gpu,
                                split_mode=cfg.split_mode, tensor_split=cfg.tensor_split, use_mmap=cfg.use_mmap,
                                progress_callback=progress_callback)
        self._lora: Tuple[Tuple[LoraAdapter, float], ...] = ()
        if lora_spec:
            try:
                self._lora = self._load_lora(lora_spec)
            except BaseException:
                self.model.close()  # the LLM is not made: free its model now, not at collection
                raise
        self.model_path = os.fsdecode(model_path)  # as given; Response.model carries it
        self.vocab = self.model.vocab
        self._seq: Optional[KVSequence] = None  # sequence 0 of the current context
        self._after_answer: Dict[Optional[str], List[int]] = {}  # per chat template: see chat()
        self._ctx_key: Any = None
        self._cancellation = Cancellation()
        self._lock = threading.Lock()  # guards the three fields below
        self._owner: Optional["weakref.ReferenceType[Stream]"] = None
        self._close_with: Optional["weakref.ReferenceType[Stream]"] = None  # see _close_when_done
        self._starting: Optional[threading.Thread] = None  # the thread setting a generation up
        self._sigint_watchers = 0
        self._released = False  # the model is freed: every call raises ClosedError
        self._embedder: Optional["Embedder"] = None  # made by the first embed(); owns its own context
        self.last_stats: Optional[GenerationStats] = None
        self.last_finish_reason: Optional[FinishReason] = None
        self.last_finished_at: Optional[float] = None  # time.perf_counter() when the last generation ended

    # -- cancellation -----------------------------------------------------------------
    def cancel(self) -> None:
        """Stop the running generation soon (between tokens or inside ``llama_decode``).

        Safe from any thread and from signal handlers; idempotent and cheap. A cancel with
        nothing running is forgotten when the next generation starts.
        """
        self._cancellation.request()

    @property
    def cancel_requested(self) -> bool:
        """True from ``cancel()`` until the next generation starts."""
        return self._cancellation.is_requested()

    def install_sigint_handler(self) -> SigintHandle:
        """Make Ctrl-C call ``cancel()``, interrupting even a running prefill.

        Main thread only. Returns a handle: ``restore()`` it (or use it as a context manager)
        to put the previous handler back.
        """
        handle = _install_sigint_handler(self.cancel, on_restore=self._sigint_unwatch)
        self._sigint_watchers += 1
        if self._seq is not None:
            self._seq.ctx.watch_sigint(True)
        return handle

    def _sigint_unwatch(self) -> None:
        self._sigint_watchers = max(0, self._sigint_watchers - 1)
        if self._seq is not None and self._sigint_watchers == 0:
            try:
                self._seq.ctx.watch_sigint(False)
            except ClosedError:  # closed meanwhile: nothing left to watch
                pass

    # -- generation -----------------------------------------------------------------------
    def __call__(self, prompt: Prompt, config: Optional[GenerationConfig] = None, stream: bool = False,
                 on_token: Optional[TokenCallback] = None) -> Union[Response, Stream]:
        """Generate from ``prompt``: a ``Response``, or with ``stream=True`` a :class:`Stream` of text chunks.

        ``prompt`` is text, or a sequence of token ids (e.g. from ``tokenize()``) decoded as given.
        With the response cache on, a reproducible call seen before is answered from it.
        """
        return self._respond(prompt, config, stream, on_token)

    def _respond(self, prompt: Prompt, config: Optional[GenerationConfig], stream: bool,
                 on_token: Optional[TokenCallback], then: Sequence[int] = ()) -> Union[Response, Stream]:
        """``__call__``; ``then``: the tokens a follow-up is expected to hold after the answer."""
        key = None
        cache = self._response_cache
        if cache is not None and not stream and on_token is None and not self._released:
            effective = config or self.config
            if isinstance(effective, GenerationConfig) and all(  # else stream() raises, as without a cache
                    getattr(effective, name) == getattr(self.config, name) for name in _MODEL_FIELDS):
                key = cache_key(prompt, effective)
            cached = cache.get(key) if key is not None else None
            if cached is not None:
                return copy_response(cached)
        generation = self._open_stream(prompt, config, on_token, then)
        if stream:
            return generation
        with generation:  # an exception (Ctrl-C) while joining ends it at once
            text = "".join(generation)
        response = Response(text, generation.stats, generation.finish_reason or FinishReason.STOP, self.model_path,
                            logprobs=generation.logprobs)
        if key is not None and response.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
            cache.put(key, copy_response(response))  # a cancelled generation is cut short: not the answer
        return response

    def generate_with_stats(self, prompt: Prompt, config: Optional[GenerationConfig] = None) -> Response:
        """A ``Response`` with its ``stats`` (every non-streaming call has them; cyllama's name)."""
        return self(prompt, config=config)

    # -- response cache ------------------------------------------------------------------------
    @property
    def cache_enabled(self) -> bool:
        """True when the LLM was made with ``cache_size > 0``."""
        return self._response_cache is not None

    def cache_info(self) -> Optional[ResponseCacheInfo]:
        """Hits, misses, maxsize, currsize and ttl of the response cache; None when it is off."""
        return self._response_cache.info() if self._response_cache is not None else None

    def cache_clear(self) -> None:
        """Forget every cached response and reset the counts (nothing to do when the cache is off)."""
        if self._response_cache is not None:
            self._response_cache.clear()

    def generate(self, prompt: Prompt, config: Optional[GenerationConfig] = None, **kwargs: Any
                 ) -> Union[Response, Stream]:
        """The same as calling the LLM."""
        return self(prompt, config=config, **kwargs)

    def stream(self, prompt: Prompt, config: Optional[GenerationConfig] = None,
               on_token: Optional[TokenCallback] = None) -> Stream:
        """A :class:`Stream` of text chunks from ``prompt``; use it in a ``with`` to close it early."""
        return self._open_stream(prompt, config, on_token)

    def _open_stream(self, prompt: Prompt, config: Optional[GenerationConfig], on_token: Optional[TokenCallback],
                     then: Sequence[int] = ()) -> Stream:
        """``stream``; ``then``: the tokens a follow-up is expected to hold after the answer
        (``KVSequence.reread_generated`` reads them with it)."""
        config = config or self.config
        if self._released:
            raise ClosedError("this LLM is closed: its model was freed when its with block ended")
        if not isinstance(config, GenerationConfig):
            raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
        changed = [name for name in _MODEL_FIELDS if getattr(config, name) != getattr(self.config, name)]
        if changed:
            raise ValueError(f"{', '.join(changed)} can only be set when the LLM is created")
        tokens = self._prompt_tokens(prompt, config)
        if config.logit_bias:
            self.vocab.check_tokens(config.logit_bias)  # ids the vocabulary lacks: ValueError now
        n_ctx = self._context_size(len(tokens), config)  # bad input is refused before anything changes
        self._claim(tokens)
        try:
            seq = self._sequence_for(n_ctx, config)
            seq.keep_prefix(tokens)  # decode only what the cache does not hold yet
            self._cancellation.begin()
            progress = _generation.Progress(config.logprobs)
            n_ctx = min(seq.ctx.n_ctx, config.n_ctx or seq.ctx.n_ctx)  # llama.cpp may round n_ctx up
            make_sampler = functools.partial(build_sampler, config, self.vocab, n_ctx)
            steps = _generation.generate(seq, tokens, make_sampler, config.stop_sequences, config.max_tokens, n_ctx,
                                         self._cancellation, progress, then)
            stream = Stream(steps, progress, self._cancellation, len(tokens), on_token, self._finished)
            with self._lock:
                self._owner = weakref.ref(stream)
        finally:
            self._starting = None
        return stream

    @property
    def model_name(self) -> str:
        return os.path.basename(self.model_path)

    def tokenize(self, text: str, add_special: bool = True, parse_special: Optional[bool] = None) -> List[int]:
        """Text to token ids; ``parse_special=None`` tokenizes as a prompt would (``config.parse_special``)."""
        if parse_special is None:
            parse_special = self.config.parse_special
        return self.vocab.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.vocab.detokenize(tokens)

    def chat(self, messages: Sequence[Mapping[str, Any]], config: Optional[GenerationConfig] = None,
             stream: bool = False, template: Optional[str] = None) -> Union[Response, Stream]:
        """Answer ``messages`` (dicts with ``role`` and ``content``): a ``Response``, or a :class:`Stream`.

        The messages are rendered with :meth:`format_chat` (the model's own template, through
        Jinja; ``template`` picks another), then generated from as ``llm(prompt)`` does, and
        cancelled the same way. The template's special tokens become tokens whatever
        ``parse_special`` says, and no second BOS is added after one the template wrote; the
        answer ends at the model's end-of-turn token (``finish_reason`` "stop").

        Without flash attention, the answer is read again once it ends together with the
        template's tokens that follow an answer (its end of turn and the next user turn's
        opening), so the next turn decodes from its user message on (see ``docs/state.md``).
        """
        prompt = self.format_chat(messages, template=template)
        tokens = self._chat_tokens(prompt, config or self.config)
        return self._respond(tokens, config, stream, None, self._tokens_after_answer(template))

    def _tokens_after_answer(self, template: Optional[str]) -> List[int]:
        """What the next turn of a chat holds right after an answer, as tokens; [] with flash
        attention, where an answer is not read again. Worked out once per template."""
        if self.config.flash_attn is not False:
            return []
        tokens = self._after_answer.get(template)
        if tokens is None:
            text = text_after_answer(self.model, template)
            tokens = self.vocab.tokenize(text, add_special=False, parse_special=True) if text else []
            self._after_answer[template] = tokens
        return tokens

    def format_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    template: Optional[str] = None) -> str:
        """``messages`` as prompt text in the model's chat format (see :mod:`cyllama_cffi.chat_template`).

        ``template``: None for the model's own template (rendered with Jinja; llama.cpp's engine
        if that fails); else a template stored in the model by name, a llama.cpp built-in name
        (``"chatml"``, ``"llama3"``...) or a template text. A model without a template gets
        plain ``"User: ...\\n\\nAssistant:"`` text.
        """
        return apply_chat_template(self.model, messages, template, add_generation_prompt)

    def get_chat_template(self, template_name: Optional[str] = None) -> str:
        """The chat template text stored in the model (or the one stored as ``template_name``); "" when none."""
        return get_chat_template(self.model, template_name)

    def _chat_tokens(self, prompt: str, config: GenerationConfig) -> List[int]:
        """A rendered chat as tokens: its markers are special tokens, and BOS is there once at most.

        Templates such as Llama 3's write ``bos_token`` themselves; adding the model's BOS
        again (as tokenizing with ``add_special`` does) would start the prompt with two.
        """
        if not isinstance(config, GenerationConfig):
            raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
        tokens = self.vocab.tokenize(prompt, add_special=False, parse_special=True)
        bos = self.vocab.bos
        if config.add_bos and self.vocab.add_bos and bos >= 0 and tokens[:1] != [bos]:
            tokens.insert(0, bos)
        if not tokens:
            raise ValueError("the chat prompt is empty: the template rendered no text")
        return tokens

    def _prompt_tokens(self, prompt: Prompt, config: GenerationConfig) -> List[int]:
        """The prompt as checked token ids: text is tokenized, a sequence of ids is range-checked.

        Token prompts are decoded as given: no BOS is added (``add_bos`` applies to text).
        """
        if isinstance(prompt, str):
            if prompt == "":
                raise ValueError("the prompt is empty; give at least one character of text")
            tokens = self.vocab.tokenize(prompt, add_special=config.add_bos, parse_special=config.parse_special)
            if not tokens:
                raise ValueError("the prompt tokenizes to no tokens")
            return tokens
        if isinstance(prompt, (bytes, bytearray, memoryview, dict)) or not hasattr(prompt, "__iter__"):
            raise TypeError(f"prompt must be a str or a sequence of token ids, got {type(prompt).__name__}")
        tokens = []
        for token in prompt:
            # bool is an int subclass, numpy integers are not: accept what index() accepts, but no bools.
            if isinstance(token, bool) or not hasattr(token, "__index__"):
                raise TypeError(f"token ids must be integers, got {type(token).__name__}")
            tokens.append(token.__index__())
        if not tokens:
            raise ValueError("the prompt is empty; give at least one token id")
        self.vocab.check_tokens(tokens)
        return tokens

    # -- embeddings ---------------------------------------------------------------------------
    def embed(self, texts: Union[str, Sequence[str]], pooling: str = "mean", normalize: bool = True,
              truncate: bool = False) -> Any:
        """Embedding vectors of ``texts``; see :meth:`cyllama_cffi.Embedder.embed`.

        The first call makes an :class:`~cyllama_cffi.Embedder` over this LLM's model, with a
        context of its own (``config.n_ctx`` cells, or 512); ``close()`` frees it with the
        generation context. Embedding while a stream of this LLM runs is fine: the two
        contexts share only the (read-only) model.
        """
        if self._released:
            raise ClosedError("this LLM is closed")
        embedder = self._embedder
        if embedder is None:
            from .embeddings import Embedder

            embedder = self._embedder = Embedder(self.model, n_ctx=self.config.n_ctx or 512,
                                                 n_threads=self.config.n_threads)
        return embedder.embed(texts, pooling=pooling, normalize=normalize, truncate=truncate)

    # -- LoRA adapters -----------------------------------------------------------------------
    @property
    def lora(self) -> List[Tuple[str, float]]:
        """The LoRA adapters applied to generations: ``(path, scale)`` pairs, in the order given."""
        return [(str(adapter.path), scale) for adapter, scale in self._lora]

    def set_lora(self, lora: LoraSpec) -> None:
        """Replace the LoRA adapters (same forms as ``LLM(lora=...)``); ``None`` or ``[]`` removes them.

        A file already loaded is reused, so changing only scales reads nothing. When the
        adapters that act (scale not 0) change, the KV cache and the response cache are
        emptied, since they hold results of the old ones. A bad adapter raises (as
        ``LLM(lora=...)`` does) and changes nothing. Raises :class:`LLMBusyError` while a
        stream of this LLM is not finished.
        """
        spec = parse_lora(lora)
        self._claim_idle("set_lora")
        try:
            old = self._lora
            new = self._load_lora(spec)
            try:
                if self._seq is not None:
                    if _acting(old) != _acting(new):
                        self._seq.clear()
                    self._seq.ctx.set_lora_adapters(new)
            except BaseException:
                _close_unused(new, old)
                raise
            self._lora = new
            if _acting(old) != _acting(new) and self._response_cache is not None:
                self._response_cache.clear()
            _close_unused(old, new)
        finally:
            self._starting = None

    def _load_lora(self, spec: List[Tuple[Any, float]]) -> Tuple[Tuple[LoraAdapter, float], ...]:
        """Adapters for ``spec``, reusing the loaded ones; on failure the ones loaded here are freed."""
        loaded = {os.path.realpath(adapter.path): adapter for adapter, _ in self._lora}
        result: List[Tuple[LoraAdapter, float]] = []
        try:
            for path, scale in spec:
                adapter = loaded.get(os.path.realpath(path))
                if adapter is None:
                    adapter = LoraAdapter(self.model, path)
                result.append((adapter, scale))
        except BaseException:
            _close_unused(tuple(result), self._lora)
            raise
        return tuple(result)

    # -- saved state ------------------------------------------------------------------------
    def save_state(self, path: Optional[Union[str, "os.PathLike[str]"]] = None) -> bytes:
        """The KV cache of this LLM's sequence and its token record, as bytes; written to ``path`` if given.

        A later :meth:`load_state` (in this LLM or a new one of the same model) puts them back,
        and a call whose prompt starts with the saved tokens continues from there (it decodes
        only what the cache does not hold, see ``docs/state.md``). Raises
        :class:`LLMBusyError` while a stream of this LLM is not finished: finish or close it first.
        Before any generation the state is empty (no tokens).
        """
        self._claim_idle("save_state", finish_reread=True)
        try:
            seq = self._seq
            tokens = list(seq.tokens) if seq is not None else []
            body = seq.ctx.seq_state_get(seq.seq_id) if tokens else b""
            n_ctx = seq.ctx.n_ctx if seq is not None else 0
            n_prefilled = seq.n_prefilled if seq is not None else 0
            kinds = _sequence.kinds_to_runs(seq.kinds) if seq is not None else []
            flash_attn = seq.flash_attn if seq is not None else self.config.flash_attn
        finally:
            self._starting = None
        header = {"model": self._identity(), "n_ctx": n_ctx, "n_prefilled": n_prefilled, "prefill_kinds": kinds,
                  "flash_attn": flash_attn}
        data = _state_format.encode(header, tokens, body)
        if path is not None:
            with open(path, "wb") as file:
                file.write(data)
        return data

    def load_state(self, source: Union[bytes, bytearray, memoryview, str, "os.PathLike[str]"]) -> None:
        """Put back a state from :meth:`save_state`: ``source`` is its bytes, or the path of its file.

        The state replaces what this LLM's sequence holds. A state that is not one, is
        corrupted or truncated, or comes from another model raises :class:`StateError` (a
        ``ValueError``) and changes nothing. Raises :class:`LLMBusyError` while a stream of this
        LLM is not finished.
        """
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
        elif isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as file:
                data = file.read()
        else:
            raise TypeError(f"load_state takes bytes or a path, got {type(source).__name__}")
        saved = _state_format.decode(data)
        identity = self._identity()
        saved_identity = saved.header["model"]
        if isinstance(saved_identity, dict) and saved_identity != identity and \
                {k: v for k, v in saved_identity.items() if k != "lora"} == \
                {k: v for k, v in identity.items() if k != "lora"}:
            raise StateError(f"the saved state was computed with other LoRA adapters "
                             f"({saved_identity.get('lora', 'none')}) than this LLM's ({identity.get('lora', 'none')})")
        if saved.header["model"] != identity:
            raise StateError(f"the saved state is from another model ({saved.header['model']}), "
                             f"not this one ({identity})")
        saved_off, this_off = saved.header.get("flash_attn") is False, self.config.flash_attn is False
        if saved_off != this_off:  # the cache's layout differs (V is stored transposed without it)
            raise StateError(f"the saved state was computed with flash attention {'off' if saved_off else 'on'}, "
                             f"this LLM has it {'off' if this_off else 'on'} (GenerationConfig.flash_attn)")
        tokens = saved.tokens
        try:
            self.vocab.check_tokens(tokens)
        except ValueError as error:
            raise StateError(f"the saved state's token record is invalid: {error}") from None
        if bool(tokens) != bool(saved.body):
            raise StateError("the saved state's token record and cache data disagree")
        n_prefilled = saved.header.get("n_prefilled")
        if isinstance(n_prefilled, bool) or not isinstance(n_prefilled, int) or not 0 <= n_prefilled <= len(tokens):
            raise StateError(f"the saved state's prefilled count ({n_prefilled!r}) is out of range")
        kinds = _sequence.kinds_from_runs(saved.header.get("prefill_kinds"), n_prefilled)
        if kinds is None:
            raise StateError("the saved state's record of prompt chunks is invalid")
        config = self.config
        if config.n_ctx is not None:
            n_ctx = config.n_ctx
            if len(tokens) >= n_ctx:
                raise StateError(f"the saved state holds {len(tokens)} tokens but this LLM's context "
                                 f"holds {n_ctx}; raise n_ctx")
        else:  # the saved context's size (the continuation fits as it did), within the trained one
            n_train = self.model.n_ctx_train
            if n_train > 0 and len(tokens) >= n_train:
                raise StateError(f"the saved state holds {len(tokens)} tokens, more than the model's "
                                 f"trained context ({n_train})")
            n_ctx = max(min(saved.header["n_ctx"], n_train if n_train > 0 else 1 << 20),
                        -(-(len(tokens) + 1) // 256) * 256)
        self._claim_idle("load_state")
        try:
            if not tokens:
                if self._seq is not None:
                    self._seq.clear()
                return
            seq = self._sequence_for(n_ctx, config)
            before = (list(seq.tokens), bytearray(seq.kinds), seq.ctx.seq_state_get(seq.seq_id) if seq.tokens else b"")
            if seq.ctx.seq_state_set(saved.body, seq.seq_id) and \
                    seq.ctx.memory_seq_pos_min(seq.seq_id) == 0 and \
                    seq.ctx.memory_seq_pos_max(seq.seq_id) == len(tokens) - 1:
                seq.tokens[:] = tokens
                seq.n_prefilled = n_prefilled  # an older state has no kinds: taken as a fresh decode's
                if kinds:
                    seq.kinds = kinds
                return
            # Refused (llama.cpp emptied the sequence first): put back what it held.
            seq.ctx.memory_seq_rm(seq.seq_id, -1, -1)
            seq.tokens[:], seq.kinds = [], bytearray()
            if before[0] and seq.ctx.seq_state_set(before[2], seq.seq_id):
                seq.tokens[:], seq.kinds = before[0], before[1]
            raise StateError("llama.cpp refused the saved state's cache data (see the cyllama_cffi.llama log)")
        finally:
            self._starting = None

    def _identity(self) -> Dict[str, Any]:
        """What a saved state must match: the model's shape and size, not its file name."""
        model = self.model
        identity: Dict[str, Any] = {"n_vocab": len(self.vocab), "n_embd": model.n_embd, "n_layer": model.n_layer,
                                    "n_params": model.n_params, "size": model.size, "desc": model.description}
        active = [[adapter.path.name, adapter.file_size, scale] for adapter, scale in self._lora if scale]
        if active:  # the cache was computed with them: a state is for the same adapters only
            identity["lora"] = active
        return identity

    def _claim_idle(self, what: str, finish_reread: bool = False) -> None:
        """Take the context for ``what`` (not a generation): refused while a stream is not finished.

        ``finish_reread``: let a re-read of the last answer (``KVSequence.reread_generated``)
        finish rather than stop it."""
        if self._released:
            raise ClosedError("this LLM is closed: its model was freed when its with block ended")
        with self._lock:
            previous = self._owner() if self._owner is not None else None
        if previous is not None and previous.state is not StreamState.FINISHED:
            raise LLMBusyError(f"{what}: a stream of this LLM is still running; finish it, close() it "
                               "or cancel() it first")
        self._claim(finish_reread=finish_reread)

    # -- ownership of the context ------------------------------------------------------------
    def _claim(self, prompt: Optional[Sequence[int]] = None, finish_reread: bool = False) -> None:
        """Become the one generation that uses the context, or raise ``LLMBusyError``.

        ``prompt``: the tokens the generation will read, so that a re-read of the last answer
        that they hold is waited for rather than stopped (``KVSequence.settle``)."""
        me = threading.current_thread()
        with self._lock:
            starting = self._starting
            # One left by this thread or a dead one was interrupted (Ctrl-C) on its way: stale.
            if starting is not None and starting is not me and starting.is_alive():
                raise LLMBusyError("another thread is starting a generation on this LLM; "
                                   "an LLM is not thread-safe: use one per thread, or take turns")
            previous = self._owner() if self._owner is not None else None
            if previous is not None and previous._holds_llm_against(me):
                raise LLMBusyError("another thread is consuming a stream of this LLM; an LLM is not "
                                   "thread-safe: finish, close() or cancel() that stream first")
            self._starting = me
        try:
            if previous is not None:
                previous._supersede()  # at most one graph node of its decode to wait for
            if self._seq is not None:
                self._seq.settle(prompt, finish_reread)  # a chunk left running by an earlier stream
        except BaseException:
            self._starting = None
            raise

    def _finished(self, stream: Stream) -> None:
        """A stream ended: remember how, and free the LLM if it was the owner."""
        with self._lock:
            self.last_stats = stream.stats
            self.last_finish_reason = stream.finish_reason
            self.last_finished_at = stream._t_start + stream.stats.total_time
            if self._owner is not None and self._owner() is stream:
                self._owner = None
            close = self._close_with is not None and self._close_with() is stream
        if close:
            self._release()

    def _close_when_done(self, stream: Stream) -> Stream:
        """Close this LLM when ``stream`` ends (exhausted, closed, cancelled); return the stream.

        For the one-shot helpers (:func:`cyllama_cffi.api.complete` with ``stream=True``): the
        stream keeps the LLM alive while it is consumed (its end callback is the LLM's), and the
        model is freed as soon as it ends rather than whenever the garbage collector runs.
        """
        with self._lock:
            self._close_with = weakref.ref(stream)
        return stream

    def _context_size(self, n_prompt: int, config: GenerationConfig) -> int:
        """The context a prompt of ``n_prompt`` tokens needs under ``config``; ValueError if it can't fit."""
        if config.n_ctx is not None:
            n_ctx = config.n_ctx
        else:  # room for prompt + max_tokens, in steps of 256, at most the trained context
            wanted = n_prompt + max(config.max_tokens, 1)
            n_ctx = -(-wanted // 256) * 256
            if self.model.n_ctx_train > 0:
                n_ctx = min(n_ctx, self.model.n_ctx_train)
        if n_prompt >= n_ctx:
            raise ValueError(f"the prompt has {n_prompt} tokens but the context holds {n_ctx}; "
                             "shorten the prompt or raise n_ctx")
        return n_ctx

    def _sequence_for(self, n_ctx: int, config: GenerationConfig) -> KVSequence:
        """Sequence 0 of a context of at least ``n_ctx`` cells for ``config``: the current one or a new one."""
        # llama.cpp pads n_ctx (to 256 cells): an explicit one is compared as it was asked for.
        n_threads = config.n_threads or usable_cores()
        key = (config.n_batch, config.n_ubatch, n_threads, config.n_ctx, config.flash_attn)
        seq = self._seq
        if seq is not None and (self._ctx_key != key or seq.ctx.n_ctx < n_ctx):
            self._close_context()
            seq = None
        if seq is None:
            ctx = LlamaContext(self.model, n_ctx=n_ctx, n_batch=config.n_batch, n_ubatch=config.n_ubatch,
                               n_threads=n_threads, flash_attn=config.flash_attn)
            ctx.watch_sigint(self._sigint_watchers > 0)
            if self._lora:
                ctx.set_lora_adapters(self._lora)
            seq = self._seq = KVSequence(ctx, LlamaBatch(ctx.n_batch), flash_attn=config.flash_attn)
            self._ctx_key = key
            self._cancellation.attach(ctx)
        return seq

    def _close_context(self) -> None:
        seq, self._seq = self._seq, None
        if seq is not None:
            self._cancellation.attach(None)
            seq.ctx.close()  # waits for a decode still running, which reads the batch
            seq.batch.close()

    # -- lifetime ---------------------------------------------------------------------------------
    def reset_context(self) -> None:
        """Drop the context (and its KV cache); the next call makes a fresh one.

        A running generation is ended first, as by ``close()``.
        """
        self._end_generation()

    def close(self) -> None:
        """Free the context and the sampler; the model stays loaded, so the LLM can generate again.

        A running generation is cancelled first (its stream ends with ``finish_reason``
        "cancelled"); the next call makes a new context. Idempotent. Leaving a ``with LLM(...)``
        block also frees the model.
        """
        self._end_generation()

    def _end_generation(self) -> None:
        """Cancel and end the running stream (at most one graph node to wait for), then free the context."""
        if self._released:
            return
        with self._lock:
            stream = self._owner() if self._owner is not None else None
        if stream is not None:
            self.cancel()  # its thread stops between tokens too, not only inside a decode
        try:
            if stream is not None:
                stream._supersede()
            if self._seq is not None:
                self._seq.settle()
        finally:  # whatever the wait raised, the contexts are freed
            self._close_context()
            embedder, self._embedder = self._embedder, None
            if embedder is not None:
                embedder.close()  # its context only: the model is this LLM's

    def _release(self) -> None:
        """``close()``, then free the model too: the LLM is done, and later calls raise ``ClosedError``."""
        if self._released:
            return
        try:
            self.close()
        finally:
            self._released = True
            for adapter, _ in self._lora:
                adapter.close()  # before the model, which would free them itself
            self.model.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        """Free everything, the model included, when the ``with`` block ends."""
        self._release()

    def __repr__(self) -> str:
        return f"<LLM {self.model_name}{' closed' if self._released else ''}>"


def _acting(adapters: Sequence[Tuple[LoraAdapter, float]]) -> Any:
    """What changes the model's output: the adapters with a scale that is not 0, and their scales."""
    return {(id(adapter), scale) for adapter, scale in adapters if scale}


def _close_unused(adapters: Sequence[Tuple[LoraAdapter, float]], kept: Sequence[Tuple[LoraAdapter, float]]) -> None:
    """Free the adapters of ``adapters`` that ``kept`` does not hold."""
    keep = {id(adapter) for adapter, _ in kept}
    for adapter, _ in adapters:
        if id(adapter) not in keep:
            adapter.close()
