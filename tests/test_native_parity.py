"""Our greedy output equals native llama.cpp's `llama-simple`, built from the same tree."""

from __future__ import annotations

import subprocess

import pytest

from cyllama_cffi import LLM

from conftest import require


@pytest.fixture(scope="module")
def llama_simple(llama_cpp_dir):
    import build_libllama

    native = build_libllama.build_native(targets=("llama", "llama-simple"))
    binary = native.bin_dir / "llama-simple" if native.bin_dir else None
    require(binary is not None and binary.is_file(), "llama-simple cannot be built from a prebuilt libllama")
    return binary


@pytest.mark.parametrize("prompt", ["The capital of France is", "def fibonacci(n):"])
def test_greedy_text_equals_llama_simple(llama_simple, model_path, prompt):
    n_predict = 24
    native = subprocess.run([str(llama_simple), "-m", str(model_path), "-n", str(n_predict), prompt],
                            capture_output=True, text=True, check=True).stdout
    assert native.startswith(prompt) and native.endswith("\n")
    native_generated = native[len(prompt):-1]
    with LLM(model_path, temperature=0.0, max_tokens=n_predict, parse_special=True) as llm:
        ours = llm(prompt)
    assert ours.stats.generated_tokens == n_predict
    assert ours.text == native_generated
