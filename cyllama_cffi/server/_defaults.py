"""The server's defaults, apart from FastAPI so that the command line's help loads without it."""

from __future__ import annotations

from typing import Dict, Optional

DEFAULT_MAX_BODY = 2 * 1024 * 1024

# Fair steps, measured with 4 streams and a 4,000-token prompt on 2 cores (docs/performance.md):
# 16 prompt tokens a step keep the streams' gaps under 250 ms to the end of the prompt. Flash
# attention is off because ggml-cpu's flash attention reads the whole KV cache once per query
# row in chunks of under 64 tokens: 16-token chunks then take twice as long as without it.
DEFAULT_PROMPT_BUDGET = 16
# ...and beside running streams a step reads more whole 16-token chunks while steps stay this
# short: many short prompts arriving together start almost as fast as in one large step.
DEFAULT_STEP_MS = 150

# --flash-attn's choices: None lets llama.cpp decide (on, for the CPU).
FLASH_ATTN: Dict[str, Optional[bool]] = {"auto": None, "on": True, "off": False}
