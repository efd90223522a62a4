"""The server's defaults, apart from FastAPI so that the command line's help loads without it."""

from __future__ import annotations

from typing import Dict, Optional

DEFAULT_MAX_BODY = 2 * 1024 * 1024

# Fair steps, measured with 4 streams and a 4,000-token prompt on 2 cores (docs/performance.md):
# 128 prompt tokens a step keep the streams' gaps near a second (a whole-batch step freezes them
# for 10-15 s) and the prompt's first token within ~1.2x of its solo read, with flash attention
# on as llama.cpp chooses, which generates 7-8 % faster and reads a long prompt alone about a
# quarter faster. Smoother streams (gaps under 250 ms) take --flash-attn off --prompt-budget 16
# --step-ms 200: ggml-cpu's flash attention kernel for fewer than 64 rows of a sequence is
# several times slower deep in a long context, and 64 rows there take ~550 ms.
DEFAULT_PROMPT_BUDGET = 128
# With flash attention off, a step beside running streams reads more whole chunks while steps
# stay this short: many short prompts arriving together start almost as fast as in one step.
DEFAULT_STEP_MS = 150

# --flash-attn's choices: None lets llama.cpp decide (on, for the CPU).
FLASH_ATTN: Dict[str, Optional[bool]] = {"auto": None, "on": True, "off": False}
