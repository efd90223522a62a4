"""Tokenizer conformance against llama.cpp's own test vectors.

Every ``models/ggml-vocab-*.gguf`` of the pinned source that has ``.inp`` and
``.out`` files is loaded vocab-only and must reproduce every expected token
list (``add_special=False, parse_special=False``, as test-tokenizer-0 does).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import pytest

from conftest import llama_cpp_tree

SEPARATOR = b"\n__ggml_vocab_test__\n"


def vocab_files() -> List[Path]:
    models = llama_cpp_tree() / "models"
    return sorted(p for p in models.glob("ggml-vocab-*.gguf")
                  if Path(str(p) + ".inp").is_file() and Path(str(p) + ".out").is_file())


def read_cases(vocab: Path) -> List[Tuple[bytes, List[int]]]:
    raw = Path(str(vocab) + ".inp").read_bytes()
    inputs = raw.split(SEPARATOR)
    if inputs and inputs[-1] == b"":
        inputs.pop()
    outputs = Path(str(vocab) + ".out").read_text().splitlines()
    assert len(inputs) == len(outputs), f"{vocab.name}: .inp and .out disagree on the number of tests"
    return [(text, [int(t) for t in expected.split()]) for text, expected in zip(inputs, outputs)]


def test_the_pinned_source_has_vocab_vectors(llama_cpp_dir):
    assert len(vocab_files()) >= 10


@pytest.mark.parametrize("vocab", vocab_files(), ids=lambda p: p.name[len("ggml-vocab-"):-len(".gguf")])
def test_vocab_reproduces_upstream_vectors(vocab, record_property):
    from cyllama_cffi.lowlevel.model import LlamaModel

    cases = read_cases(vocab)
    with LlamaModel(vocab, vocab_only=True) as model:
        failures = []
        for text, expected in cases:
            got = model.vocab.tokenize(text, add_special=False, parse_special=False)
            if got != expected:
                failures.append((text[:60], expected[:12], got[:12]))
    passed = len(cases) - len(failures)
    record_property("passed", f"{passed}/{len(cases)}")
    print(f"{vocab.name}: {passed}/{len(cases)} vectors pass")
    assert failures == [], f"{vocab.name}: {len(failures)} of {len(cases)} differ, first: {failures[:3]}"
