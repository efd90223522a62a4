"""``cyllama-cffi serve ...``: hands every argument to ``cyllama_cffi.server.main``.

The server needs FastAPI and uvicorn, which are an optional extra: they are imported only
here, and their absence is a one-line message with the install command (exit status 2),
not a traceback.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from ._common import EXIT_USAGE

# Top-level modules the server needs beyond the core dependencies.
SERVER_DEPENDENCIES = ("fastapi", "uvicorn", "starlette", "pydantic", "anyio", "h11")
INSTALL_HINT = "pip install 'cyllama_cffi[server]'"


def missing_dependency(failure: ImportError) -> Optional[str]:
    """The server dependency whose absence caused ``failure``, if that is what it is."""
    name = (failure.name or "").split(".")[0]
    return name if name in SERVER_DEPENDENCIES else None


def run(argv: List[str]) -> int:
    try:
        from ..server import main as server_main

        return int(server_main(argv) or 0)
    except ImportError as failure:
        if failure.name == f"{__package__.rsplit('.', 1)[0]}.server":
            print("cyllama-cffi serve: this installation of cyllama_cffi has no server module", file=sys.stderr)
            return EXIT_USAGE
        missing = missing_dependency(failure)
        if missing is None:
            raise
        print(f"cyllama-cffi serve needs FastAPI and uvicorn ({missing} is missing): {INSTALL_HINT}",
              file=sys.stderr)
        return EXIT_USAGE
