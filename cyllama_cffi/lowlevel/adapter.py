"""``LoraAdapter``: owns one ``llama_adapter_lora*``, loaded for one model.

Lifetimes, as llama.cpp's pinned version has them: an adapter registers itself with its model,
and ``llama_model_free`` deletes every adapter still registered; ``llama_adapter_lora_free``
unregisters it first. So an adapter is freed here *before* its model (it is a dependent of the
model: closing the model closes it), never after. A context that uses an adapter keeps a raw
pointer to it and dereferences it at each decode, so such a context is a dependent of the
adapter in turn (see :meth:`LlamaContext.set_lora_adapters`): closing the adapter closes the
context first. The finalizers run newest first at exit, after every context was closed.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Dict, Optional, Union

from .._ffi import ffi, lib
from .._lora_check import check_lora_path
from ..errors import ModelLoadError
from ._handle import CHandle
from .model import AdapterRegistry, LlamaModel, _read_string


class LoraAdapter(CHandle):
    """A LoRA adapter file loaded for ``model``.

    The file is checked in Python first (missing, not GGUF, not a LoRA adapter, made for
    another architecture or another model's shapes), because llama.cpp aborts the process on
    some malformed adapters; those raise ``InvalidGGUFError`` (a ``ValueError``) or an
    ``OSError``. Apply it with :meth:`LlamaContext.set_lora_adapters`.
    """

    _kind = "LoRA adapter"

    def __init__(self, model: LlamaModel, path: Union[str, "os.PathLike[str]"]) -> None:
        model_ptr = model.ptr  # ClosedError before anything else
        arch = model.meta("general.architecture") or ""
        self.path, info = check_lora_path(path, arch, model.tensor_dims())
        registry = model.adapters
        with registry.lock:
            pointer = lib.llama_adapter_lora_init(model_ptr, os.fsencode(str(self.path)))
            if pointer != ffi.NULL:
                registry.addresses.add(_address(pointer))
        if pointer == ffi.NULL:
            raise ModelLoadError(f"llama.cpp could not load the LoRA adapter {self.path} "
                                 "(see the cyllama_cffi.llama log)")
        super().__init__(pointer, functools.partial(_free_adapter, registry=registry))
        self._depend_on(model)
        self.model = model
        self.alpha: float = info.alpha  # 0.0: no alpha, the scale applies as given
        self.n_pairs: int = info.n_pairs  # how many model tensors it changes
        self.file_size: int = self.path.stat().st_size  # with the name, what a saved state records

    @property
    def metadata(self) -> Dict[str, str]:
        """The adapter's GGUF metadata as strings (array values left out, as llama.cpp keeps them)."""
        pointer = self.ptr
        result = {}
        for index in range(lib.llama_adapter_meta_count(pointer)):
            key = _read_string(lambda buf, size: lib.llama_adapter_meta_key_by_index(pointer, index, buf, size))
            result[key] = _read_string(
                lambda buf, size: lib.llama_adapter_meta_val_str_by_index(pointer, index, buf, size))
        return result

    def meta(self, key: str) -> Optional[str]:
        """One metadata value, or None."""
        pointer = self.ptr
        encoded = key.encode("utf-8")
        return _read_string(lambda buf, size: lib.llama_adapter_meta_val_str(pointer, encoded, buf, size),
                            missing_ok=True)

    def __repr__(self) -> str:
        return f"<LoraAdapter {self.path.name}{' closed' if self.closed else ''}>"


def _address(pointer: Any) -> int:
    return int(ffi.cast("uintptr_t", pointer))


def _free_adapter(pointer: Any, registry: AdapterRegistry) -> None:
    """Free the adapter unless its model already did (see ``AdapterRegistry``)."""
    with registry.lock:
        address = _address(pointer)
        if address in registry.addresses:
            registry.addresses.discard(address)
            lib.llama_adapter_lora_free(pointer)
