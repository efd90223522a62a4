"""The interactive keys of ``cyllama-cffi`` in a real terminal (tmux): chat and Ctrl-C mid-prefill.

Each test runs the command in a detached tmux session (CI installs tmux) on a private server socket, types with
``send-keys`` and reads the screen with ``capture-pane``, polling until a deadline.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

from conftest import require

REPO = Path(__file__).resolve().parent.parent
SLOW = 300.0  # deadline for the model to load and answer on a busy machine
STOP_WITHIN = 2.0  # seconds from Ctrl-C to the answer's end on screen (a second, plus polling slack)


class Terminal:
    """One command in a 120x40 tmux window."""

    def __init__(self, command: str) -> None:
        self.socket = f"cyllama-test-{uuid.uuid4().hex[:8]}"
        # "; echo EXIT=$?" shows the exit status; the shell then waits so the pane can still be read
        script = f"{command}; echo EXIT=$?; sleep 600"
        self._tmux("new-session", "-d", "-x", "120", "-y", "40", "-s", "cli", script)
        self._tmux("set-option", "-t", "cli", "history-limit", "5000")

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True,
                              text=True, timeout=30).stdout

    def record(self, path: Path) -> None:
        """Append every byte the program writes to the terminal (even what is erased later) to ``path``."""
        self._tmux("pipe-pane", "-t", "cli", "-o", f"cat >> {shlex.quote(str(path))}")

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "cli", *keys)

    def type(self, text: str) -> None:
        self._tmux("send-keys", "-t", "cli", "-l", text)
        self._tmux("send-keys", "-t", "cli", "Enter")

    def screen(self) -> str:
        """The whole scrollback and screen, with wrapped lines joined (and trailing blanks cut)."""
        text = self._tmux("capture-pane", "-p", "-J", "-S", "-5000", "-t", "cli")
        return "\n".join(line.rstrip() for line in text.splitlines())

    def wait_for(self, found: Callable[[str], Optional[object]], deadline: float, what: str) -> object:
        end = time.monotonic() + deadline
        while True:
            text = self.screen()
            result = found(text)
            if result:
                return result
            if time.monotonic() > end:
                raise AssertionError(f"no {what} within {deadline} s; the screen:\n{text}")
            time.sleep(0.05)  # polling interval, not a wait for something to happen

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


@pytest.fixture
def terminal(model_path) -> Iterator[Callable[..., Terminal]]:
    require(shutil.which("tmux") is not None, "tmux is not installed")
    opened = []
    model = f"CYLLAMA_MODEL={shlex.quote(str(model_path))}"
    python = shlex.quote(sys.executable)

    def start(arguments: str, gated: bool = False, path: str = str(REPO)) -> Terminal:
        """``cyllama-cffi arguments`` in a terminal (``gated``: only once a line is typed; ``path``: PYTHONPATH)."""
        gate = "read -r _ && " if gated else ""
        env = f"{model} PYTHONPATH={shlex.quote(path)}"
        term = Terminal(f"cd {shlex.quote(str(REPO))} && {gate}env {env} {python} -m cyllama_cffi {arguments}")
        opened.append(term)
        return term

    yield start
    for term in opened:
        term.close()


FIRST = "My name is Zork. Tell me a long story about a dragon."
SECOND = "What is my name? Then tell me a long story about a castle."
STATS = re.compile(r"^\[(\d+) prompt tokens, (\d+) generated, [\d.]+ tok/s\]$", re.M)


def _prompt_ready(count: int) -> Callable[[str], bool]:
    """True when the last non-empty line is the chat prompt and ``count`` stats lines are on screen."""
    def ready(text: str) -> bool:
        lines = [line for line in text.splitlines() if line.strip()]
        return bool(lines) and lines[-1] == ">" and len(STATS.findall(text)) >= count
    return ready


def _interrupt_answer(term: Terminal, message: str, answers_so_far: int,
                      min_chars: int = 3) -> "tuple[int, int, float]":
    """Send ``message``, wait until ``min_chars`` of its answer are on screen, Ctrl-C; (prompt
    tokens, generated, seconds to stop)."""
    term.type(message)

    def streaming(text: str) -> bool:
        after = text.split("> " + message, 1)
        return len(after) == 2 and len(after[1].strip()) >= min_chars
    term.wait_for(streaming, SLOW, f"streamed answer to {message!r}")
    sent = time.monotonic()
    term.keys("C-c")
    term.wait_for(lambda text: text.count("[answer stopped]") > answers_so_far, SLOW, "[answer stopped]")
    stopped = time.monotonic() - sent
    term.wait_for(_prompt_ready(answers_so_far + 1), SLOW, "fresh prompt after the answer")
    prompt_tokens, generated = STATS.findall(term.screen())[answers_so_far]
    return int(prompt_tokens), int(generated), stopped


@pytest.mark.slow
def test_chat_streams_keeps_history_and_survives_ctrl_c_then_exits_on_ctrl_d(terminal):
    term = terminal("chat --stats --temperature 0 --max-tokens 4000")
    term.wait_for(_prompt_ready(0), SLOW, "chat prompt")

    # Messages that ask for long answers: a short one could end before the Ctrl-C arrives. Greedy
    # decoding tends to repeat the cut first answer in the second and end where it was cut, so the
    # first is cut well after the point where the second is.
    first_prompt, first_generated, first_stop = _interrupt_answer(term, FIRST, 0, min_chars=40)
    second_prompt, second_generated, second_stop = _interrupt_answer(term, SECOND, 1)
    # The second prompt holds the first message, the partial first answer and the new message.
    assert second_prompt >= first_prompt + first_generated + 5, term.screen()
    assert first_stop < STOP_WITHIN and second_stop < STOP_WITHIN, (first_stop, second_stop)

    term.type("/reset")
    term.wait_for(lambda text: "[conversation cleared]" in text, SLOW, "reset confirmation")
    third_prompt, _, _ = _interrupt_answer(term, SECOND, 2)
    assert third_prompt < second_prompt  # the history is gone: a short prompt again

    # Ctrl-C at the prompt drops the typed line and gives a fresh prompt; Ctrl-D exits with 0.
    term.keys("-l", "half a line")
    term.wait_for(lambda text: "> half a line" in text, SLOW, "typed text")
    term.keys("C-c")
    term.wait_for(lambda text: [line for line in text.splitlines() if line.strip()][-1] == ">", SLOW,
                  "fresh prompt after Ctrl-C")
    term.keys("C-d")
    term.wait_for(lambda text: "EXIT=0" in text, SLOW, "exit status 0")
    assert "Traceback" not in term.screen()


def test_generate_ctrl_c_mid_prefill_stops_at_once_with_status_130(terminal, tmp_path):
    prompt = tmp_path / "long.txt"
    prompt.write_text("the llama walks on " * 1000)  # ~6000 tokens: seconds of prefill even on a fast CPU
    log = tmp_path / "stderr.log"  # llama.cpp's log and the stats line go there, the answer to the screen
    term = terminal(f"generate --raw --verbose --max-tokens 5 - < {shlex.quote(str(prompt))} "
                    f"2> {shlex.quote(str(log))}")

    def in_log(pattern: str) -> Callable[[str], object]:
        return lambda _screen: log.is_file() and re.search(pattern, log.read_text(errors="replace"))

    # llama.cpp's last log line before the prefill starts: the context's compute graph is reserved.
    term.wait_for(in_log(r"reserve took"), SLOW, "context creation in the log")
    sent = time.monotonic()
    term.keys("C-c")
    found = term.wait_for(in_log(r"\[cancelled: (\d+) prompt tokens, (\d+) generated"), SLOW, "cancelled stats")
    stopped = time.monotonic() - sent
    assert int(found.group(1)) > 5000 and found.group(2) == "0"  # it was in the prefill
    term.wait_for(lambda text: "EXIT=130" in text, SLOW, "exit status 130")
    assert stopped < STOP_WITHIN, stopped
    assert "Traceback" not in log.read_text(errors="replace")


def test_a_slow_model_load_shows_a_progress_bar_on_the_terminal(terminal, tmp_path):
    """With the bar's half-second delay made zero (every load is slow enough then), the bar is drawn and erased."""
    startup = tmp_path / "sitecustomize.py"
    startup.write_text("import functools\nfrom cyllama_cffi._progress import ProgressBar\n"
                       "ProgressBar.__init__ = functools.partialmethod(ProgressBar.__init__, delay=0.0)\n")
    output = tmp_path / "terminal.out"
    # sitecustomize is imported at startup from sys.path: the tmp dir goes first on PYTHONPATH
    term = terminal("generate --raw --max-tokens 1 hi", gated=True, path=f"{tmp_path}:{REPO}")
    term.record(output)
    term.keys("Enter")
    term.wait_for(lambda text: "EXIT=0" in text, SLOW, "exit status 0")
    written = output.read_bytes().decode(errors="replace")
    assert "loading the model [" in written and "100%" in written, written
    assert re.search(r"\r +\r", written), written  # erased afterwards
    bar_line = [line for line in term.screen().splitlines() if "loading the model" in line]
    assert bar_line == [], bar_line  # nothing left on screen
