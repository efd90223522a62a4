"""``LlamaModel``: owns one ``llama_model*`` (weights, metadata, vocabulary)."""

from __future__ import annotations

import functools
import os
import threading
from typing import Any, Callable, Dict, Optional, Sequence, Set, Tuple, Union

from .._ffi import ffi, lib
from ._handle import CHandle
from .._logging import get_logger
from ..errors import LoadCancelled, ModelLoadError
from .._gguf_check import check_model_path, inspect_gguf
from .._huge_pages import HugePageAdvisor, supported as huge_pages_supported


ProgressCallback = Callable[[float], Optional[bool]]

class _LoadState:
    def __init__(self, callback: Optional[ProgressCallback], cancel_event: Optional[threading.Event],
                 advisor: Optional[HugePageAdvisor] = None):
        self.callback = callback
        self.cancel_event = cancel_event
        self.advisor = advisor  # advises the weight buffers at the first callback, before they are read
        self.cancelled = False
        self.huge_page_bytes = 0
        self.error: Optional[BaseException] = None


@ffi.def_extern(onerror=lambda *exc: False)
def cyl_py_progress(progress: float, user_data: Any) -> bool:
    state: _LoadState = ffi.from_handle(user_data)
    if state.advisor is not None:
        advisor, state.advisor = state.advisor, None
        try:
            state.huge_page_bytes = advisor.advise()
        except Exception as error:  # the load is worth more than the advice
            get_logger().debug("huge page advice failed: %r", error)
    if state.cancel_event is not None and state.cancel_event.is_set():
        state.cancelled = True
        return False
    if state.callback is not None:
        try:
            if state.callback(progress) is False:
                state.cancelled = True
                return False
        except BaseException as error:  # stop the load, re-raise in the loading thread
            state.error = error
            return False
    return True


class AdapterRegistry:
    """The LoRA adapters llama.cpp would free with the model, shared by the model's and their finalizers.

    ``llama_model_free`` deletes every adapter still registered with the model. Normally the
    adapters are closed first (they are the model's dependents), but the garbage collector
    may finalize a cycle holding both in any order: whichever finalizer runs second must
    then know whether the adapter is already gone.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.addresses: Set[int] = set()


def _free_model(pointer: Any, adapters: AdapterRegistry) -> None:
    with adapters.lock:
        adapters.addresses.clear()  # llama_model_free deletes them
        lib.llama_model_free(pointer)


class LlamaModel(CHandle):
    """A loaded GGUF model.

    The path is checked in Python first (missing file, directory, unreadable,
    malformed GGUF), because some malformed files make llama.cpp abort the
    process. ``progress_callback(fraction)`` may return ``False`` to stop the
    load; setting ``cancel_event`` from another thread stops it too. Both end in
    ``LoadCancelled``.

    ``use_mmap=False`` reads a private copy of the weights into memory; with ``huge_pages``
    (the default) that memory is put on transparent huge pages where Linux offers them, which
    decodes faster than the shared file mapping (see ``cyllama_cffi._huge_pages``). ``huge_page_bytes``
    says how much was advised (0 with mmap, or where there are no huge pages).
    """

    _kind = "model"

    def __init__(
        self,
        path: Union[str, "os.PathLike[str]"],
        *,
        n_gpu_layers: int = 0,
        main_gpu: int = 0,
        split_mode: Optional[int] = None,
        tensor_split: Optional[Sequence[float]] = None,
        vocab_only: bool = False,
        use_mmap: bool = True,
        huge_pages: bool = True,
        check_tensors: bool = False,
        progress_callback: Optional[ProgressCallback] = None,
        cancel_event: Optional[threading.Event] = None,
    ) -> None:
        self.path = check_model_path(path)
        params = lib.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.main_gpu = main_gpu
        if split_mode is not None:
            params.split_mode = split_mode
        params.vocab_only = vocab_only
        params.check_tensors = check_tensors
        if not use_mmap:
            params.load_mode = lib.LLAMA_LOAD_MODE_NONE
        keepalive = []
        if tensor_split:
            n_devices = lib.llama_max_devices()
            if len(tensor_split) > n_devices:
                raise ValueError(f"tensor_split has {len(tensor_split)} entries; this build supports {n_devices}")
            split = ffi.new("float[]", n_devices)
            for index, value in enumerate(tensor_split):
                split[index] = value
            params.tensor_split = split
            keepalive.append(split)
        advisor = HugePageAdvisor() if not use_mmap and huge_pages and huge_pages_supported() else None
        state = _LoadState(progress_callback, cancel_event, advisor)
        handle = ffi.new_handle(state)
        params.progress_callback = ffi.addressof(lib, "cyl_py_progress")
        params.progress_callback_user_data = handle
        pointer = lib.llama_model_load_from_file(os.fsencode(str(self.path)), params)
        del keepalive
        if state.error is not None:
            if pointer != ffi.NULL:
                lib.llama_model_free(pointer)
            raise state.error
        if pointer == ffi.NULL:
            if state.cancelled:
                raise LoadCancelled(f"loading {self.path} was cancelled")
            raise ModelLoadError(f"llama.cpp could not load {self.path} (see the cyllama_cffi.llama log)")
        self.adapters = AdapterRegistry()
        super().__init__(pointer, functools.partial(_free_model, adapters=self.adapters))
        self.vocab_only = vocab_only
        self.use_mmap = use_mmap
        self.huge_page_bytes: int = state.huge_page_bytes
        self._vocab: Any = None
        self._tensor_dims: Optional[Dict[str, Tuple[int, ...]]] = None

    # -- properties -------------------------------------------------------
    @property
    def vocab(self):
        """The model's ``LlamaVocab`` (borrowed from the model, not separately owned)."""
        if self._vocab is None:
            from .vocab import LlamaVocab
            self._vocab = LlamaVocab(self)
        return self._vocab

    @property
    def n_ctx_train(self) -> int:
        return lib.llama_model_n_ctx_train(self.ptr)

    @property
    def n_embd(self) -> int:
        return lib.llama_model_n_embd(self.ptr)

    @property
    def n_layer(self) -> int:
        return lib.llama_model_n_layer(self.ptr)

    @property
    def n_head(self) -> int:
        return lib.llama_model_n_head(self.ptr)

    @property
    def n_params(self) -> int:
        return lib.llama_model_n_params(self.ptr)

    @property
    def size(self) -> int:
        """Bytes of all tensors."""
        return lib.llama_model_size(self.ptr)

    @property
    def description(self) -> str:
        return _read_string(lambda buf, size: lib.llama_model_desc(self.ptr, buf, size))

    @property
    def metadata(self) -> Dict[str, str]:
        """All GGUF metadata as strings (arrays are summarised by llama.cpp)."""
        pointer = self.ptr
        result = {}
        for index in range(lib.llama_model_meta_count(pointer)):
            key = _read_string(lambda buf, size: lib.llama_model_meta_key_by_index(pointer, index, buf, size))
            result[key] = _read_string(
                lambda buf, size: lib.llama_model_meta_val_str_by_index(pointer, index, buf, size))
        return result

    def tensor_dims(self) -> Optional[Dict[str, Tuple[int, ...]]]:
        """Each tensor's ggml dims as the file declares them (read once); None for a split model.

        A split model's tensors live in several files; only the first was checked here.
        """
        if self._tensor_dims is None:
            info = inspect_gguf(self.path, semantics=False)
            split = info.metadata.get("split.count")
            if split is not None and isinstance(split[1], int) and split[1] > 1:
                return None
            self._tensor_dims = {tensor.name: tensor.dims for tensor in info.tensors}
        return self._tensor_dims

    def meta(self, key: str) -> Optional[str]:
        """One metadata value, or None."""
        pointer = self.ptr
        encoded = key.encode("utf-8")
        text = _read_string(lambda buf, size: lib.llama_model_meta_val_str(pointer, encoded, buf, size),
                            missing_ok=True)
        return text

    def chat_template(self, name: Optional[str] = None) -> Optional[str]:
        """The chat template stored in the GGUF (``tokenizer.chat_template``), or None."""
        result = lib.llama_model_chat_template(self.ptr, name.encode() if name else ffi.NULL)
        return None if result == ffi.NULL else ffi.string(result).decode("utf-8", "replace")

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.description
        return f"<LlamaModel {self.path.name} {state}>"


def _read_string(fill: Callable[[Any, int], int], missing_ok: bool = False) -> Any:
    """Call a llama.cpp ``(buf, size) -> length`` function, growing the buffer as needed."""
    size = 256
    while True:
        buffer = ffi.new("char[]", size)
        length = fill(buffer, size)
        if length < 0:
            if missing_ok:
                return None
            return ""
        if length < size:
            return ffi.string(buffer, length).decode("utf-8", "replace")
        size = length + 1
