"""Every example in docs/cancellation.md runs, for real, and does what the page says."""

from __future__ import annotations

import importlib.util
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO

DOC = REPO / "docs" / "cancellation.md"


def example(name: str) -> str:
    match = re.search(rf"<!-- example: {name} -->\s*```python\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"example {name!r} missing from {DOC}"
    return match.group(1)


def run_example(name: str, tmp_path: Path, model_path: Path) -> subprocess.Popen:
    script = tmp_path / f"{name}.py"
    script.write_text(example(name))
    env = dict(__import__("os").environ, CYLLAMA_MODEL=str(model_path))
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=str(REPO))


def test_timer_example(tmp_path, model_path):
    child = run_example("timer", tmp_path, model_path)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert out.split("\n")[:3] == ["cancelled", "True True", "True False"]


def test_sigint_example(tmp_path, model_path):
    child = run_example("sigint", tmp_path, model_path)
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


def test_context_example(tmp_path, model_path):
    child = run_example("context", tmp_path, model_path)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    match = re.search(r"aborted after (\d+) of (\d+) positions", out)
    assert match, out
    assert int(match.group(1)) < int(match.group(2))


def load_fastapi_example(tmp_path: Path, model_path: Path, monkeypatch):
    pytest.importorskip("fastapi", reason="fastapi is a test extra; `pip install -e '.[test]'`")
    monkeypatch.setenv("CYLLAMA_MODEL", str(model_path))
    module_path = tmp_path / "docs_app.py"
    module_path.write_text(example("fastapi"))
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

    module = load_fastapi_example(tmp_path, model_path, monkeypatch)
    llm = module.llm
    cancelled_at = []
    original_cancel = llm.cancel

    def timed_cancel():
        cancelled_at.append(time.perf_counter())
        original_cancel()

    llm.cancel = timed_cancel
    try:
        with UvicornThread(module.app) as base:
            with httpx.Client(timeout=60) as client:
                with client.stream("GET", f"{base}/generate",
                                   params={"prompt": "Once upon a time, in a lighthouse far away,"}) as response:
                    assert response.status_code == 200
                    events = 0
                    for line in response.iter_lines():
                        if line.startswith("data: "):
                            events += 1
                        if events == 5:
                            break
                # leaving the block closes the connection: the client is gone
                deadline = time.monotonic() + 30
                while llm.last_finish_reason != "cancelled" or not cancelled_at:
                    assert time.monotonic() < deadline, "generation did not stop after the disconnect"
                    time.sleep(0.005)
                stats = llm.last_stats
                stop_delay = llm.last_finished_at - cancelled_at[0]
                assert stop_delay < 0.05, f"generation stopped {stop_delay * 1000:.1f} ms after the cancel"
                assert 5 <= stats.generated_tokens < 2000
                # the next request is served at once and completes
                second = client.get(f"{base}/generate", params={"prompt": "Say hi."})
                assert second.status_code == 200 and second.text.count("data: ") >= 1
    finally:
        llm.cancel = original_cancel
        llm.close()
