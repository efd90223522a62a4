"""Packaging: `python -m build` makes an sdist and a self-contained wheel that works elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import REPO


def run(command, **kwargs):
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command[:4]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_sdist_and_wheel_build_and_the_wheel_runs_in_a_fresh_venv(tmp_path, model_path):
    dist = tmp_path / "dist"
    # sdist first, then the wheel built *from the sdist* (what `python -m build` does)
    run([sys.executable, "-m", "build", "--outdir", dist, REPO], cwd=tmp_path)
    sdists, wheels = list(dist.glob("*.tar.gz")), list(dist.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1

    with tarfile.open(sdists[0]) as archive:
        names = archive.getnames()
    assert any(n.endswith("/build_libllama.py") for n in names)
    assert any(n.endswith("/csrc/cyllama_shim.c") for n in names)
    assert not any("/llama.cpp/" in n for n in names)  # the source is fetched and verified at build time
    assert not any(n.endswith(".so") or ".so." in n for n in names)

    with zipfile.ZipFile(wheels[0]) as archive:
        members = archive.namelist()
    for library in ("libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu.so"):
        assert any(Path(m).name.startswith(library) for m in members), library
    assert any(Path(m).name.startswith("_libllama.") for m in members)

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv])
    python = venv / "bin" / "python"
    run([python, "-m", "pip", "install", "--quiet", wheels[0]])
    # No compiler needed at run time: make any attempt to use one fail loudly.
    env = dict(os.environ, CC="/bin/false", CXX="/bin/false", PATH=f"{venv / 'bin'}:/usr/bin:/bin",
               PYTHONPATH="")
    code = ("import sys, cyllama_cffi\n"
            "assert 'site-packages' in cyllama_cffi.__file__, cyllama_cffi.__file__\n"
            f"llm = cyllama_cffi.LLM({str(model_path)!r}, temperature=0.0, max_tokens=4)\n"
            "print(llm('The capital of France is').stats.generated_tokens)\n"
            # a chat renders the model's template with jinja2: a declared dependency, installed with the wheel
            "print(llm.chat([{'role': 'user', 'content': 'Hi'}]).stats.prompt_tokens > 0)\n")
    result = run([python, "-c", code], cwd=tmp_path, env=env)
    assert result.stdout.split() == ["4", "True"]
