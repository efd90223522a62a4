"""Keeps the fast tier honest: no test here may load the compiled module.

Run alone, nothing in this tier imports ``cyllama_cffi._ffi`` (which loads ``_libllama`` and
initialises llama.cpp), so every test checks that it did not do so itself. In the full suite the
model tests have usually loaded it already; the check then has nothing to see and stays quiet.
``test_tier.py`` runs the tier in a child process where the native module cannot be imported at
all, which also catches imports made at collection time.
"""

from __future__ import annotations

import sys

import pytest

NATIVE_MODULES = ("cyllama_cffi._libllama", "cyllama_cffi._ffi")


@pytest.fixture(autouse=True)
def _no_native_import():
    already = {name for name in NATIVE_MODULES if sys.modules.get(name) is not None}
    yield
    loaded = [name for name in NATIVE_MODULES if name not in already and sys.modules.get(name) is not None]
    assert not loaded, f"a test of the pure-Python tier imported the native module(s) {loaded}"
