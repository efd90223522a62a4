"""llama.cpp's log lines, routed to the ``cyllama_cffi.llama`` Python logger.

The C shim filters by level before anything reaches Python, so the quiet
default (errors only) costs nothing per line. ``set_verbose(True)`` lowers the
C threshold to forward everything. llama.cpp emits fragments (continuation
pieces without a newline); they are joined into whole lines here.

The stdlib ``logging`` module is imported when the first line is logged, not
with the package: with what it pulls in it is ~6 ms, a large part of the
package's import time, and a quiet run never logs.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Dict

if TYPE_CHECKING:
    import logging

# ggml_log_level values (ggml.h): NONE=0, DEBUG=1, INFO=2, WARN=3, ERROR=4, CONT=5
_GGML_DEBUG, _GGML_INFO, _GGML_WARN, _GGML_ERROR = 1, 2, 3, 4
# ... and the stdlib logging levels they map to (DEBUG, INFO, WARNING, ERROR; fixed by logging).
_TO_PYTHON = {_GGML_DEBUG: 10, _GGML_INFO: 20, _GGML_WARN: 30, _GGML_ERROR: 40}
_INFO = 20

_pending: Dict[int, str] = {}
_pending_lock = threading.Lock()
_lib: Any = None
_told_backend = False  # the CPU backend line is logged once, the first time verbose is on


def get_logger(name: str = "cyllama_cffi") -> "logging.Logger":
    """The package's logger (``cyllama_cffi.llama`` for llama.cpp's own lines)."""
    import logging

    return logging.getLogger(name)


def _emit(level: int, text: str) -> None:
    with _pending_lock:
        text = _pending.pop(level, "") + text
        lines = text.split("\n")
        if lines[-1]:
            _pending[level] = lines[-1]
    for line in lines[:-1]:
        if line.strip():
            get_logger("cyllama_cffi.llama").log(_TO_PYTHON.get(level, _INFO), "%s", line)


def install(ffi: Any, lib: Any) -> None:
    """Point llama.cpp's logger at the shim's sink (called once by _ffi)."""
    global _lib
    _lib = lib

    @ffi.def_extern(onerror=lambda *exc: None)
    def cyl_py_log(level: int, text: Any) -> None:
        _emit(level, ffi.string(text).decode("utf-8", "replace"))

    lib.llama_log_set(ffi.addressof(lib, "cyl_log_sink"), ffi.NULL)


def set_verbose(verbose: bool) -> None:
    """Forward all of llama.cpp's log lines (True) or only errors (False)."""
    import logging

    global _told_backend
    _lib.cyl_log_set_threshold(_GGML_DEBUG if verbose else _GGML_ERROR)
    logger = get_logger("cyllama_cffi.llama")
    if verbose and logger.getEffectiveLevel() > logging.INFO and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO)
        logger.setLevel(logging.DEBUG)
    if verbose and not _told_backend:  # which CPU kernels run: a portable install picks them at import
        from .system import system_info

        _told_backend = True
        logger.info("%s", system_info())
