"""Every exception cyllama_cffi raises for a failure of llama.cpp or of the LLM's state.

The hierarchy::

    LlamaError (RuntimeError)
    ├── ClosedError              the object was closed; its C handle is gone
    ├── ModelLoadError           llama.cpp could not load the model file
    │   └── InvalidGGUFError     refused before llama.cpp saw it (also a ValueError)
    ├── LoadCancelled            a model load stopped by its progress callback or cancel_event
    ├── ModelFetchError          the default model could not be fetched or verified
    ├── DecodeError              llama_decode failed; ``code`` is its return value
    │   ├── ContextFullError     no KV-cache room for the batch (code 1)
    │   └── DecodeAborted        the abort flag stopped the decode (code 2)
    ├── ChatTemplateError        no chat template could render the messages (also a ValueError)
    ├── ContextBusyError         another thread is using the context
    │   └── LLMBusyError         another thread is generating on this LLM
    ├── GrammarDeadEnd           the grammar allows no token at all (also a ValueError)
    └── StateError               a saved state that cannot be loaded (also a ValueError)

Mistakes in the arguments of a call (a bad config value, an empty prompt, a token id outside
the vocabulary) raise ``ValueError`` or ``TypeError`` as Python's own functions do: they are
found in Python before any C call, and nothing is changed when they are raised.
"""

from __future__ import annotations

__all__ = [
    "LlamaError", "ClosedError", "ModelLoadError", "InvalidGGUFError", "LoadCancelled", "ModelFetchError",
    "DecodeError", "ContextFullError", "DecodeAborted", "ChatTemplateError", "ContextBusyError", "LLMBusyError",
    "GrammarDeadEnd", "StateError",
]


class LlamaError(RuntimeError):
    """Base class of every failure reported by llama.cpp or by this package's objects."""


class ClosedError(LlamaError):
    """The object (model, context, sampler, LLM...) was closed; its C handle is gone."""


class ModelLoadError(LlamaError):
    """llama.cpp could not load the model file (its reason is on the ``cyllama_cffi.llama`` logger)."""


class InvalidGGUFError(ModelLoadError, ValueError):
    """The file is not a GGUF file llama.cpp can safely read; found before llama.cpp opened it."""


class LoadCancelled(LlamaError):
    """A model load was stopped by its progress callback (returning False) or its ``cancel_event``."""


class ModelFetchError(LlamaError):
    """The default model could not be downloaded, or failed its sha256 check."""


class DecodeError(LlamaError):
    """``llama_decode`` failed; ``code`` is its return value."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, code)
        self.code = code

    def __str__(self) -> str:
        return str(self.args[0])


class ContextFullError(DecodeError):
    """No KV-cache slot for the batch (``llama_decode`` returned 1)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message, code)


class DecodeAborted(DecodeError):
    """The abort flag stopped ``llama_decode`` (it returned 2).

    Ubatches that finished before the abort stay in the KV cache; ``n_past`` is the number of
    positions of the sequence that are really there now.
    """

    def __init__(self, message: str, n_past: int) -> None:
        super().__init__(message, 2)
        self.args = (message, n_past)  # what pickling passes back to __init__
        self.n_past = n_past


class ChatTemplateError(LlamaError, ValueError):
    """No chat template could render the messages.

    The model's template refused them (its ``raise_exception``, e.g. "System role not
    supported") or failed, and llama.cpp's template engine does not know it either; or the
    ``template`` asked for is neither stored in the model, nor a llama.cpp built-in, nor a Jinja
    template. The Jinja error, when there was one, is the ``__cause__``.
    """


class ContextBusyError(LlamaError):
    """Another thread is using this context (llama.cpp contexts are not re-entrant)."""


class LLMBusyError(ContextBusyError):
    """Another thread is generating on this LLM; one LLM runs one generation at a time."""


class GrammarDeadEnd(LlamaError, ValueError):
    """The grammar allows no token of the vocabulary at this point of the generation.

    It needs text no token can produce (a NUL character, a ``<[id]>`` outside the vocabulary);
    llama.cpp would abort the process here, so the generation ends with this error instead.
    """


class StateError(LlamaError, ValueError):
    """A saved state that cannot be loaded: not one, corrupted, truncated, or from another model.

    Loading it changed nothing: the LLM's cache and token record are as they were.
    """
