"""The low-level layer: one class per llama.cpp object, each owning (or borrowing) one C handle.

``LlamaModel`` (weights and metadata), ``LlamaVocab`` (its tokenizer, borrowed from the model),
``LlamaContext`` (KV cache, threads, logits, the cancel flag), ``LlamaBatch`` (token arrays for
``llama_decode``), ``LlamaSampler`` (a sampler chain) and ``LoraAdapter`` (a LoRA adapter loaded
for a model, applied by a context). Every call that llama.cpp would abort
the process on is checked here first and raises a Python exception instead.
"""

from .adapter import LoraAdapter
from .batch import LlamaBatch
from .context import LlamaContext, usable_cores
from .model import LlamaModel
from .sampler import LlamaSampler
from .vocab import LlamaVocab

__all__ = ["LlamaModel", "LlamaVocab", "LlamaContext", "LlamaBatch", "LlamaSampler", "LoraAdapter", "usable_cores"]
