"""Exceptions raised by cyllama_cffi.

llama.cpp reports most failures with return codes (or by aborting the whole
process); each code or refused input maps to one of these, so callers can
catch precisely what they can handle.
"""

from __future__ import annotations


class LlamaError(RuntimeError):
    """Base class for failures reported by llama.cpp."""


class ClosedError(LlamaError):
    """The object (model, context, sampler...) was closed; its C handle is gone."""


class ModelLoadError(LlamaError):
    """llama.cpp could not load the model file (it returned NULL)."""


class DecodeError(LlamaError):
    """``llama_decode`` failed; ``code`` is its return value."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class ContextFullError(DecodeError):
    """No KV-cache slot for the batch (``llama_decode`` returned 1)."""


class DecodeAborted(InterruptedError):
    """The abort callback stopped ``llama_decode`` (it returned 2).

    Ubatches that finished before the abort stay in the KV cache; ``n_past``
    is the number of positions of sequence 0 that are really there now.
    """

    def __init__(self, message: str, n_past: int) -> None:
        super().__init__(message)
        self.n_past = n_past


class ContextBusyError(RuntimeError):
    """Another thread is using this context (llama.cpp contexts are not re-entrant)."""
