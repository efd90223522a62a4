"""cyllama_cffi: a pure-Python (cffi) binding over llama.cpp with two-layer cancellation.

High level: :class:`LLM` generates from a :class:`GenerationConfig`, returning a
:class:`Response` or a :class:`Stream`; ``llm.cancel()`` stops it from any thread;
``llm.chat(messages)`` renders the model's chat template first. ``complete``, ``chat`` and
``simple`` (from :mod:`cyllama_cffi.api`) do one call with a model loaded for it. Low level
(:mod:`cyllama_cffi.lowlevel`): ``LlamaModel``, ``LlamaVocab``, ``LlamaContext``,
``LlamaBatch``, ``LlamaSampler``, ``LoraAdapter``, each owning one C handle. ``ffi``/``lib`` expose all of
``llama.h`` for anything not wrapped.

Names are imported on first use, so that ``import cyllama_cffi`` is quick and the pure-Python
parts (configuration, errors, text assembly) work without the compiled module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Dict, List

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS: Dict[str, str] = {
    "LLM": "llm",
    "BatchGenerator": "batching", "BatchRequest": "batching", "BatchResponse": "batching",
    "batch_generate": "batching",
    "complete": "api", "chat": "api", "simple": "api",
    "AsyncLLM": "aio", "complete_async": "aio", "chat_async": "aio",
    "Stream": "stream", "StreamState": "stream",
    "GenerationConfig": "config",
    "Embedder": "embeddings",
    "Grammar": "grammar", "json_schema_to_gbnf": "_json_schema",
    "Response": "response", "GenerationStats": "response", "FinishReason": "response",
    "TokenLogprob": "_logprobs", "TopLogprob": "_logprobs",
    "install_sigint_handler": "sigint", "SigintHandle": "sigint",
    "set_verbose": "_logging",
    "system_info": "system", "SystemInfo": "system",
    "ResponseCacheInfo": "_response_cache",
    "estimate_gpu_layers": "memory", "estimate_memory_usage": "memory",
    "default_model_path": "models",
    "LlamaModel": "lowlevel", "LlamaVocab": "lowlevel", "LlamaContext": "lowlevel",
    "LlamaBatch": "lowlevel", "LlamaSampler": "lowlevel", "LoraAdapter": "lowlevel",
    "LlamaError": "errors", "ClosedError": "errors", "ModelLoadError": "errors", "InvalidGGUFError": "errors",
    "LoadCancelled": "errors", "ModelFetchError": "errors", "DecodeError": "errors",
    "ContextFullError": "errors", "DecodeAborted": "errors", "ContextBusyError": "errors",
    "LLMBusyError": "errors", "ChatTemplateError": "errors", "GrammarDeadEnd": "errors",
    "StateError": "errors",
    "ffi": "_ffi", "lib": "_ffi",
    # cyllama's defaults, also importable from cyllama_cffi.defaults
    "LLAMA_DEFAULT_SEED": "defaults", "DEFAULT_TEMPERATURE": "defaults", "DEFAULT_TOP_K": "defaults",
    "DEFAULT_TOP_P": "defaults", "DEFAULT_MIN_P": "defaults", "DEFAULT_REPEAT_PENALTY": "defaults",
    "DEFAULT_PENALTY_LAST_N": "defaults", "DEFAULT_PENALTY_FREQ": "defaults", "DEFAULT_PENALTY_PRESENT": "defaults",
    "DEFAULT_MAX_TOKENS": "defaults", "DEFAULT_N_GPU_LAYERS": "defaults", "DEFAULT_N_BATCH": "defaults",
    "DEFAULT_MAIN_GPU": "defaults", "DEFAULT_SPLIT_MODE": "defaults",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on demand
    from ._ffi import ffi, lib
    from ._logging import set_verbose
    from ._logprobs import TokenLogprob, TopLogprob
    from ._response_cache import ResponseCacheInfo
    from .batching import BatchGenerator, BatchRequest, BatchResponse, batch_generate
    from .api import chat, complete, simple
    from .aio import AsyncLLM, chat_async, complete_async
    from .config import GenerationConfig
    from .embeddings import Embedder
    from ._json_schema import json_schema_to_gbnf
    from .defaults import (DEFAULT_MAIN_GPU, DEFAULT_MAX_TOKENS, DEFAULT_MIN_P, DEFAULT_N_BATCH, DEFAULT_N_GPU_LAYERS,
                           DEFAULT_PENALTY_FREQ, DEFAULT_PENALTY_LAST_N, DEFAULT_PENALTY_PRESENT, DEFAULT_REPEAT_PENALTY,
                           DEFAULT_SPLIT_MODE, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P, LLAMA_DEFAULT_SEED)
    from .errors import (ChatTemplateError, ClosedError, ContextBusyError, ContextFullError, DecodeAborted,
                         DecodeError, GrammarDeadEnd, InvalidGGUFError, LlamaError, LLMBusyError, LoadCancelled,
                         ModelFetchError, ModelLoadError, StateError)
    from .grammar import Grammar
    from .llm import LLM
    from .lowlevel import LlamaBatch, LlamaContext, LlamaModel, LlamaSampler, LlamaVocab, LoraAdapter
    from .memory import estimate_gpu_layers, estimate_memory_usage
    from .models import default_model_path
    from .response import FinishReason, GenerationStats, Response
    from .sigint import SigintHandle, install_sigint_handler
    from .stream import Stream, StreamState
    from .system import SystemInfo, system_info


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cyllama_cffi' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_EXPORTS))
