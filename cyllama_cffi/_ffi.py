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


def _load_cpu_backend() -> None:
    """A portable build ships ggml's CPU backend as one module per instruction-set level
    (``libggml-cpu-<variant>.so`` next to this file) instead of linking it: load the best
    one for this CPU, from this directory only (not the working directory, not
    ``GGML_BACKEND_PATH``'s default search), before anything asks for a device."""
    if lib.ggml_backend_dev_by_type(lib.GGML_BACKEND_DEVICE_TYPE_CPU) != ffi.NULL:
        return  # built from source: the CPU backend is linked into libggml
    package_dir = os.path.dirname(os.path.abspath(__file__))
    lib.ggml_backend_load_all_from_path(os.fsencode(package_dir))
    if lib.ggml_backend_dev_by_type(lib.GGML_BACKEND_DEVICE_TYPE_CPU) == ffi.NULL:
        raise ImportError(
            f"cyllama_cffi found no CPU backend of ggml it can load in {package_dir} "
            "(expected libggml-cpu-<variant>.so files from a portable wheel; "
            "reinstall the package)")


_load_cpu_backend()
lib.llama_backend_init()


def _shutdown() -> None:
    # After this, a late log line from a llama.cpp thread must not call into a
    # finalising interpreter.
    lib.cyl_log_set_enabled(False)


atexit.register(_shutdown)

__all__ = ["ffi", "lib"]
