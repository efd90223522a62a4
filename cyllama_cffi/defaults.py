"""The default values of generation, under the names cyllama gives them.

``GenerationConfig`` takes its defaults from here, so a program that reads
``cyllama_cffi.defaults.DEFAULT_TOP_K`` (or the same name at the package root) sees what a
config made without arguments uses. The values follow llama.cpp's own defaults, except
``n_ctx``: ``None`` sizes the context to the prompt plus ``max_tokens`` instead of 512 cells.
"""

from __future__ import annotations

__all__ = [
    "LLAMA_DEFAULT_SEED", "DEFAULT_TEMPERATURE", "DEFAULT_TOP_K", "DEFAULT_TOP_P", "DEFAULT_MIN_P",
    "DEFAULT_REPEAT_PENALTY", "DEFAULT_PENALTY_LAST_N", "DEFAULT_PENALTY_FREQ", "DEFAULT_PENALTY_PRESENT",
    "DEFAULT_MAX_TOKENS", "DEFAULT_N_GPU_LAYERS", "DEFAULT_N_BATCH", "DEFAULT_MAIN_GPU", "DEFAULT_SPLIT_MODE",
]

# llama.cpp's "draw a random seed" sentinel (LLAMA_DEFAULT_SEED in llama.h).
LLAMA_DEFAULT_SEED: int = 0xFFFFFFFF

DEFAULT_TEMPERATURE: float = 0.8
DEFAULT_TOP_K: int = 40
DEFAULT_TOP_P: float = 0.95
DEFAULT_MIN_P: float = 0.05
DEFAULT_REPEAT_PENALTY: float = 1.0   # 1.0 = off
DEFAULT_PENALTY_LAST_N: int = 64      # tokens the penalties look back over
DEFAULT_PENALTY_FREQ: float = 0.0     # 0.0 = off
DEFAULT_PENALTY_PRESENT: float = 0.0  # 0.0 = off

DEFAULT_MAX_TOKENS: int = 512

DEFAULT_N_GPU_LAYERS: int = -1        # -1 = every layer llama.cpp can offload
DEFAULT_N_BATCH: int = 2048           # llama_context_default_params().n_batch
DEFAULT_MAIN_GPU: int = 0
DEFAULT_SPLIT_MODE: int = 1           # LLAMA_SPLIT_MODE_LAYER
