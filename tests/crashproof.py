"""Run risky cases in a child process, so a crash is a test failure, not a dead test run.

Why: the inputs tested for robustness (mutated model files, out-of-range ids,
misuse after ``close()``) would, if the binding let them through, make
llama.cpp abort or segfault. In-process that kills pytest; here each case runs
in a long-lived worker child that prints one result line per case. A crash
shows as the child exiting on a signal (negative return code), a hang as a
timeout; either is recorded against the case that had started, and a fresh
worker takes the remaining cases. Starting a child costs ~0.3 s, a case a few
milliseconds, so cases are batched.

Protocol: the parent writes one JSON object per line (``{"id", "op", "arg"}``);
the worker answers ``START <id>`` before it runs the case and ``RESULT <json>``
after. Run as a script, this module *is* the worker.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional

HERE = Path(__file__).resolve().parent


class Outcome(NamedTuple):
    """How one case ended: ``ok``, ``error`` (a Python exception), ``crash`` or ``hang``."""

    case_id: str
    status: str
    error: str = ""          # exception class name
    mro: tuple = ()          # its class hierarchy, so the parent can check the kind
    message: str = ""
    returncode: Optional[int] = None
    stderr: str = ""

    def is_clean(self, allowed: tuple = ("ValueError", "OSError", "LlamaError")) -> bool:
        """Success, or an exception that is one of ``allowed`` (by class name, through the MRO)."""
        if self.status == "ok":
            return True
        return self.status == "error" and any(name in self.mro for name in allowed)


class Case(NamedTuple):
    case_id: str
    op: str   # "file": load + generate with the file at arg; "api": run tests/robustness_cases.py:CASES[arg]
    arg: str


class Worker:
    """One worker child; ``run(cases)`` restarts it after a crash and carries on with the rest."""

    def __init__(self, model_path: Optional[str] = None, timeout: float = 60.0,
                 python: Optional[str] = None) -> None:
        self.model_path = model_path
        self.timeout = timeout
        self.python = python or sys.executable
        self.process: Optional[subprocess.Popen] = None
        self.crashes = 0
        self.starts = 0

    # -- child lifetime ------------------------------------------------------------
    def _start(self) -> subprocess.Popen:
        env = dict(os.environ, PYTHONFAULTHANDLER="1", CYLLAMA_WORKER_MODEL=self.model_path or "")
        self.starts += 1
        self.process = subprocess.Popen([self.python, str(Path(__file__).resolve())], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, bufsize=0)
        return self.process

    def close(self) -> None:
        process = self.process
        self.process = None
        if process is None:
            return
        try:
            process.stdin.close()
            process.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            stream.close()

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _readline(self, process: subprocess.Popen, deadline: float) -> Optional[bytes]:
        """One line from the child, or None on EOF / timeout (the caller tells which)."""
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([process.stdout], [], [], remaining)
            if not ready:
                return None
            byte = process.stdout.read(1)
            if not byte:
                return None
            line += byte
        return line

    # -- running cases ---------------------------------------------------------------
    def run(self, cases: Iterable[Case]) -> List[Outcome]:
        """All ``cases`` in order, batched; a crash or hang ends only the case that had started."""
        pending = list(cases)
        outcomes: List[Outcome] = []
        while pending:
            process = self.process if self.process and self.process.poll() is None else self._start()
            try:
                process.stdin.write(b"".join(json.dumps(case._asdict()).encode() + b"\n" for case in pending))
                process.stdin.flush()
            except BrokenPipeError:
                pass  # it died before reading; the loop below finds out how
            started: Optional[str] = None
            by_id = {case.case_id: case for case in pending}
            while pending:
                line = self._readline(process, time.monotonic() + self.timeout)
                if line is None:  # EOF (crash) or timeout (hang): blame the case that started
                    outcomes.append(self._failure(process, started or pending[0].case_id))
                    done = started or pending[0].case_id
                    pending = [case for case in pending if case.case_id != done]
                    break
                text = line.decode("utf-8", "replace").rstrip("\n")
                if text.startswith("START "):
                    started = text[6:]
                elif text.startswith("RESULT "):
                    data = json.loads(text[7:])
                    outcomes.append(Outcome(data["id"], data["status"], data.get("error", ""),
                                            tuple(data.get("mro", ())), data.get("message", "")))
                    pending = [case for case in pending if case.case_id != data["id"]]
                    by_id.pop(data["id"], None)
                    started = None
        return outcomes

    def run_one(self, case: Case) -> Outcome:
        return self.run([case])[0]

    def _failure(self, process: subprocess.Popen, case_id: str) -> Outcome:
        try:
            returncode = process.wait(2)
            status = "crash"
        except subprocess.TimeoutExpired:
            process.kill()
            returncode = process.wait()
            status = "hang"
        stderr = process.stderr.read().decode("utf-8", "replace")[-3000:]
        for stream in (process.stdin, process.stdout, process.stderr):
            try:
                stream.close()
            except OSError:
                pass
        self.process = None
        self.crashes += 1
        return Outcome(case_id, status, returncode=returncode, stderr=stderr)


# ------------------------------------------------------------------------------------------
# The worker side (this file run as a script)
# ------------------------------------------------------------------------------------------

def probe_file(path: str) -> str:
    """What a server does with a model file: load it and generate a few tokens."""
    from cyllama_cffi import LLM

    llm = LLM(path, temperature=0.0, max_tokens=3, n_threads=1)
    try:
        response = llm("the cat sat")
        # the generated ids go back through the detokenizer, like a client would
        llm.detokenize(llm.tokenize(response.text, add_special=False))
        return f"{response.finish_reason}:{response.stats.generated_tokens}"
    finally:
        llm.close()


def _ops() -> Dict[str, Callable[[str], Any]]:
    sys.path.insert(0, str(HERE))
    import robustness_cases

    model = os.environ.get("CYLLAMA_WORKER_MODEL") or None

    def api(name: str) -> Any:
        return robustness_cases.CASES[name](model)

    return {"file": probe_file, "api": api}


def _serve() -> None:
    out = sys.stdout
    ops = _ops()
    for line in sys.stdin:
        if not line.strip():
            continue
        case = json.loads(line)
        out.write(f"START {case['case_id']}\n")
        out.flush()
        result: Dict[str, Any] = {"id": case["case_id"]}
        try:
            detail = ops[case["op"]](case["arg"])
            result.update(status="ok", message=str(detail)[:200])
        except Exception as error:  # noqa: BLE001 - reporting every kind is the point
            result.update(status="error", error=type(error).__name__,
                          mro=[cls.__name__ for cls in type(error).__mro__],
                          message=str(error)[:300])
            if type(error).__name__ == "AssertionError":
                result["message"] = traceback.format_exc()[-1500:]
        out.write("RESULT " + json.dumps(result) + "\n")
        out.flush()


if __name__ == "__main__":
    _serve()
