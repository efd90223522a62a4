"""``python -m cyllama_cffi``: the ``cyllama-cffi`` command (see :mod:`cyllama_cffi.cli`).

A bare prompt means ``generate``: ``python -m cyllama_cffi "Write a haiku about llamas."``
streams a chat answer from the default model; Ctrl-C stops it, even mid-prefill.
"""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m cyllama_cffi"))
