"""An OpenAI-compatible HTTP server on the multi-sequence engine (``pip install cyllama_cffi[server]``).

``create_app(model_path, **settings)`` gives the FastAPI app; ``serve(model_path, host, port,
**settings)`` runs it with uvicorn until SIGTERM/SIGINT; ``main(argv)`` is the command line
(``python -m cyllama_cffi.server MODEL --port 8000 --parallel 4``). docs/serving.md has the rest.
FastAPI and uvicorn are imported by this package only, when a server is made; the pure parts
(``_protocol``, ``_metrics``) import without them or the compiled module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["create_app", "serve", "main"]


def create_app(model_path: Any = None, **settings: Any) -> "FastAPI":
    """The FastAPI app serving ``model_path``; see :func:`cyllama_cffi.server._app.create_app`."""
    from ._app import create_app as create

    return create(model_path, **settings)


def serve(model_path: Any = None, host: str = "127.0.0.1", port: int = 8000, **settings: Any) -> None:
    """Serve ``model_path`` on ``host:port`` until SIGTERM/SIGINT."""
    from ._main import serve as run

    run(model_path, host=host, port=port, **settings)


def main(argv: Optional[List[str]] = None) -> int:
    """The command line: ``[MODEL] --host --port --parallel --ctx-size --api-key --prompt-budget --max-queue``."""
    from ._main import main as run

    return run(argv)
