"""cyllama_cffi: a pure-Python (cffi) binding over llama.cpp with two-layer cancellation.

High level: ``LLM`` and ``GenerationConfig`` (the cyllama API). Low level:
``LlamaModel``, ``LlamaVocab``, ``LlamaContext``, ``LlamaBatch``,
``LlamaSampler``, each owning one C handle. ``ffi``/``lib`` expose all of
llama.h for anything not wrapped.
"""

from ._ffi import ffi, lib
from ._logging import set_verbose
from .api import LLM
from .batch import LlamaBatch
from .config import GenerationConfig
from .context import LlamaContext
from .errors import (ClosedError, ContextBusyError, ContextFullError, DecodeAborted, DecodeError, LlamaError,
                     ModelLoadError)
from .gguf_check import InvalidGGUFError
from .model import LlamaModel
from .response import GenerationStats, Response
from .sampler import LlamaSampler
from .sigint import SigintHandle, install_sigint_handler
from .vocab import LlamaVocab

__version__ = "0.1.0"

__all__ = [
    "LLM", "GenerationConfig", "Response", "GenerationStats",
    "LlamaModel", "LlamaVocab", "LlamaContext", "LlamaBatch", "LlamaSampler",
    "install_sigint_handler", "SigintHandle", "set_verbose",
    "LlamaError", "ClosedError", "ModelLoadError", "DecodeError", "ContextFullError", "DecodeAborted",
    "ContextBusyError", "InvalidGGUFError",
    "ffi", "lib", "__version__",
]
