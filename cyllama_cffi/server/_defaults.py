"""The server's defaults, apart from FastAPI so that the command line's help loads without it."""

from __future__ import annotations

from typing import Dict, Optional

DEFAULT_MAX_BODY = 2 * 1024 * 1024

# Fair steps, measured on 2 cores with 4 streams generating and a 4,000-token prompt arriving
# (docs/performance.md). Flash attention is off: ggml-cpu's flash-attention kernel for fewer
# than 64 rows of a sequence is several times slower deep in a context, and 64 rows there take
# ~550 ms, so with it no step that reads part of a long prompt is short. Without it, 16 prompt
# tokens a step paced to 200 ms keep the streams' gaps under 250 ms (p99) and the prompt's first
# token within ~1.3x its solo read; and streams of a few hundred tokens generate ~10 % faster
# than with flash attention (whose kernel slows down as the context grows), though the first
# ~100 positions of a context generate ~5 % slower (llama.cpp attends to at least 256 cells).
DEFAULT_FLASH_ATTN = "off"
DEFAULT_PROMPT_BUDGET = 16
# A step beside running streams reads more whole chunks while steps stay this short: a prompt
# is read in large steps while it is shallow and in small ones deep in the context, and many
# short prompts arriving together start almost as fast as in one step.
DEFAULT_STEP_MS = 200

# --flash-attn's choices: None lets llama.cpp decide (on, for the CPU).
FLASH_ATTN: Dict[str, Optional[bool]] = {"auto": None, "on": True, "off": False}
