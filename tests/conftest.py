"""Shared fixtures: the default model, the llama.cpp source tree, CI-aware skips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    """Skip locally when a prerequisite is missing; in CI a missing prerequisite is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI must be able to run this test, but: {reason}")
    pytest.skip(reason)


def llama_cpp_tree() -> Path:
    return Path(os.environ.get("CYLLAMA_LLAMA_CPP_DIR") or REPO / "llama.cpp")


@pytest.fixture(scope="session")
def llama_cpp_dir() -> Path:
    tree = llama_cpp_tree()
    require((tree / "include" / "llama.h").is_file(),
            f"no llama.cpp source tree at {tree} (built from a prebuilt libllama?)")
    return tree


@pytest.fixture(scope="session")
def model_path() -> Path:
    from cyllama_cffi.models import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def model(model_path):
    from cyllama_cffi.lowlevel.model import LlamaModel

    loaded = LlamaModel(model_path)
    yield loaded
    loaded.close()


@pytest.fixture
def decoded(monkeypatch):
    """The sizes of the prompt chunks ``KVSequence`` decodes from now on (what prefix reuse left to do)."""
    from cyllama_cffi._sequence import KVSequence

    sizes = []
    original = KVSequence.decode_chunk

    def counting(self, tokens, logits_last):
        sizes.append(len(tokens))
        return original(self, tokens, logits_last)

    monkeypatch.setattr(KVSequence, "decode_chunk", counting)
    return sizes
