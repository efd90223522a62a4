"""The ``cyllama-cffi`` command run as a child process on the default model (see test_cli_terminal.py
for the interactive keys in a real terminal)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cyllama_cffi import LLM
from cyllama_cffi.errors import LoadCancelled

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 600  # the machine may be shared: generous, only to stop a hung child


def cli_env(model_path: Path) -> dict:
    env = dict(os.environ, CYLLAMA_MODEL=str(model_path), PYTHONPATH=str(REPO))
    env.pop("PYTHONSTARTUP", None)
    return env


def run_cli(model_path: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cyllama_cffi", *args], input=stdin, capture_output=True,
                          text=True, cwd=REPO, env=cli_env(model_path), timeout=TIMEOUT)


def test_version(model_path):
    from cyllama_cffi import __version__

    result = run_cli(model_path, "--version")
    assert (result.returncode, result.stdout) == (0, f"cyllama-cffi {__version__}\n")


def test_help_lists_every_subcommand_and_each_has_its_own(model_path):
    result = run_cli(model_path, "--help")
    assert result.returncode == 0
    for name in ("generate", "chat", "serve", "embed", "bench"):
        assert re.search(rf"^\s+{name}\s+\S", result.stdout, re.M), name
    chat = run_cli(model_path, "chat", "--help")
    assert chat.returncode == 0 and "/reset" in chat.stdout and "Ctrl-C" in chat.stdout


def test_the_readme_first_command_streams_and_ctrl_c_stops_it(model_path):
    """The README's first command, exactly (after its pip install); a Ctrl-C once text streams."""
    line = next(text for text in (REPO / "README.md").read_text().splitlines() if "python -m cyllama_cffi" in text)
    command = shlex.split(line.split("&&")[-1])
    assert command[:3] == ["python", "-m", "cyllama_cffi"] and len(command) == 4, command
    child = subprocess.Popen([sys.executable, *command[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, cwd=REPO, env=cli_env(model_path))
    try:
        first = child.stdout.read(1)  # blocks until the answer streams
        assert first, child.stderr.read().decode()
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=TIMEOUT)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 130, err.decode()
    assert (first + out).decode().strip()
    assert re.search(r"\[cancelled: \d+ prompt tokens, \d+ generated", err.decode()), err.decode()


def test_generate_reads_the_prompt_from_stdin(model_path):
    prompt = "llama " * 60
    result = run_cli(model_path, "generate", "--raw", "--max-tokens", "2", stdin=prompt)
    assert result.returncode == 0, result.stderr
    match = re.search(r"\[length: (\d+) prompt tokens, 2 generated", result.stderr)
    assert match and int(match.group(1)) >= 60, result.stderr  # the piped text was the prompt
    dash = run_cli(model_path, "generate", "--raw", "--max-tokens", "2", "-", stdin=prompt)
    assert dash.stdout == result.stdout  # greedy: the same prompt, the same answer


def test_errors_are_one_line_without_a_traceback(model_path, tmp_path):
    result = run_cli(model_path, "--model", str(tmp_path / "missing.gguf"), "hello")
    assert result.returncode == 1
    assert result.stderr.startswith("cyllama-cffi: error:") and "Traceback" not in result.stderr
    empty = run_cli(model_path, "generate", "-", stdin="   ")
    assert (empty.returncode, empty.stderr.strip()) == (2, "cyllama-cffi: error: stdin gave an empty prompt")


def test_embed_prints_one_json_vector_per_text(model_path, tmp_path):
    result = run_cli(model_path, "embed", "a llama", "an alpaca")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    with LLM(model_path) as llm:
        expected = llm.embed(["a llama", "an alpaca"])
    assert np.allclose(np.array(rows, dtype=np.float32), expected, atol=1e-5)
    raw = run_cli(model_path, "embed", "--no-normalize", "--pooling", "last", stdin="a llama\n\nan alpaca\n")
    vectors = np.array([json.loads(line) for line in raw.stdout.splitlines()])
    assert vectors.shape == expected.shape and not np.allclose(np.linalg.norm(vectors, axis=1), 1.0)
    target = tmp_path / "vectors.npy"
    saved = run_cli(model_path, "embed", "--format", "npy", "--output", str(target), "a llama", "an alpaca")
    assert saved.returncode == 0 and saved.stdout == ""
    assert np.allclose(np.load(target), expected, atol=1e-5)
    refused = run_cli(model_path, "embed", "--format", "npy", "x")
    assert refused.returncode == 2 and "--output" in refused.stderr


def test_bench_prints_median_speeds(model_path):
    result = run_cli(model_path, "bench", "--prompt-tokens", "8", "--gen-tokens", "2", "--repetitions", "2",
                     "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^prefill\s+8 tokens:\s+\d+\.\d tok/s \(median\)$", result.stdout, re.M), result.stdout
    assert re.search(r"^decode\s+2 tokens:\s+\d+\.\d tok/s \(median\)$", result.stdout, re.M), result.stdout


# A child that cannot import FastAPI or uvicorn. When this tree has no server package yet,
# a stand-in with the server's first import takes its place.
BLOCKED_SERVER = textwrap.dedent("""
    import importlib.abc, importlib.machinery, importlib.util, sys

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("fastapi", "uvicorn"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    class StandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name == "cyllama_cffi.server":
                return importlib.machinery.ModuleSpec(name, self)
            return None
        def create_module(self, spec):
            return None
        def exec_module(self, module):
            exec("import fastapi", module.__dict__)

    sys.meta_path.insert(0, Blocker())
    if importlib.util.find_spec("cyllama_cffi.server") is None:
        sys.meta_path.append(StandIn())
    from cyllama_cffi.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("args", [["serve"], ["--model", "m.gguf", "serve", "--port", "9"]])
def test_serve_without_its_dependencies_names_the_extra(model_path, args):
    result = subprocess.run([sys.executable, "-c", BLOCKED_SERVER, *args], capture_output=True, text=True,
                            cwd=REPO, env=cli_env(model_path), timeout=TIMEOUT)
    assert result.returncode == 2, result.stderr
    assert "pip install 'cyllama_cffi[server]'" in result.stderr and "Traceback" not in result.stderr


def test_serve_help_is_the_servers_own_even_without_its_dependencies(model_path):
    result = subprocess.run([sys.executable, "-c", BLOCKED_SERVER, "serve", "--help"], capture_output=True,
                            text=True, cwd=REPO, env=cli_env(model_path), timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "--parallel" in result.stdout and "--prompt-budget" in result.stdout and "Traceback" not in result.stderr


def test_llm_reports_load_progress_and_a_false_answer_stops_the_load(model_path):
    seen = []
    with LLM(model_path, progress_callback=seen.append):
        pass
    assert seen and seen == sorted(seen) and seen[-1] == 1.0
    with pytest.raises(LoadCancelled):
        LLM(model_path, progress_callback=lambda fraction: False)



def test_a_reader_that_goes_away_ends_the_command_quietly(model_path):
    """``cyllama-cffi ... | head -c 1``: no traceback once the pipe is closed."""
    child = subprocess.Popen([sys.executable, "-m", "cyllama_cffi", "--raw", "--max-tokens", "40", "One two three"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=REPO,
                             env=cli_env(model_path))
    try:
        assert child.stdout.read(1)
        child.stdout.close()
        err = child.stderr.read().decode()
        child.wait(timeout=TIMEOUT)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 1 and "Traceback" not in err and "Broken pipe" not in err, err
