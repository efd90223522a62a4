"""The generated cdef covers llama.h and the package is self-contained."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import cyllama_cffi
from cyllama_cffi import ffi, lib


def llama_api_functions(header: Path) -> set:
    text = re.sub(r"//[^\n]*", "", header.read_text())
    return set(re.findall(r"LLAMA_API[^;{]*?\b(llama_\w+)\s*\(", text, re.S))


def test_every_llama_api_function_is_on_lib(llama_cpp_dir):
    names = llama_api_functions(llama_cpp_dir / "include" / "llama.h")
    assert len(names) > 200  # the pinned llama.h declares 255
    missing = sorted(name for name in names if not hasattr(lib, name))
    assert missing == []


def test_integer_constants_are_re_added():
    assert lib.LLAMA_DEFAULT_SEED == 0xFFFFFFFF
    assert lib.LLAMA_TOKEN_NULL == -1
    assert lib.GGML_MAX_DIMS == 4


def test_native_libraries_ship_inside_the_package():
    package = Path(cyllama_cffi.__file__).parent
    shipped = {path.name.split(".so")[0] for path in package.glob("lib*.so*")}
    assert {"libllama", "libggml", "libggml-base", "libggml-cpu"} <= shipped


def test_import_is_quiet_and_fast_in_a_fresh_process():
    code = "import time; t = time.perf_counter(); import cyllama_cffi; print(time.perf_counter() - t)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stderr == ""
    assert float(result.stdout) < 2.0  # generous; the real figure is in docs/performance.md


def test_import_leaves_logging_json_and_queue_for_first_use():
    # Each costs the import milliseconds it only needs when a line is logged, a response is
    # serialised or a prompt decodes; importing them at the top would pass every other test.
    code = ("import sys\n"
            "before = {'logging', 'json', 'queue'} & set(sys.modules)\n"
            "import cyllama_cffi\n"
            "print(sorted(({'logging', 'json', 'queue'} & set(sys.modules)) - before))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_loading_a_model_prints_nothing_by_default(model_path):
    code = ("from cyllama_cffi.lowlevel.model import LlamaModel\n"
            f"LlamaModel({str(model_path)!r}).close()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stderr == ""
    assert result.stdout == ""


def test_verbose_logging_reaches_python_logging(model_path):
    code = ("import logging, sys\n"
            "logging.basicConfig(stream=sys.stdout, level=logging.DEBUG, format='%(name)s %(message)s')\n"
            "import cyllama_cffi._logging as L\n"
            "from cyllama_cffi.lowlevel.model import LlamaModel\n"
            "L.set_verbose(True)\n"
            f"LlamaModel({str(model_path)!r}).close()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("cyllama_cffi.llama ")]
    assert len(lines) > 20
    assert any("llama_model_loader" in line for line in lines)


def test_verbose_output_says_which_cpu_backend_runs(model_path):
    """A portable install picks its CPU kernels at import; verbose output names them, once."""
    code = ("from cyllama_cffi import LLM\n"
            f"with LLM({str(model_path)!r}, verbose=True, max_tokens=1) as llm:\n"
            "    llm('Hi')\n"
            f"with LLM({str(model_path)!r}, verbose=True, max_tokens=1) as llm:\n"
            "    pass\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    from cyllama_cffi import system_info

    told = [line for line in result.stderr.splitlines() if "CPU backend: " in line]
    assert len(told) == 1 and told[0].endswith(str(system_info())), told


def test_the_cpu_backend_runs_without_amx_kernels():
    """ggml's AMX kernels crash the first prompt on Sapphire Rapids machines: the build leaves
    them out (build_libllama.NO_AMX), on any CPU; a prompt of many tokens then decodes."""
    from cyllama_cffi import system_info

    features = system_info().cpu_features
    assert not [name for name, value in features.items() if name.startswith("AMX") and value == "1"], features
