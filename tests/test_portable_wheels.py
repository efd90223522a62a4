"""Portable wheels: llama.cpp built with every CPU variant, the best one loaded at import.

The wheel of this session's implementation (the CPython ``abi3`` wheel in the CPython run,
the PyPy wheel in the PyPy run) is built once per machine (scripts/build_portable_wheels.py
caches the llama.cpp build and the wheel), then installed into a fresh venv of each
interpreter here and run with no compiler on PATH and the build cache hidden: import,
generate, cancel mid-prefill, a real SIGINT, and the CPU variant ggml loaded is the best one
this CPU supports.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from conftest import REPO, require

PYPY = sys.implementation.name == "pypy"
# The interpreters whose venvs this session checks: each session checks its own wheel.
INTERPRETERS = ["pypy3"] if PYPY else ["3.9", "3.10", "3.11", "3.12", "3.13"]

# ggml's x86 CPU variants (ggml/src/CMakeLists.txt) and the features each is compiled for.
X86_VARIANTS: Dict[str, Tuple[str, ...]] = {
    "x64": (),
    "sse42": ("SSE42",),
    "sandybridge": ("SSE42", "AVX"),
    "ivybridge": ("SSE42", "AVX", "F16C"),
    "piledriver": ("SSE42", "AVX", "F16C", "FMA"),
    "haswell": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2"),
    "skylakex": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512"),
    "cannonlake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VBMI"),
    "cascadelake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VNNI"),
    "icelake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VBMI", "AVX512_VNNI"),
    "cooperlake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VNNI", "AVX512_BF16"),
    "zen4": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VBMI", "AVX512_VNNI",
             "AVX512_BF16"),
    "alderlake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX_VNNI"),
    # "sapphirerapids" (AVX-512 and AMX) is built but not shipped: build_libllama.AMX_VARIANTS.
}
# The /proc/cpuinfo flags each feature needs, and its weight in ggml's score (cpu-feats.cpp).
CPUINFO_FLAGS = {
    "FMA": (("fma",), 1), "F16C": (("f16c",), 1 << 1), "SSE42": (("sse4_2",), 1 << 2),
    "BMI2": (("bmi2",), 1 << 3), "AVX": (("avx",), 1 << 4), "AVX2": (("avx2",), 1 << 5),
    "AVX_VNNI": (("avx_vnni",), 1 << 6),
    "AVX512": (("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"), 1 << 7),
    "AVX512_VBMI": (("avx512vbmi",), 1 << 8), "AVX512_BF16": (("avx512_bf16",), 1 << 9),
    "AVX512_VNNI": (("avx512_vnni",), 1 << 10), "AMX_INT8": (("amx_int8",), 1 << 11),
    "AMX_TILE": (("amx_tile",), 0),
}


def best_variant(cpu_flags: set) -> str:
    """The variant ggml's scoring picks for a CPU with these /proc/cpuinfo flags."""
    def score(features: Tuple[str, ...]) -> int:
        total = 1
        for feature in features:
            flags, weight = CPUINFO_FLAGS[feature]
            if not set(flags) <= cpu_flags:
                return 0
            total += weight
        return total

    return max(X86_VARIANTS, key=lambda name: score(X86_VARIANTS[name]))


def cpu_flags() -> set:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def load_script():
    spec = importlib.util.spec_from_file_location("build_portable_wheels",
                                                  REPO / "scripts" / "build_portable_wheels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_interpreter(name: str) -> Optional[str]:
    """``pypy3`` or a CPython ``3.X`` on PATH or under pyenv, checked by running it."""
    if name == "pypy3":
        candidates = [shutil.which("pypy3")]
    else:
        root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
        candidates = [shutil.which(f"python{name}"),
                      *sorted(glob.glob(os.path.join(root, "versions", f"{name}.*", "bin", f"python{name}")))]
    for candidate in candidates:
        if not candidate:
            continue
        probe = subprocess.run([candidate, "-c", "import sys, venv; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and (name == "pypy3" or probe.stdout.strip() == name):
            return candidate
    return None


@pytest.fixture(scope="session")
def portable_wheel() -> Path:
    require(sys.platform.startswith("linux") and platform.machine() == "x86_64",
            f"portable wheels are built for x86-64 Linux, this is {sys.platform}/{platform.machine()}")
    require(shutil.which("cmake") is not None, "cmake is not on PATH (needed for the cached portable build)")
    (wheel,) = load_script().build_portable_wheels([sys.executable])
    return wheel


def so_members(wheel: Path) -> List[str]:
    with zipfile.ZipFile(wheel) as archive:
        return sorted(name for name in archive.namelist() if re.search(r"\.so(\.|$)", name))


def test_the_wheel_is_manylinux_with_each_cpu_variant_and_nothing_else(portable_wheel):
    tag = portable_wheel.name.split("-", 2)[2][:-len(".whl")]
    if PYPY:
        assert tag.startswith("pp39-pypy39_pp73-manylinux_"), tag
    else:
        assert tag.startswith("cp39-abi3-manylinux_"), tag  # one wheel for CPython 3.9 and later
    shown = " ".join(load_script().auditwheel_show(portable_wheel).split())
    match = re.search(r'is consistent with the following platform tag: "([^"]+)"', shown)
    assert match and match.group(1) in tag.split("-")[2].split("."), shown

    members = so_members(portable_wheel)
    variants = sorted(re.match(r"cyllama_cffi/libggml-cpu-(.+)\.so$", m).group(1)
                      for m in members if m.startswith("cyllama_cffi/libggml-cpu-"))
    assert variants == sorted(X86_VARIANTS)
    module = [m for m in members if m.startswith("cyllama_cffi/_libllama.")]
    assert module == (["cyllama_cffi/_libllama.pypy39-pp73-x86_64-linux-gnu.so"] if PYPY
                      else ["cyllama_cffi/_libllama.abi3.so"])
    linked = sorted(m for m in members if re.match(r"cyllama_cffi/lib(llama|ggml|ggml-base)\.so\.\d+$", m))
    assert linked == ["cyllama_cffi/libggml-base.so.0", "cyllama_cffi/libggml.so.0", "cyllama_cffi/libllama.so.0"]
    vendored = [m for m in members if m.startswith("cyllama_cffi.libs/")]
    # auditwheel's only addition: the OpenMP runtime the CPU variants link
    assert [Path(m).name.split("-")[0] for m in vendored] == ["libgomp"], vendored
    assert len(members) == len(variants) + len(module) + len(linked) + len(vendored), members


CHILD = r"""
import os, signal, sys, threading, time
import cyllama_cffi
from cyllama_cffi import LLM, system_info

assert "site-packages" in cyllama_cffi.__file__, cyllama_cffi.__file__
info = system_info()
print("VARIANT", info.cpu_variant, ",".join(k for k, v in info.cpu_features.items() if v == "1"), flush=True)
llm = LLM(os.environ["CYLLAMA_MODEL"], temperature=0.0, max_tokens=4)
print("TEXT", repr(llm("The capital of France is").text), flush=True)

LONG = "The quick brown fox jumps over the lazy dog. " * 300

def wait_mid_prefill():
    while not llm._seq.tokens:  # the first chunk of the prompt is committed
        time.sleep(0.002)

# llm.cancel() from another thread, mid-prefill
stream = llm.stream(LONG, config=llm.config.replace(max_tokens=8))
box = {}
worker = threading.Thread(target=lambda: box.setdefault("chunks", list(stream)))
worker.start()
wait_mid_prefill()
llm.cancel()
worker.join(60)
llm._seq.settle()
print("CANCEL", stream.finish_reason, len(box["chunks"]), 0 < len(llm._seq.tokens) < stream.stats.prompt_tokens,
      flush=True)

# a real SIGINT, mid-prefill, with the package's handler installed
handle = llm.install_sigint_handler()
stream = llm.stream(LONG + "Again.", config=llm.config.replace(max_tokens=8))
threading.Thread(target=lambda: (wait_mid_prefill(), os.kill(os.getpid(), signal.SIGINT))).start()
chunks = list(stream)
handle.restore()
print("SIGINT", stream.finish_reason, len(chunks), flush=True)
print("AGAIN", repr(llm("The capital of France is").text), flush=True)
"""


@pytest.fixture(scope="module")
def native_reference(model_path):
    from cyllama_cffi import LLM, system_info

    llm = LLM(str(model_path), temperature=0.0, max_tokens=4)
    try:
        return system_info(), llm("The capital of France is").text
    finally:
        llm.close()


def no_compiler_env(tmp_path: Path, venv: Path, model_path: Path) -> Dict[str, str]:
    """No compiler or build tool reachable, the caches hidden: only the model is shared."""
    blocked = tmp_path / "blocked-tools"
    blocked.mkdir()
    for tool in ("cc", "gcc", "g++", "c++", "clang", "cmake", "ninja", "make", "ld"):
        stub = blocked / tool
        stub.write_text("#!/bin/sh\necho \"$0: no compiler in this test\" >&2\nexit 1\n")
        stub.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("CYLLAMA_", "PYTHON", "VIRTUAL_ENV", "GGML_", "LD_"))}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{blocked}", CC="false", CXX="false", HOME=str(home),
               XDG_CACHE_HOME=str(home / ".cache"), CYLLAMA_MODEL=str(model_path))
    return env


@pytest.mark.slow
@pytest.mark.parametrize("interpreter", INTERPRETERS)
def test_the_wheel_runs_without_a_compiler(interpreter, portable_wheel, model_path, native_reference, tmp_path):
    python = find_interpreter(interpreter)
    if python is None:
        pytest.skip(f"no {'pypy3' if interpreter == 'pypy3' else 'python' + interpreter} interpreter "
                    "on PATH or under pyenv")
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, capture_output=True)
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                              "--disable-pip-version-check", "--prefer-binary", str(portable_wheel)],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    result = subprocess.run([str(venv / "bin" / "python"), "-c", CHILD], capture_output=True, text=True,
                            cwd=str(tmp_path), env=no_compiler_env(tmp_path, venv, model_path), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in result.stdout.splitlines() if " " in line}

    native_info, reference = native_reference
    variant, features = lines["VARIANT"].split()
    assert variant == best_variant(cpu_flags())
    # what GGML_NATIVE compiled for this CPU includes everything the loaded variant uses
    native_features = {name for name, value in native_info.cpu_features.items() if value == "1"}
    assert set(features.split(",")) <= native_features, (features, native_features)
    assert lines["TEXT"] == repr(reference)  # same greedy text as the build from source
    assert lines["CANCEL"].split() == ["cancelled", "0", "True"]
    assert lines["SIGINT"].split() == ["cancelled", "0"]
    assert lines["AGAIN"] == repr(reference)


def test_the_variants_are_loaded_from_the_package_directory_only(portable_wheel, tmp_path):
    """Without its variants the package fails to import with a clear message, even when the
    working directory (one of ggml's default search places) holds all of them."""
    unpacked = tmp_path / "site"
    with zipfile.ZipFile(portable_wheel) as archive:
        archive.extractall(unpacked)
    package = unpacked / "cyllama_cffi"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for variant in package.glob("libggml-cpu-*.so"):
        shutil.move(str(variant), str(cwd / variant.name))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("GGML_", "PYTHON"))}
    env["PYTHONPATH"] = str(unpacked)  # ahead of any installed copy; dependencies from this interpreter
    result = subprocess.run([sys.executable, "-c", "import cyllama_cffi._ffi"], capture_output=True, text=True,
                            cwd=str(cwd), env=env)
    assert result.returncode != 0
    assert "ImportError: cyllama_cffi found no CPU backend of ggml it can load in " + str(package) in result.stderr, \
        result.stderr[-3000:]
