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
the worker answers ``START <id>`` before it runs the case (and marks the same
in its stderr, so a crash report shows only that case's output) and
``RESULT <json>`` after. Run as a script, this module *is* the worker.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence

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
    op: str   # "file": load + generate with the file at arg ("file_unchecked": without the GGUF
              # pre-check); "mutate": the same on a mutant (see mutant_case);
              # "api": "name::model" runs tests/robustness_cases.py's CASES[name]
              # "grammar": "name::argument" runs tests/grammar_cases.py's CASES[name]
              # "state": "model::listing" loads each saved state listed (tests/state_cases.py)
              # "lora": a LoRA adapter (or a mutant of one) set on a model, see probe_lora
    arg: str


class Worker:
    """One worker child; ``run(cases)`` restarts it after a crash and carries on with the rest."""

    def __init__(self, timeout: float = 60.0, python: Optional[str] = None, prefix: Sequence[str] = ()) -> None:
        self.timeout = timeout
        self.python = python or sys.executable
        self.prefix = list(prefix)  # e.g. setpriv, to run the worker with fewer privileges
        self.process: Optional[subprocess.Popen] = None
        self.crashes = 0
        self.starts = 0
        self._buffer = b""
        self._stderr: Any = None
        self._scratch = tempfile.TemporaryDirectory(prefix="cyllama-worker-")  # mutants a crash left

    # -- child lifetime ------------------------------------------------------------
    def _start(self) -> subprocess.Popen:
        env = dict(os.environ, PYTHONFAULTHANDLER="1", CYLLAMA_WORKER_SCRATCH=self._scratch.name)
        # The child imports the same cyllama_cffi as this process (a source checkout's, when
        # pytest found it through its rootdir rather than an installed copy).
        package_root = str(Path(sys.modules["cyllama_cffi"].__file__).resolve().parent.parent) \
            if "cyllama_cffi" in sys.modules else None
        if package_root:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self.starts += 1
        self._buffer = b""
        # stderr goes to a file: llama.cpp logs every refused file there, and a pipe nobody
        # reads would fill up and block the child (a false "hang").
        self._stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(self.prefix + [self.python, str(Path(__file__).resolve())], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self._stderr, env=env, bufsize=0)
        return self.process

    def close(self) -> None:
        process = self.process
        self.process = None
        if process is None:
            self._scratch.cleanup()
            return
        try:
            process.stdin.close()
            process.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()
        process.stdout.close()
        self._stderr.close()
        self._scratch.cleanup()

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _readline(self, process: subprocess.Popen, deadline: float) -> Optional[bytes]:
        """One line from the child, or None on EOF / timeout (the caller tells which)."""
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([process.stdout], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line + b"\n"

    # -- running cases ---------------------------------------------------------------
    def run(self, cases: Iterable[Case]) -> List[Outcome]:
        """All ``cases`` in order, batched; a crash or hang ends only the case that had started."""
        queue = deque(cases)
        outcomes: List[Outcome] = []
        while queue:
            process = self.process if self.process and self.process.poll() is None else self._start()
            # Fed from a thread: writing everything first would deadlock once both pipes are full.
            feeder = threading.Thread(target=_feed, args=(process, list(queue)), daemon=True)
            feeder.start()
            while queue:
                line = self._readline(process, time.monotonic() + self.timeout)
                if line is None:  # EOF (a crash) or a timeout (a hang), in the case at the front
                    outcomes.append(self._failure(process, queue.popleft().case_id))
                    break
                text = line.decode("utf-8", "replace").rstrip("\n")
                if text.startswith("RESULT "):  # the worker answers in order
                    data = json.loads(text[7:])
                    case = queue.popleft()
                    assert data["id"] == case.case_id, (data["id"], case.case_id)
                    outcomes.append(Outcome(data["id"], data["status"], data.get("error", ""),
                                            tuple(data.get("mro", ())), data.get("message", "")))
            feeder.join(self.timeout)
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
        self._stderr.seek(0)
        log = self._stderr.read().decode("utf-8", "replace")
        marker = log.rfind(f"== START {case_id}\n")
        stderr = log[max(marker, 0):][-3000:]  # what this case printed (all, if it never started)
        for stream in (process.stdin, process.stdout, self._stderr):
            try:
                stream.close()
            except OSError:
                pass
        self.process = None
        self.crashes += 1
        return Outcome(case_id, status, returncode=returncode, stderr=stderr)


def _feed(process: subprocess.Popen, cases: List[Case]) -> None:
    try:
        for case in cases:
            process.stdin.write(json.dumps(case._asdict()).encode() + b"\n")
        process.stdin.flush()
    except (BrokenPipeError, ValueError, OSError):
        pass  # the child died (the reader finds out how) or was closed


# ------------------------------------------------------------------------------------------
# The worker side (this file run as a script)
# ------------------------------------------------------------------------------------------

def _every_utf8_byte() -> str:
    """Text whose UTF-8 encoding contains every byte valid UTF-8 can contain."""
    code_points = list(range(0x800))  # ASCII, every 2-byte lead (C2..DF), every continuation byte
    code_points += [(lead & 0x0F) << 12 | (0x800 if lead == 0xE0 else 0) for lead in range(0xE0, 0xF0)]
    code_points += [0x10000, 0x40000, 0x80000, 0xC0000, 0x100000]  # leads F0..F4
    return "".join(chr(c) for c in code_points)


EVERY_UTF8_BYTE = _every_utf8_byte()


def probe_file(path: str, **overrides: Any) -> str:
    """What a server does with a model file: load it, generate, tokenize any text."""
    from cyllama_cffi import LLM

    llm = LLM(path, temperature=0.0, max_tokens=3, n_threads=1, **overrides)
    try:
        response = llm("the cat sat")
        # the generated text goes back through the tokenizer, like a client's next prompt
        llm.detokenize(llm.tokenize(response.text, add_special=False))
        llm.tokenize(EVERY_UTF8_BYTE)  # every byte the tokenizer may have to fall back to
        return f"{response.finish_reason}:{response.stats.generated_tokens}"
    finally:
        llm.close()


def probe_file_unchecked(path: str) -> str:
    """``probe_file`` with cyllama_cffi's GGUF pre-check switched off.

    Only for proving that a pre-check rule is needed: the file it refuses
    really does crash llama.cpp when let through. Loaded with llama.cpp's mmap
    (``LlamaModel``'s default, ``use_mmap=True`` for ``LLM``): misaligned tensor
    data crashes only there, a private copy of the weights reads it safely.
    """
    import cyllama_cffi.lowlevel.model as model_module

    def no_check(model_path: Any) -> Path:
        return Path(os.fspath(model_path))

    saved = model_module.check_model_path
    model_module.check_model_path = no_check
    try:
        return probe_file(path, use_mmap=True)
    finally:  # the worker goes on with other cases
        model_module.check_model_path = saved


_BASES: Dict[str, bytes] = {}


def probe_mutant(arg: str) -> str:
    """``probe_file`` on a mutant made here, so thousands of mutants need no files from the parent.

    ``arg`` is JSON: ``{"base": path, "patches": [[offset, hex bytes], ...], "truncate": n or null}``.
    """
    spec = json.loads(arg)
    base = _BASES.get(spec["base"])
    if base is None:
        base = _BASES[spec["base"]] = Path(spec["base"]).read_bytes()
    data = bytearray(base)
    for offset, patch in spec.get("patches", ()):
        raw = bytes.fromhex(patch)
        data[offset:offset + len(raw)] = raw
    if spec.get("truncate") is not None:
        del data[spec["truncate"]:]
    scratch = os.environ.get("CYLLAMA_WORKER_SCRATCH") or tempfile.gettempdir()
    target = Path(scratch) / f"mutant-{os.getpid()}.gguf"
    target.write_bytes(bytes(data))
    try:
        return probe_file(str(target))
    finally:
        target.unlink()


def mutant_case(case_id: str, base: Any, patches: Iterable = (), truncate: Optional[int] = None) -> Case:
    """A ``mutate`` case: ``patches`` are (offset, bytes) pairs applied to the file ``base``."""
    arg = json.dumps({"base": str(base), "patches": [[offset, bytes(raw).hex()] for offset, raw in patches],
                      "truncate": truncate})
    return Case(case_id, "mutate", arg)


def probe_lora(arg: str) -> str:
    """Set a LoRA adapter on a live LLM and generate; after a refusal the LLM must still generate.

    ``arg`` is JSON: ``{"model": path, "adapter": path, "patches": [[offset, hex], ...],
    "truncate": n or null, "unchecked": bool}``; ``unchecked`` switches the adapter's Python
    check off, only to prove that a rule of it prevents a real crash.
    """
    spec = json.loads(arg)
    data = bytearray(Path(spec["adapter"]).read_bytes())
    for offset, patch in spec.get("patches", ()):
        raw = bytes.fromhex(patch)
        data[offset:offset + len(raw)] = raw
    if spec.get("truncate") is not None:
        del data[spec["truncate"]:]
    scratch = os.environ.get("CYLLAMA_WORKER_SCRATCH") or tempfile.gettempdir()
    target = Path(scratch) / f"adapter-{os.getpid()}.gguf"
    target.write_bytes(bytes(data))

    import cyllama_cffi.lowlevel.adapter as adapter_module
    from cyllama_cffi import LLM
    from cyllama_cffi._lora_check import LoraFileInfo

    saved = adapter_module.check_lora_path
    if spec.get("unchecked"):
        adapter_module.check_lora_path = lambda path, arch, tensors: (Path(os.fspath(path)), LoraFileInfo(0.0, 0))
    llm = LLM(spec["model"], temperature=0.0, max_tokens=3, n_threads=1)
    try:
        before = llm("the cat sat").text
        try:
            llm.set_lora([(str(target), 1.0)])
        except Exception:
            if llm.lora or llm("the cat sat").text != before:
                raise AssertionError("a refused adapter changed the LLM") from None
            raise
        response = llm("the cat sat")
        llm.set_lora(None)
        if llm("the cat sat").text != before:
            raise AssertionError("removing the adapter did not restore the base output")
        return f"{response.finish_reason}:{response.stats.generated_tokens}"
    finally:
        adapter_module.check_lora_path = saved
        llm.close()
        llm.model.close()
        target.unlink()


def lora_case(case_id: str, model: Any, adapter: Any, patches: Iterable = (), truncate: Optional[int] = None,
              unchecked: bool = False) -> Case:
    """A ``lora`` case: ``patches`` are (offset, bytes) pairs applied to the adapter file."""
    arg = json.dumps({"model": str(model), "adapter": str(adapter), "truncate": truncate, "unchecked": unchecked,
                      "patches": [[offset, bytes(raw).hex()] for offset, raw in patches]})
    return Case(case_id, "lora", arg)


def run_api_case(arg: str) -> Any:
    """``arg`` is ``name::model_path``: one function of tests/robustness_cases.py."""
    sys.path.insert(0, str(HERE))
    import robustness_cases

    name, _, model_path = arg.partition("::")
    function = robustness_cases.CASES[name]
    return function(model_path)


def run_grammar_case(arg: str) -> Any:
    """``arg`` is ``name::argument``: one function of tests/grammar_cases.py."""
    sys.path.insert(0, str(HERE))
    import grammar_cases

    name, _, argument = arg.partition("::")
    return grammar_cases.CASES[name](argument)


def run_state_case(arg: str) -> Any:
    """``arg`` is ``model_path::listing``: tests/state_cases.py loads each saved state listed."""
    sys.path.insert(0, str(HERE))
    import state_cases

    model_path, _, listing = arg.partition("::")
    return state_cases.load_corrupted_states(model_path, listing)


OPS: Dict[str, Callable[[str], Any]] = {"file": probe_file, "file_unchecked": probe_file_unchecked,
                                        "mutate": probe_mutant, "api": run_api_case, "grammar": run_grammar_case,
                                        "state": run_state_case, "lora": probe_lora}


def _serve() -> None:
    out = sys.stdout
    ops = OPS
    for line in sys.stdin:
        if not line.strip():
            continue
        case = json.loads(line)
        sys.stderr.write(f"== START {case['case_id']}\n")
        sys.stderr.flush()
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
