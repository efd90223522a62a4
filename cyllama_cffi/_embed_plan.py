"""Pure planning for embeddings: checking inputs, fitting texts to the context, packing decodes.

No C and no numpy here, so the rules are unit-tested without a model: which texts share one
``llama_decode`` (whole texts only, at most ``n_batch`` tokens and ``n_seq_max`` sequences),
and what happens to a text longer than the context.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

POOLINGS = ("mean", "cls", "last", "none")


def check_pooling(pooling: object) -> str:
    """``pooling`` if it is one of :data:`POOLINGS`, else ``ValueError`` listing them."""
    if not isinstance(pooling, str) or pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(map(repr, POOLINGS))}, got {pooling!r}")
    return pooling


def check_texts(texts: Union[str, Sequence[str]]) -> List[str]:
    """The texts as a list: one str is one text; anything but str items is a ``TypeError`` naming its index."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] must be a str, got {type(text).__name__}")
    return list(texts)


def fit_lengths(tokens: List[List[int]], limit: int, truncate: bool) -> List[List[int]]:
    """Each text's tokens, at most ``limit`` of them.

    A longer text is cut to its first ``limit`` tokens with ``truncate``, else ``ValueError``
    naming its index and length. A text with no tokens at all (the empty string, for a model
    that adds no BOS) is a ``ValueError`` too: it has no vector.
    """
    fitted = []
    for index, ids in enumerate(tokens):
        if not ids:
            raise ValueError(f"texts[{index}] has no tokens; an empty text has no embedding")
        if len(ids) > limit:
            if not truncate:
                raise ValueError(f"texts[{index}] has {len(ids)} tokens but at most {limit} fit the context; "
                                 "shorten it, raise n_ctx, or pass truncate=True")
            ids = ids[:limit]
        fitted.append(ids)
    return fitted


def pack(lengths: Sequence[int], n_batch: int, n_seq_max: int) -> List[List[int]]:
    """Group text indices, in order, into decodes of whole texts.

    A group holds at most ``n_seq_max`` texts of at most ``n_batch`` tokens together. Every
    length must be in ``1..n_batch`` (see :func:`fit_lengths`).
    """
    if n_batch <= 0 or n_seq_max <= 0:
        raise ValueError("n_batch and n_seq_max must be positive")
    groups: List[List[int]] = []
    current: List[int] = []
    used = 0
    for index, length in enumerate(lengths):
        if not 0 < length <= n_batch:
            raise ValueError(f"text {index} has {length} tokens; a decode holds 1..{n_batch}")
        if current and (used + length > n_batch or len(current) == n_seq_max):
            groups.append(current)
            current, used = [], 0
        current.append(index)
        used += length
    if current:
        groups.append(current)
    return groups


def pack_even(lengths: Sequence[int], n_batch: int, n_seq_max: int, min_rows: int = 2) -> List[Tuple[List[int], int]]:
    """Group texts into decodes of equally long sequences: ``[(indices, rows), ...]``.

    For a causal model, whose token rows do not depend on what follows them: each text of a
    group is padded (rows read back and dropped) to ``rows``, the group's longest text (at
    least ``min_rows``, while that fits ``n_batch``), and ``len(indices) * rows <= n_batch``.
    llama.cpp then decodes a group as one micro-batch in which every text is one whole piece,
    so a text's rows are those of its own decode alone, whatever its neighbours: its rows never
    come from a one-token piece, which takes other kernels. Texts are grouped shortest first,
    so little is padded.
    """
    if n_batch <= 0 or n_seq_max <= 0:
        raise ValueError("n_batch and n_seq_max must be positive")
    for index, length in enumerate(lengths):
        if not 0 < length <= n_batch:
            raise ValueError(f"text {index} has {length} tokens; a decode holds 1..{n_batch}")
    groups: List[Tuple[List[int], int]] = []
    current: List[int] = []
    rows = 0
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        needed = min(max(lengths[index], min_rows), n_batch)
        if current and (len(current) == n_seq_max or (len(current) + 1) * max(rows, needed) > n_batch):
            groups.append((current, rows))
            current, rows = [], 0
        current.append(index)
        rows = max(rows, needed)
    if current:
        groups.append((current, rows))
    return groups
