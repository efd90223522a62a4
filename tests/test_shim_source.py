"""The C shim in csrc/ builds as ordinary C: the source file and the header each compile
on their own against llama.cpp's headers, warning-free under a strict C11, without the
text cffi puts in front of them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from conftest import REPO, require

CSRC = REPO / "csrc"


@pytest.fixture(scope="module")
def gcc() -> str:
    path = shutil.which("gcc")
    require(path is not None, "gcc is not installed")
    return str(path)


def compile_alone(gcc: str, source: Path, output: Path, llama_cpp_dir: Path) -> None:
    include_dirs: List[Path] = [CSRC, llama_cpp_dir / "include", llama_cpp_dir / "ggml" / "include"]
    command = [gcc, "-std=c11", "-Wall", "-Werror", *[f"-I{d}" for d in include_dirs],
               "-c", str(source), "-o", str(output)]
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}"
    assert output.is_file()


def test_shim_source_compiles_alone(gcc, llama_cpp_dir, tmp_path):
    obj = tmp_path / "cyllama_shim.o"
    compile_alone(gcc, CSRC / "cyllama_shim.c", obj, llama_cpp_dir)
    if sys.platform.startswith("linux") and shutil.which("nm"):
        symbols = subprocess.run(["nm", str(obj)], stdout=subprocess.PIPE, text=True, check=True).stdout
        # Without the feature-test macro MADV_HUGEPAGE vanishes and the advice silently
        # becomes ENOSYS; the object must really call madvise.
        assert " U madvise" in symbols
        # The one Python callback the shim calls is left for cffi's module to define.
        assert " U cyl_py_log" in symbols


def test_shim_header_compiles_alone(gcc, llama_cpp_dir, tmp_path):
    source = tmp_path / "header_only.c"
    source.write_text('#include "cyllama_shim.h"\n')
    compile_alone(gcc, source, tmp_path / "header_only.o", llama_cpp_dir)


def test_shim_header_include_guard(gcc, llama_cpp_dir, tmp_path):
    source = tmp_path / "header_twice.c"
    source.write_text('#include "cyllama_shim.h"\n#include "llama.h"\n#include "cyllama_shim.h"\n')
    compile_alone(gcc, source, tmp_path / "header_twice.o", llama_cpp_dir)
