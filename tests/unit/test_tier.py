"""The tier runs alone without the compiled module and without a model, in well under a minute.

A child ``python -m pytest tests/unit`` gets a ``sitecustomize`` that installs an import hook
refusing ``cyllama_cffi._libllama`` (and logging every attempt), ``CYLLAMA_MODEL`` pointing at a
file that does not exist and an empty model cache. The child skips this test (it would start
another child, and so on).
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

UNIT_DIR = Path(__file__).resolve().parent
REPO = UNIT_DIR.parent.parent
CHILD_FLAG = "CYLLAMA_UNIT_TIER_CHILD"
BLOCK_LOG = "CYLLAMA_UNIT_TIER_BLOCK_LOG"
# The tier is the quick loop of CPython development: 10-25 s on a 2-core machine, depending on
# its load. The bound is what tells that loop from one that builds native code or loads a model
# (minutes), not a measure of its speed. PyPy runs it too (in the full suite), more slowly until
# its JIT warms up; there it must pass, in a looser limit.
LIMIT_SECONDS = 60.0 if platform.python_implementation() == "CPython" else 90.0
NESTED_REASON = "runs inside the isolated tier run that this test starts; it must not start another"

SITECUSTOMIZE = textwrap.dedent('''
    """Refuse the compiled module of cyllama_cffi in this process (the fast test tier's check)."""
    import os
    import sys

    BLOCKED = {"cyllama_cffi._libllama"}


    class _RefuseNative:
        def find_spec(self, name, path=None, target=None):
            if name in BLOCKED:
                log = os.environ.get("%(log)s")
                if log:
                    with open(log, "a") as handle:
                        handle.write(name + "\\n")
                raise ImportError(f"{name} is blocked: the fast tier must not load native code")
            return None


    sys.meta_path.insert(0, _RefuseNative())
''') % {"log": BLOCK_LOG}


def isolated_env(tmp_path: Path, log: Path) -> dict:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ)
    for name in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTEST_XDIST_WORKER"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env["CYLLAMA_MODEL"] = str(tmp_path / "no-such-model.gguf")
    env["CYLLAMA_CACHE_DIR"] = str(tmp_path / "empty-cache")
    env[BLOCK_LOG] = str(log)
    env[CHILD_FLAG] = "1"
    return env


def test_the_block_really_refuses_the_native_module(tmp_path):
    """Without this, a broken blocker would let the tier run below pass for nothing."""
    if os.environ.get(CHILD_FLAG):
        pytest.skip(NESTED_REASON)
    log = tmp_path / "attempts.log"
    done = subprocess.run([sys.executable, "-c", "import cyllama_cffi._ffi"], cwd=REPO,
                          env=isolated_env(tmp_path, log), capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "is blocked: the fast tier must not load native code" in done.stderr
    assert log.read_text().split() == ["cyllama_cffi._libllama"]


def test_the_tier_passes_alone_without_native_code_or_model_quickly(tmp_path):
    if os.environ.get(CHILD_FLAG):
        pytest.skip(NESTED_REASON)
    log = tmp_path / "attempts.log"
    command = [sys.executable, "-m", "pytest", str(UNIT_DIR), "-q", "-rs", "-p", "no:cacheprovider"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=isolated_env(tmp_path, log), capture_output=True,
                          text=True, timeout=300)
    elapsed = time.perf_counter() - start
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert not log.exists(), f"the tier tried to import native code: {log.read_text()!r}\n{output[-3000:]}"
    passed = re.search(r"(\d+) passed", output)
    assert passed and int(passed.group(1)) > 100, output[-3000:]
    assert NESTED_REASON in output  # the child skipped the tests that start children, and said why
    assert elapsed < LIMIT_SECONDS, f"the tier took {elapsed:.1f} s alone (limit {LIMIT_SECONDS:.0f} s)"
