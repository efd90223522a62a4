"""Every Python example of the documentation runs, for real, and does what its page says.

Each ```python block of docs/**/*.md and README.md runs as a script in a fresh interpreter
with ``CYLLAMA_MODEL`` set to the test model, and must exit 0. A block preceded by an
``<!-- example: NAME -->`` comment has a name: ``EXPECTED`` checks the output that its page
promises, and the examples that need a signal or a server (``DEDICATED``) have tests of their
own below instead.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

from conftest import REPO

PAGES = sorted((REPO / "docs").rglob("*.md")) + [REPO / "README.md"]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
MARKER = re.compile(r"<!--\s*example:\s*([\w-]+)\s*-->\s*$")
TIMEOUT = 600  # seconds per example: generous, for a loaded 2-core machine


@dataclass
class Example:
    page: Path
    line: int
    code: str
    name: Optional[str]

    @property
    def id(self) -> str:
        return self.name or f"{self.page.relative_to(REPO)}:{self.line}"


def collect(pages: List[Path] = PAGES) -> List[Example]:
    examples = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            marker = MARKER.search(before)
            examples.append(Example(page, text.count("\n", 0, match.start()) + 1, match.group(1),
                                    marker.group(1) if marker else None))
    return examples


EXAMPLES = collect()
BY_NAME: Dict[str, Example] = {example.name: example for example in EXAMPLES if example.name}


def example(name: str) -> str:
    assert name in BY_NAME, f"example {name!r} missing from the docs"
    return BY_NAME[name].code


def lines(out: str) -> List[str]:
    return [line for line in out.splitlines() if line.strip()]


def check_timer(out: str) -> None:
    assert lines(out)[:3] == ["cancelled", "True True", "True False"]


def check_close_from_thread(out: str) -> None:
    assert lines(out) == ["cancelled True", "False"]


def check_context(out: str) -> None:
    match = re.search(r"aborted after (\d+) of (\d+) positions", out)
    assert match, out
    assert int(match.group(1)) < int(match.group(2))


def check_generate(out: str) -> None:
    first, reason, counts = lines(out)
    assert "Paris" in first and reason == "stop" and counts.endswith("generated")


def check_stop_early(out: str) -> None:
    assert lines(out) == ["True cancelled", "length"]


def check_config(out: str) -> None:
    first, second = lines(out)
    assert first.endswith(" stop") and "six" not in first and second == "True"


def check_closing(out: str) -> None:
    assert lines(out) == ["length", "length", "length", "closed"]


def check_dry(out: str) -> None:
    assert lines(out) == ["False", "True"]


def check_tokens(out: str) -> None:
    assert lines(out)[-1] == "True"


def check_errors(out: str) -> None:
    found = lines(out)
    assert found[0] == "refused: InvalidGGUFError True"
    assert [line.split(":")[0] for line in found[1:3]] == ["ValueError", "ValueError"]
    assert found[3] == "ClosedError"


def check_install(out: str) -> None:
    assert lines(out)[-1] == "True"


def check_system_info(out: str) -> None:
    variant, summary = lines(out)[-2:]
    # the suite runs a build from source; a portable wheel would name its variant
    assert variant == "None" or variant.isidentifier(), out
    assert summary.startswith("CPU backend: ") and " SSE3 " in summary, out  # x86-64: always SSE3


def check_one_llm_each(out: str) -> None:
    found = lines(out)
    assert any(line.startswith("The capital of France is Paris") for line in found), out
    assert any(line.startswith("The largest planet of the solar system is") for line in found), out


def check_taking_turns(out: str) -> None:
    for city in ("Paris", "Rome", "Madrid"):
        assert city in out, out


def check_busy(out: str) -> None:
    first, second = lines(out)
    assert first.startswith("busy:") and "another thread" in first and "not thread-safe" in first
    assert second == "length"


def check_handoff(out: str) -> None:
    assert lines(out)[0] == "cancelled"
    assert lines(out)[1] in ("stop", "length")


def check_asyncio(out: str) -> None:
    assert lines(out) == ["cancelled", "True"]


def check_async_turns(out: str) -> None:
    for city in ("Paris", "Rome", "Madrid"):
        assert city in out, out


def check_async_cancel(out: str) -> None:
    assert lines(out) == ["cancelled", "cancelled", "True True"]


def check_async_timeout(out: str) -> None:
    assert lines(out)[-1] == "no chunk within 0.5 s: cancelled"


def check_lowlevel(out: str) -> None:
    assert "Paris" in out


def check_chat_answer(out: str) -> None:
    assert lines(out) == ["The capital of France is Paris.", "stop", "The capital of France is Paris."]


def check_chat_prompt(out: str) -> None:
    assert out.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n" in out
    assert "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>" in out and lines(out)[-1] == "True"


def check_chat_refused(out: str) -> None:
    assert lines(out) == ["the chat template could not render these messages: System role not supported",
                          "[user] Hi!"]


def check_chat_cancel(out: str) -> None:
    assert lines(out) == ["cancelled", "True", "True"]


def check_chat_helpers(out: str) -> None:
    found = lines(out)
    assert "Paris" in found[0] and found[1:3] == ["The capital of France is Paris."] * 2
    assert found[3].startswith("The capital of France is") and found[4].startswith("decoded 4 tokens")
    assert found[5] == "True"
def check_structured_json(out: str) -> None:
    lines = out.splitlines()
    assert "'unit': '" in lines[0] and "'location': '" in lines[0] and lines[1] == "stop"


def check_structured_gbnf(out: str) -> None:
    assert re.fullmatch(r"(yes|no) because [a-z ]{3,40}\.\n", out), out


def check_structured_errors(out: str) -> None:
    for expected in ("unbalanced parentheses", "rule 'item' is used but never defined",
                     "rule 'root' is left-recursive", "limit of 2000", "keyword 'uniqueItems' at #"):
        assert expected in out, expected


# The output each page promises, by example name.

def check_batching_basics(out: str) -> None:
    found = lines(out)
    assert len(found) == 3 and all(line.endswith(("stop 12", "length 12")) or " stop " in line for line in found)
    assert "Paris" in found[0]


def check_batching_detailed(out: str) -> None:
    found = lines(out)
    assert [line.split()[:2] for line in found] == [["1", "8"], ["2", "4"]]

def check_logprobs(out: str) -> None:
    found = lines(out)
    # The last digits vary with the CPU's kernels: ' Paris' 78 % on one, 77 % on another.
    assert len(found) == 7 and re.match(r"' Paris' +-0\.2\d\d   \[' Paris' 7\d%, ' the' ", found[1]), out


def check_logprobs_stream(out: str) -> None:
    assert lines(out)[-1] in ("cancelled True", "length True"), out


def check_logit_bias(out: str) -> None:
    found = lines(out)
    assert found[0].startswith("' Paris") and "Paris" not in found[1] and found[2] == "' London London'", out


def check_lora(out: str) -> None:
    assert lines(out) == ["True True True", "refused: InvalidGGUFError True []"]


EXPECTED: Dict[str, Callable[[str], None]] = {
    "lora": check_lora,
    "timer": check_timer,
    "close-from-thread": check_close_from_thread,
    "context": check_context,
    "quickstart-generate": check_generate,
    "quickstart-stop-early": check_stop_early,
    "quickstart-config": check_config,
    "quickstart-closing": check_closing,
    "quickstart-dry": check_dry,
    "quickstart-tokens": check_tokens,
    "quickstart-errors": check_errors,
    "install-check": check_install,
    "building-system-info": check_system_info,
    "threads-one-llm-each": check_one_llm_each,
    "threads-taking-turns": check_taking_turns,
    "threads-busy": check_busy,
    "threads-stream-handoff": check_handoff,
    "asyncio": check_asyncio,
    "async-turns": check_async_turns,
    "async-cancel": check_async_cancel,
    "async-timeout": check_async_timeout,
    "lowlevel-greedy": check_lowlevel,
    "batching-basics": check_batching_basics,
    "batching-detailed": check_batching_detailed,
    "chat-answer": check_chat_answer,
    "chat-prompt": check_chat_prompt,
    "chat-refused": check_chat_refused,
    "chat-cancel": check_chat_cancel,
    "chat-helpers": check_chat_helpers,
    "structured-json-schema": check_structured_json,
    "structured-gbnf": check_structured_gbnf,
    "structured-errors": check_structured_errors,
    "logprobs": check_logprobs,
    "logprobs-stream": check_logprobs_stream,
    "logit-bias": check_logit_bias,
}

# Examples that need a real signal or a real server: their own tests below.
DEDICATED = {"sigint", "fastapi"}


def model_env(model_path: Path) -> Dict[str, str]:
    return dict(os.environ, CYLLAMA_MODEL=str(model_path))


def script_for(code: str, tmp_path: Path) -> Path:
    script = tmp_path / "docs_example.py"  # not the name of a module an example imports
    script.write_text(code, encoding="utf-8")
    return script


# -- the collection itself ----------------------------------------------------------------

def test_every_page_example_is_collected():
    assert len(EXAMPLES) >= 20
    names = [example.name for example in EXAMPLES if example.name]
    assert len(names) == len(set(names)), "example names must be unique"
    assert set(EXPECTED) | DEDICATED <= set(BY_NAME), "an expected example is missing from the docs"
    assert any(example.page.name == "README.md" for example in EXAMPLES)


# -- every example: it runs ---------------------------------------------------------------

@pytest.mark.parametrize("item", [e for e in EXAMPLES if e.name not in DEDICATED], ids=lambda e: e.id)
def test_example_runs(item: Example, tmp_path, model_path):
    child = subprocess.run([sys.executable, str(script_for(item.code, tmp_path))], capture_output=True,
                           text=True, env=model_env(model_path), cwd=str(tmp_path), timeout=TIMEOUT)
    assert child.returncode == 0, f"{item.id} failed:\n{child.stdout}\n{child.stderr}"
    if item.name in EXPECTED:
        try:
            EXPECTED[item.name](child.stdout)
        except AssertionError as error:
            raise AssertionError(f"{item.id} printed:\n{child.stdout}") from error


# -- Ctrl-C --------------------------------------------------------------------------------

def test_sigint_example(tmp_path, model_path):
    child = subprocess.Popen([sys.executable, str(script_for(example("sigint"), tmp_path))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=model_env(model_path), cwd=str(tmp_path))
    try:
        assert child.stdout.readline().startswith("generating")
        time.sleep(0.5)  # inside the ~10 s prefill now
        sent = time.monotonic()
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
        elapsed = time.monotonic() - sent
        assert child.returncode == 0, err
        assert "back to normal: cancelled" in out
        assert elapsed < 5.0  # includes interpreter exit; the prefill alone would take ~10 s
    finally:
        child.kill()
        child.wait()


# -- the server that cancels on disconnect ---------------------------------------------------

def load_fastapi_example(tmp_path: Path, model_path: Path, monkeypatch):
    pytest.importorskip("fastapi", reason="fastapi is a test extra; `pip install -e '.[test]'`")
    pytest.importorskip("uvicorn", reason="uvicorn is a test extra; `pip install -e '.[test]'`")
    monkeypatch.setenv("CYLLAMA_MODEL", str(model_path))
    module_path = tmp_path / "docs_app.py"
    module_path.write_text(example("fastapi"), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("docs_app", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class UvicornThread:
    """A real uvicorn server on 127.0.0.1, in a thread of this process (so the test can look inside)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def test_fastapi_example_cancels_on_disconnect(tmp_path, model_path, monkeypatch):
    import httpx

    from cyllama_cffi.stream import Stream, StreamState

    module = load_fastapi_example(tmp_path, model_path, monkeypatch)
    llm = module.llm
    closed_at = []
    original_close = Stream.close

    def timed_close(stream):
        if stream.state is not StreamState.FINISHED:
            closed_at.append(time.perf_counter())
        original_close(stream)

    monkeypatch.setattr(Stream, "close", timed_close)
    try:
        with UvicornThread(module.app) as base:
            with httpx.Client(timeout=120) as client:
                with client.stream("GET", f"{base}/generate",
                                   params={"prompt": "Write a long story about a lighthouse keeper."}) as response:
                    assert response.status_code == 200
                    events = 0
                    for line in response.iter_lines():
                        if line.startswith("data: "):
                            events += 1
                        if events == 5:
                            break
                # leaving the block closes the connection: the client is gone
                deadline = time.monotonic() + 60
                while llm.last_finish_reason != "cancelled" or not closed_at:
                    assert time.monotonic() < deadline, "generation did not stop after the disconnect"
                    time.sleep(0.005)
                stats = llm.last_stats
                stop_delay = llm.last_finished_at - closed_at[0]
                assert stop_delay < 0.1, f"generation stopped {stop_delay * 1000:.1f} ms after the close"
                assert 5 <= stats.generated_tokens < 200
                # the next request is served at once and completes
                second = client.get(f"{base}/generate", params={"prompt": "Say hi."})
                assert second.status_code == 200 and second.text.count("data: ") >= 1
                assert llm.last_finish_reason in ("stop", "length")
    finally:
        llm.close()
        module.llm_thread.shutdown()
