"""The command line's grammar, its pure helpers and the progress bar (no model, no compiled module)."""

from __future__ import annotations

import io
import os
import re
import signal

import pytest

from cyllama_cffi._progress import ProgressBar
from cyllama_cffi.cli import _serve_argv
from cyllama_cffi.cli._common import UsageError, cancellable_load
from cyllama_cffi.cli._parser import DEFAULT_PROMPT, build_parser, parse_args, split_serve, with_subcommand
from cyllama_cffi.cli.chat import Conversation
from cyllama_cffi.cli.embed import read_texts
from cyllama_cffi.cli.generate import read_prompt
from cyllama_cffi.cli.serve import missing_dependency
from cyllama_cffi.errors import LoadCancelled


# -- the bare-prompt rule ---------------------------------------------------------------------

@pytest.mark.parametrize("argv, expected", [
    (["Write a haiku about llamas."], ["generate", "Write a haiku about llamas."]),
    ([], ["generate"]),
    (["--raw", "--max-tokens", "50", "Once"], ["generate", "--raw", "--max-tokens", "50", "Once"]),
    (["--model", "m.gguf", "Hello"], ["--model", "m.gguf", "generate", "Hello"]),
    (["--model=m.gguf", "--verbose", "Hello"], ["--model=m.gguf", "--verbose", "generate", "Hello"]),
    (["--threads", "2", "chat"], ["--threads", "2", "chat"]),
    (["chat", "--stats"], ["chat", "--stats"]),
    (["generate", "chat"], ["generate", "chat"]),
    (["--help"], ["--help"]),
    (["--version"], ["--version"]),
])
def test_a_command_line_without_subcommand_means_generate(argv, expected):
    assert with_subcommand(argv) == expected


def test_a_bare_prompt_parses_as_generate_with_the_old_defaults():
    args = parse_args(["Write a haiku about llamas."])
    assert args.command == "generate"
    assert args.prompt == "Write a haiku about llamas."
    assert (args.max_tokens, args.temperature, args.seed, args.raw) == (200, 0.0, None, False)
    assert (args.model, args.threads, args.ctx_size, args.verbose) == (None, None, None, False)


def test_the_quickstart_command_lines_parse():
    args = parse_args(["--raw", "--max-tokens", "50", "--temperature", "0.8", "Once upon a time"])
    assert (args.command, args.raw, args.max_tokens, args.temperature, args.prompt) == \
        ("generate", True, 50, 0.8, "Once upon a time")
    args = parse_args(["--model", "path/to/model.gguf", "--verbose", "Hello"])
    assert (args.model, args.verbose, args.prompt) == ("path/to/model.gguf", True, "Hello")


def test_global_options_work_before_and_after_the_subcommand():
    before = parse_args(["--model", "a.gguf", "--threads", "3", "--ctx-size", "1024", "chat"])
    after = parse_args(["chat", "--model", "a.gguf", "--threads", "3", "--ctx-size", "1024"])
    for args in (before, after):
        assert (args.command, args.model, args.threads, args.ctx_size) == ("chat", "a.gguf", 3, 1024)
    # given before, not reset by the subparser's own (suppressed) default
    assert parse_args(["--verbose", "embed", "x"]).verbose is True
    assert parse_args(["embed", "x"]).verbose is False


def test_subcommand_options_and_defaults():
    chat = parse_args(["chat", "--system", "Be terse.", "--stats"])
    assert (chat.system, chat.stats, chat.temperature, chat.max_tokens) == ("Be terse.", True, 0.7, 512)
    embed = parse_args(["embed", "--pooling", "last", "--no-normalize", "a", "b"])
    assert (embed.texts, embed.pooling, embed.normalize, embed.format) == (["a", "b"], "last", False, "json")
    assert parse_args(["embed"]).texts == []
    bench = parse_args(["bench", "-p", "16", "-n", "4", "-r", "2"])
    assert (bench.prompt_tokens, bench.gen_tokens, bench.repetitions) == (16, 4, 2)
    assert parse_args(["generate", "-"]).prompt == "-"


@pytest.mark.parametrize("argv", [
    ["--threads", "0", "chat"], ["bench", "-p", "zero"], ["embed", "--pooling", "max", "x"],
    ["--ctx-size", "-5", "x"], ["chat", "extra"],
])
def test_bad_options_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


# -- serve hands its arguments over untouched ------------------------------------------------

def test_serve_arguments_are_split_off_before_parsing():
    assert split_serve(["serve", "--help"]) == ([], ["--help"])
    assert split_serve(["serve", "m.gguf", "--port", "9", "--api-key", "k"]) == \
        ([], ["m.gguf", "--port", "9", "--api-key", "k"])
    assert split_serve(["--model", "m.gguf", "serve", "--port", "9"]) == (["--model", "m.gguf"], ["--port", "9"])
    assert split_serve(["generate", "serve"]) is None
    assert split_serve(["serve me a poem"]) is None


def test_global_options_before_serve_become_server_arguments():
    assert _serve_argv(["--model", "m.gguf", "--ctx-size", "512"], ["--port", "9"]) == \
        ["m.gguf", "--ctx-size", "512", "--port", "9"]
    assert _serve_argv(["--model=m.gguf"], []) == ["m.gguf"]
    assert _serve_argv(["--threads", "2"], []) == ["--threads", "2"]
    assert _serve_argv(["--verbose"], []) == ["--log-level", "info"]
    with pytest.raises(UsageError, match="after 'serve'"):
        _serve_argv(["--max-tokens", "2"], [])


def test_only_missing_server_dependencies_get_the_install_hint():
    assert missing_dependency(ModuleNotFoundError("No module named 'fastapi'", name="fastapi")) == "fastapi"
    assert missing_dependency(ModuleNotFoundError("x", name="uvicorn.config")) == "uvicorn"
    assert missing_dependency(ModuleNotFoundError("x", name="numpy")) is None
    assert missing_dependency(ImportError("cannot import name 'x'")) is None


# -- help text -------------------------------------------------------------------------------

def test_help_is_plain_text_with_every_subcommand_and_examples():
    text = build_parser().format_help()
    for name in ("generate", "chat", "serve", "embed", "bench"):
        assert re.search(rf"^\s+{name}\s+\S", text, re.M), name  # listed with a one-line description
    assert "examples:" in text and 'cyllama-cffi "Write a haiku about llamas."' in text
    assert not re.search(r"\x1b\[|\*\*|`|<[a-z]+>", text)  # no ANSI codes, Markdown or HTML


# -- pure helpers of the subcommands -----------------------------------------------------------

class FakeStdin(io.StringIO):
    def __init__(self, text: str, tty: bool) -> None:
        super().__init__(text)
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_the_prompt_comes_from_the_argument_or_stdin():
    assert read_prompt("hi", FakeStdin("ignored", tty=False)) == "hi"
    assert read_prompt("-", FakeStdin("from stdin\n", tty=True)) == "from stdin\n"
    assert read_prompt(None, FakeStdin("piped", tty=False)) == "piped"
    assert read_prompt(None, FakeStdin("", tty=True)) == DEFAULT_PROMPT
    assert read_prompt(None, FakeStdin("", tty=False)) == DEFAULT_PROMPT  # e.g. </dev/null
    with pytest.raises(UsageError, match="empty prompt"):
        read_prompt("-", FakeStdin("  \n", tty=False))


def test_texts_come_from_the_arguments_or_the_lines_of_stdin():
    assert read_texts(["a", "b"], FakeStdin("x\n", tty=False)) == ["a", "b"]
    assert read_texts([], FakeStdin("one\n\n two \r\n", tty=False)) == ["one", " two "]
    assert read_texts(["-"], FakeStdin("one\n", tty=False)) == ["one"]


def test_the_conversation_keeps_turns_and_reset_keeps_the_system_message():
    conversation = Conversation("Be terse.")
    assert conversation.ask("hi") == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]
    conversation.record("hi", "hello")
    assert [m["role"] for m in conversation.ask("again")] == ["system", "user", "assistant", "user"]
    conversation.reset()
    assert conversation.messages == [{"role": "system", "content": "Be terse."}]
    assert Conversation(None).messages == []


# -- progress bar -------------------------------------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_bar_stays_silent_for_a_fast_task_and_draws_for_a_slow_one():
    clock, screen = Clock(), Terminal()
    bar = ProgressBar("loading", stream=screen, delay=0.5, width=10, clock=clock)
    bar.update(0.2)
    clock.now += 0.4
    bar.update(0.5)
    assert screen.getvalue() == "" and not bar.shown  # fast so far: nothing drawn
    clock.now += 0.2
    bar.update(0.5)
    assert screen.getvalue() == "\rloading [#####.....]  50%"
    bar.update(0.501)  # same percentage: no redraw
    bar.update(1.0)
    assert screen.getvalue().endswith("\rloading [##########] 100%")
    bar.close()
    assert screen.getvalue().endswith("\r" + " " * len("loading [##########] 100%") + "\r")
    assert not bar.shown


def test_the_bar_draws_nothing_when_the_stream_is_not_a_terminal():
    clock, log = Clock(), io.StringIO()
    bar = ProgressBar("loading", stream=log, delay=0.0, clock=clock)
    bar.update(0.7)
    bar.close()
    assert log.getvalue() == "" and not bar.enabled


def test_ctrl_c_during_a_load_stops_it_at_the_next_progress_call():
    """The SIGINT handler only raises a flag; the callback answers False; the caller gets KeyboardInterrupt."""
    previous = signal.getsignal(signal.SIGINT)
    answers = []
    with pytest.raises(KeyboardInterrupt):
        with cancellable_load() as progress:
            answers.append(progress(0.1))
            os.kill(os.getpid(), signal.SIGINT)  # Python runs the handler before the next bytecode
            answers.append(progress(0.2))
            raise LoadCancelled("stopped by the callback")  # what LlamaModel raises then
    assert answers == [True, False]
    assert signal.getsignal(signal.SIGINT) is previous


def test_ctrl_c_after_the_last_progress_call_still_interrupts():
    with pytest.raises(KeyboardInterrupt):
        with cancellable_load() as progress:
            progress(1.0)
            os.kill(os.getpid(), signal.SIGINT)
            progress  # noqa: B018 - a bytecode for the handler to run at


def test_serve_without_a_server_module_says_so(monkeypatch, capsys):
    import sys

    from cyllama_cffi.cli import main

    monkeypatch.setitem(sys.modules, "cyllama_cffi.server", None)  # as if the module were absent
    assert main(["serve", "--help"]) == 2
    assert capsys.readouterr().err.strip() == \
        "cyllama-cffi serve: this installation of cyllama_cffi has no server module"


def test_raw_with_a_system_message_is_a_usage_error(capsys):
    from cyllama_cffi.cli import main

    assert main(["generate", "--raw", "--system", "Be terse.", "hi"]) == 2  # refused before any model loads
    assert "--raw" in capsys.readouterr().err
