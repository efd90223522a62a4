"""The command line and the uvicorn runner: ``main(argv)`` and ``serve(...)``.

SIGTERM or SIGINT cancels every running generation at once (even inside a decode), so the
streams in flight end with a final chunk and ``data: [DONE]`` and the process exits promptly;
a second signal exits at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, List, Optional

from ._defaults import DEFAULT_FLASH_ATTN, DEFAULT_MAX_BODY, DEFAULT_PROMPT_BUDGET, DEFAULT_STEP_MS, FLASH_ATTN

__all__ = ["main", "serve", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cyllama_cffi.server",
                                     description="An OpenAI-compatible HTTP server for a GGUF model.")
    parser.add_argument("model", nargs="?", default=None,
                        help="the GGUF model file (default: the package's default model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--parallel", "-np", type=int, default=4,
                        help="slots: requests generated together in one context (default 4)")
    parser.add_argument("--ctx-size", "-c", type=int, default=None,
                        help="KV cells of the context, shared equally by the slots (default 2048 per slot)")
    parser.add_argument("--prompt-budget", type=int, default=DEFAULT_PROMPT_BUDGET,
                        help="prompt tokens a step decodes beside generating requests (more if --step-ms "
                             f"allows), so long prompts do not stall them (default {DEFAULT_PROMPT_BUDGET})")
    parser.add_argument("--step-ms", type=int, default=DEFAULT_STEP_MS,
                        help="beside generating requests, a step reads more whole prompt chunks while steps "
                             f"stay this short (with flash attention off; 0: never; default {DEFAULT_STEP_MS})")
    parser.add_argument("--flash-attn", "-fa", choices=sorted(FLASH_ATTN), default=DEFAULT_FLASH_ATTN,
                        help=f"flash attention: on, off or auto (llama.cpp's choice: on, for the CPU); default "
                             f"{DEFAULT_FLASH_ATTN}: on a CPU its kernel makes every step that reads part of a long "
                             "prompt deep in the context long")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests that may wait for a slot; past it the answer is 429 (default 64)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1/* and /metrics")
    parser.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY,
                        help="largest request body in bytes; past it the answer is 413 (default 2 MiB)")
    parser.add_argument("--threads", "-t", type=int, default=None, help="CPU threads for decoding")
    parser.add_argument("--alias", default=None, help="the model name /v1/models reports (default: file name)")
    parser.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def serve(model_path: Any = None, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
          **settings: Any) -> None:
    """Serve ``model_path`` on ``host:port`` until SIGTERM/SIGINT (see :func:`create_app` for settings)."""
    import uvicorn

    from ._app import create_app

    app = create_app(model_path, **settings)
    scheduler = app.state.server.scheduler

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            scheduler.stop()  # cancel the work first, so the open streams end now
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=1,
                            lifespan="on", access_log=log_level in ("info", "debug"))
    _Server(config).run()


def main(argv: Optional[List[str]] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), serve until a signal; the exit status.

    ``--help`` and usage errors return argparse's status (0, 2) instead of raising SystemExit,
    so a caller such as a larger command line gets a status either way.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    logging.basicConfig(level=args.log_level.upper())
    try:
        serve(args.model, host=args.host, port=args.port, log_level=args.log_level, parallel=args.parallel,
              ctx_size=args.ctx_size, prompt_budget=args.prompt_budget, max_queue=args.max_queue,
              api_key=args.api_key, max_body=args.max_body, n_threads=args.threads, alias=args.alias,
              flash_attn=FLASH_ATTN[args.flash_attn], step_ms=args.step_ms)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
