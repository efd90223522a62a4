"""One-shot helpers: load a model, do one thing, free it (cyllama's module-level functions).

For more than one call, make an :class:`~cyllama_cffi.LLM` and keep it: each helper loads the
model again. With ``stream=True`` the helper returns the LLM's :class:`~cyllama_cffi.Stream`;
the stream keeps the model loaded while it is read, and the model is freed when the stream
ends (exhausted, closed or cancelled). ``complete``, ``chat`` and ``simple`` are also at the
package root.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from . import chat_template as _templates
from ._logging import set_verbose
from .aio import chat_async, complete_async, stream_complete_async
from .config import GenerationConfig
from .llm import LLM
from .lowlevel.model import LlamaModel
from .response import FinishReason, Response
from .stream import Stream

__all__ = ["complete", "chat", "apply_chat_template", "get_chat_template", "simple",
           "complete_async", "chat_async", "stream_complete_async"]

PathLike = Union[str, "os.PathLike[str]"]


def complete(prompt: str, model_path: PathLike, config: Optional[GenerationConfig] = None, stream: bool = False,
             verbose: bool = False, **kwargs: Any) -> Union[Response, Stream]:
    """Generate from ``prompt`` with a model loaded for this call; ``kwargs`` override ``config`` fields."""
    llm = LLM(model_path, config, verbose=verbose, **kwargs)
    return _one_shot(llm, lambda: llm.stream(prompt) if stream else llm(prompt))


def chat(messages: Sequence[Mapping[str, Any]], model_path: PathLike, config: Optional[GenerationConfig] = None,
         stream: bool = False, verbose: bool = False, template: Optional[str] = None,
         **kwargs: Any) -> Union[Response, Stream]:
    """Answer chat ``messages`` with a model loaded for this call (see :meth:`LLM.chat`)."""
    llm = LLM(model_path, config, verbose=verbose, **kwargs)
    return _one_shot(llm, lambda: llm.chat(messages, stream=stream, template=template))


def apply_chat_template(messages: Sequence[Mapping[str, Any]], model_path: PathLike, template: Optional[str] = None,
                        add_generation_prompt: bool = True, verbose: bool = False) -> str:
    """``messages`` as prompt text in the model's chat format (see :mod:`cyllama_cffi.chat_template`).

    Only the model's vocabulary and metadata are read, not its weights.
    """
    if verbose:
        set_verbose(True)
    with LlamaModel(model_path, vocab_only=True) as model:
        return _templates.apply_chat_template(model, messages, template, add_generation_prompt)


def get_chat_template(model_path: PathLike, template_name: Optional[str] = None) -> str:
    """The chat template text stored in the model file (or the one stored as ``template_name``); "" when none."""
    with LlamaModel(model_path, vocab_only=True) as model:
        return _templates.get_chat_template(model, template_name)


def simple(model_path: PathLike, prompt: str, ngl: int = -1, n_predict: int = 32, n_ctx: Optional[int] = None,
           verbose: bool = False) -> bool:
    """Print ``prompt`` and its greedy continuation of at most ``n_predict`` tokens, then the speed.

    The prompt is raw text (no chat template), its special tokens parsed; ``ngl``: layers on
    the GPU (-1: all). True when the generation ran to its end (end-of-generation token or
    ``n_predict``), False when it was cancelled.
    """
    config = GenerationConfig(temperature=0.0, max_tokens=n_predict, n_gpu_layers=ngl, n_ctx=n_ctx)
    with LLM(model_path, config, verbose=verbose) as llm:
        print(prompt, end="", flush=True)
        with llm.stream(prompt) as stream:
            for chunk in stream:
                print(chunk, end="", flush=True)
        print()
        stats = stream.stats
        print(f"decoded {stats.generated_tokens} tokens in {stats.generation_time:.2f} s, "
              f"speed: {stats.tokens_per_second:.2f} t/s")
    return stream.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)


def _one_shot(llm: LLM, call: Callable[[], Union[Response, Stream]]) -> Union[Response, Stream]:
    """``call()``'s result; the LLM (model included) is freed after it, or when the stream it returned ends."""
    try:
        result = call()
    except BaseException:
        llm._release()
        raise
    if isinstance(result, Stream):
        return llm._close_when_done(result)
    llm._release()
    return result
