"""``python -m cyllama_cffi [prompt]``: stream a generation from the default model.

The README's first command. Ctrl-C stops the generation (even mid-prefill)
and prints what was generated so far.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cyllama_cffi", description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="Write a short poem about a llama who learns to code.")
    parser.add_argument("--model", help="GGUF file (default: $CYLLAMA_MODEL or SmolLM2-135M-Instruct, fetched once)")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    parser.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    args = parser.parse_args(argv)

    from .models import default_model_path

    model_path = default_model_path(args.model, verbose=True)
    from .config import GenerationConfig
    from .llm import LLM

    config = GenerationConfig(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    with LLM(model_path, config=config, verbose=args.verbose) as llm:
        messages = [{"role": "user", "content": args.prompt}]
        with llm.install_sigint_handler():
            for chunk in llm(args.prompt, stream=True) if args.raw else llm.chat(messages, stream=True):
                sys.stdout.write(chunk)
                sys.stdout.flush()
        stats = llm.last_stats
        sys.stdout.write("\n")
        if stats is not None:
            print(f"[{llm.last_finish_reason}: {stats.prompt_tokens} prompt tokens, "
                  f"{stats.generated_tokens} generated at {stats.tokens_per_second:.1f} tok/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
