"""What llama.cpp runs on here: which CPU kernels were loaded, with which features.

A portable wheel carries ggml's CPU backend once per instruction-set level
(``libggml-cpu-haswell.so``, ``libggml-cpu-zen4.so``, ...) and loads the best one for
the running CPU at import; a build from source links one compiled for its own CPU.
:func:`system_info` says which of the two happened, so a slow run can be told apart
from a wrong variant.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

_VARIANT_FILE = re.compile(r"^libggml-cpu-(.+)\.so$")


@dataclass(frozen=True)
class SystemInfo:
    """The CPU backend llama.cpp uses in this process."""

    cpu_variant: Optional[str]
    """The variant a portable install loaded (``"haswell"``, ``"skylakex"``, ``"zen4"``...);
    ``None`` when the CPU backend is linked into libggml (a build from source)."""
    cpu_library: Optional[str]
    """The shared library holding the CPU kernels (``None`` where it cannot be told)."""
    cpu_description: str
    """The CPU as ggml names it."""
    cpu_features: Dict[str, str]
    """The instruction sets and options the loaded kernels were compiled with."""
    llama_system_info: str
    """``llama_print_system_info()``, verbatim."""

    def __str__(self) -> str:
        variant = self.cpu_variant or "built from source"
        features = " ".join(name for name, value in self.cpu_features.items() if value == "1")
        return f"CPU backend: {variant} ({self.cpu_library or 'linked in'}); {self.cpu_description}; {features}"


def system_info() -> SystemInfo:
    """Describe the CPU backend loaded in this process (loads the compiled module)."""
    from ._ffi import ffi, lib

    device = lib.ggml_backend_dev_by_type(lib.GGML_BACKEND_DEVICE_TYPE_CPU)
    assert device != ffi.NULL, "_ffi raises on import when no CPU backend loads"
    reg = lib.ggml_backend_dev_backend_reg(device)
    get_features = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_get_features")
    features: Dict[str, str] = {}
    library = None
    if get_features != ffi.NULL:
        entry = ffi.cast("ggml_backend_get_features_t", get_features)(reg)
        while entry.name != ffi.NULL:
            features[ffi.string(entry.name).decode()] = ffi.string(entry.value).decode()
            entry += 1
        # The function lives in the CPU backend's own library: the mapping that holds it names it.
        library = _library_holding(int(ffi.cast("uintptr_t", get_features)))
    variant = None
    if library is not None:
        match = _VARIANT_FILE.match(Path(library).name)
        variant = match.group(1) if match else None
    return SystemInfo(
        cpu_variant=variant,
        cpu_library=library,
        cpu_description=ffi.string(lib.ggml_backend_dev_description(device)).decode(errors="replace"),
        cpu_features=features,
        llama_system_info=ffi.string(lib.llama_print_system_info()).decode(errors="replace").strip(),
    )


_vec_dot_probe: Optional[Callable[[int], bool]] = None


def cpu_can_compute(ggml_type: int) -> bool:
    """Whether ggml's CPU backend has a dot product for this tensor type (the types it
    cannot compute with crash the first decode). The check lives in the CPU backend's
    library: linked into libggml by a build from source, a loaded module in a portable
    install, where it is reached through that module's own export."""
    global _vec_dot_probe
    if _vec_dot_probe is None:
        _vec_dot_probe = _make_vec_dot_probe()
    return _vec_dot_probe(ggml_type)


def _make_vec_dot_probe() -> Callable[[int], bool]:
    from ._ffi import ffi, lib

    if hasattr(lib, "ggml_get_type_traits_cpu"):
        return lambda ggml_type: lib.ggml_get_type_traits_cpu(ggml_type).vec_dot != ffi.NULL
    library = system_info().cpu_library
    if library is None:  # pragma: no cover - only where /proc/self/maps is missing
        raise RuntimeError("cannot locate the loaded CPU backend of ggml")
    import cffi

    abi = cffi.FFI()
    # ggml-cpu.h's struct ggml_type_traits_cpu, with its function pointers as void *
    abi.cdef("struct traits { void *from_float; void *vec_dot; int vec_dot_type; int64_t nrows; };"
             "const struct traits *ggml_get_type_traits_cpu(int type);")
    module = abi.dlopen(library)  # already loaded: the same handle, nothing runs again
    return lambda ggml_type: module.ggml_get_type_traits_cpu(ggml_type).vec_dot != abi.NULL


def _library_holding(address: int) -> Optional[str]:
    """The file mapped at ``address`` in this process (Linux's /proc/self/maps), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(None, 5)
                if len(fields) < 6:
                    continue
                start, end = (int(part, 16) for part in fields[0].split("-"))
                if start <= address < end:
                    return fields[5].strip() or None
    except OSError:
        return None
    return None
