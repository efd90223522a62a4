"""An OpenAI-compatible HTTP server on the multi-sequence engine (``pip install cyllama_cffi[server]``).

``create_app(model_path, **settings)`` gives the FastAPI app; ``serve(model_path, host, port,
**settings)`` runs it with uvicorn until SIGTERM/SIGINT; ``main(argv)`` is the command line
(``python -m cyllama_cffi.server MODEL --port 8000 --parallel 4``). docs/serving.md has the rest.
FastAPI and uvicorn are imported by this package only.
"""

from __future__ import annotations

from ._main import main, serve
from ._app import create_app

__all__ = ["create_app", "serve", "main"]
