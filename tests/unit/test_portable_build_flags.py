"""CYLLAMA_PORTABLE=1: every CPU variant as a module, a cache of its own; the default stays native."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]  # build_libllama.py lives at the repo root
sys.path.insert(0, str(REPO))
import build_libllama  # noqa: E402


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in ("CYLLAMA_PORTABLE", "CYLLAMA_NATIVE", "CYLLAMA_CMAKE_ARGS", "CYLLAMA_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CYLLAMA_CACHE_DIR", str(tmp_path))
    return monkeypatch


def test_the_default_build_is_native_and_links_the_cpu_backend(clean_env):
    flags = build_libllama.cmake_flags()
    assert "-DGGML_NATIVE=ON" in flags
    assert not any("GGML_BACKEND_DL" in f or "GGML_CPU_ALL_VARIANTS" in f for f in flags)
    assert "ggml-cpu" in build_libllama.linked_libs()


@pytest.mark.parametrize("value", ["1", "on", "yes"])
def test_portable_builds_every_variant_as_a_module_without_native_flags(clean_env, value):
    clean_env.setenv("CYLLAMA_PORTABLE", value)
    clean_env.setenv("CYLLAMA_NATIVE", "1")  # portable wins: -march=native would defeat it
    flags = build_libllama.cmake_flags()
    assert {"-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON"} <= set(flags)
    assert "-DGGML_NATIVE=ON" not in flags
    assert "ggml-cpu" not in build_libllama.linked_libs()  # loaded at run time, not linked


def test_portable_and_native_builds_are_cached_apart(clean_env, tmp_path):
    tree = REPO / "llama.cpp"
    if not (tree / build_libllama.SOURCE_MARKER).is_file():
        tree = tmp_path / "tree"
        tree.mkdir()
        (tree / build_libllama.SOURCE_MARKER).write_text("pinned\n")
    native = build_libllama.native_build_dir(tree)
    clean_env.setenv("CYLLAMA_PORTABLE", "1")
    portable = build_libllama.native_build_dir(tree)
    assert native.parent == tmp_path / "native" and portable.parent == tmp_path / "portable"
    assert build_libllama.native_build_dir(tree) == portable  # keyed: the same flags reuse it


def test_cpu_variant_files_are_the_modules_of_a_portable_build_only(clean_env, tmp_path):
    for name in ("libggml-cpu-haswell.so", "libggml-cpu-x64.so", "libggml-base.so.0", "libggml-cpu.so.0"):
        (tmp_path / name).write_bytes(b"")
    native = build_libllama.NativeBuild(tmp_path, ())
    assert native.cpu_variant_files() == []
    clean_env.setenv("CYLLAMA_PORTABLE", "1")
    assert [p.name for p in native.cpu_variant_files()] == ["libggml-cpu-haswell.so", "libggml-cpu-x64.so"]


@pytest.mark.parametrize("has_amx", [True, False])
def test_a_native_build_leaves_out_amx_on_a_cpu_that_has_it(clean_env, has_amx):
    """ggml's AMX kernels crash in the first prompt on Sapphire Rapids: -march=native minus AMX."""
    clean_env.setattr(build_libllama, "cpu_has_amx", lambda: has_amx)
    flags = build_libllama.cmake_flags()
    no_amx = {f"-DCMAKE_C_FLAGS={build_libllama.NO_AMX}", f"-DCMAKE_CXX_FLAGS={build_libllama.NO_AMX}"}
    assert (no_amx <= set(flags)) == has_amx
    clean_env.setenv("CYLLAMA_PORTABLE", "1")
    assert not no_amx & set(build_libllama.cmake_flags())  # the variants set their own flags


def test_a_portable_build_does_not_ship_the_amx_variant(clean_env, tmp_path):
    for name in ("libggml-cpu-zen4.so", "libggml-cpu-sapphirerapids.so", "libggml-cpu-x64.so"):
        (tmp_path / name).write_bytes(b"")
    clean_env.setenv("CYLLAMA_PORTABLE", "1")
    files = build_libllama.NativeBuild(tmp_path, ()).cpu_variant_files()
    assert [p.name for p in files] == ["libggml-cpu-x64.so", "libggml-cpu-zen4.so"]
