"""The one place that imports the compiled cffi module and initialises llama.cpp.

Every other module takes ``ffi`` and ``lib`` from here, so the backend is
initialised exactly once and the log sink is in place before llama.cpp prints
anything (with no sink, loading a model prints thousands of lines to stderr).
"""

from __future__ import annotations

import atexit
import os

# GGML_ABORT would otherwise try to attach gdb for a backtrace before dying.
os.environ.setdefault("GGML_NO_BACKTRACE", "1")

try:
    from ._libllama import ffi, lib
except ImportError as error:  # pragma: no cover - only on a broken install
    raise ImportError(
        "cyllama_cffi's compiled module is missing or cannot load its libllama "
        f"({error}). Install the package with `pip install .` (this builds llama.cpp), "
        "or run `python build_libllama.py` in a source checkout."
    ) from error

from . import _logging

_logging.install(ffi, lib)
lib.llama_backend_init()


def _shutdown() -> None:
    # After this, a late log line from a llama.cpp thread must not call into a
    # finalising interpreter.
    lib.cyl_log_set_enabled(False)


atexit.register(_shutdown)

__all__ = ["ffi", "lib"]
