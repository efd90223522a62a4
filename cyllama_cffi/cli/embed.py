"""``cyllama-cffi embed TEXT...``: embedding vectors, one JSON array per line (or one .npy file).

Texts come from the arguments, or from the lines of stdin (blank lines skipped) when there
are none or the only one is ``-``. Vectors are computed by :class:`cyllama_cffi.Embedder`
over the loaded model.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, List, TextIO

from ._common import EXIT_OK, UsageError, load_model


def read_texts(texts: List[str], stdin: TextIO) -> List[str]:
    if texts and texts != ["-"]:
        return list(texts)
    return [line.rstrip("\r\n") for line in stdin if line.strip()]


def _json_lines(vectors: Any, pooling: str) -> str:
    rows = [matrix.tolist() for matrix in vectors] if pooling == "none" else vectors.tolist()
    return "".join(json.dumps(row) + "\n" for row in rows)


def run(args: argparse.Namespace) -> int:
    if args.format == "npy" and not args.output:
        raise UsageError("--format npy writes a binary file: give --output FILE")
    if args.format == "npy" and args.pooling == "none":
        raise UsageError("--pooling none gives one matrix per text, which one .npy array cannot hold; use json")
    texts = read_texts(args.texts, sys.stdin)
    if not texts:
        raise UsageError("no text to embed: give TEXT arguments or lines on stdin")
    from ..embeddings import Embedder

    model = load_model(args)
    try:
        with Embedder(model, n_ctx=args.ctx_size or 512, n_threads=args.threads) as embedder:
            vectors = embedder.embed(texts, pooling=args.pooling, normalize=args.normalize)
    finally:
        model.close()
    if args.format == "npy":
        import numpy as np

        np.save(args.output, vectors)
        return EXIT_OK
    text = _json_lines(vectors, args.pooling)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as out:
            out.write(text)
    else:
        sys.stdout.write(text)
    return EXIT_OK
