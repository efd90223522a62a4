"""Token log-probabilities: the log-softmax of one row of logits, and the record kept of it.

``GenerationConfig(logprobs=n)`` asks for, at each generated token, the log-probability the
model gave that token and the ``n`` most likely tokens at that step. They are computed from the
row of raw model logits the token was chosen from, before any sampler stage (logit bias,
grammar, penalties, temperature, filters) changed them: they describe the model, not the
sampler, as llama-server's ``n_probs`` and OpenAI's ``logprobs`` do.

:func:`top_logprobs` is the arithmetic alone (numpy, no llama.cpp): any path that has a row of
logits and the token chosen from it can call it. numpy is imported when it first runs, so
importing this module stays light.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NamedTuple, Tuple

if TYPE_CHECKING:
    import numpy as np

__all__ = ["MAX_LOGPROBS", "TokenLogprob", "TopLogprob", "token_logprob", "top_logprobs"]

MAX_LOGPROBS = 20  # the most alternatives a token can list (OpenAI's bound for top_logprobs)


class TopLogprob(NamedTuple):
    """One of the most likely tokens at a step: its id, text, raw bytes and log-probability."""

    token: int
    text: str  # ``piece`` decoded; a piece that is part of a UTF-8 character shows as U+FFFD
    piece: bytes  # the token's own bytes, which may be a fragment of a multi-byte character
    logprob: float  # natural log; ``math.exp(logprob)`` is the probability

    def to_dict(self) -> Dict[str, Any]:
        """OpenAI's shape (``token`` is the text, ``bytes`` a list of ints) plus ``id``."""
        return {"id": self.token, "token": self.text, "bytes": list(self.piece), "logprob": self.logprob}


class TokenLogprob(NamedTuple):
    """A generated token, the log-probability the model gave it, and the ``top`` alternatives.

    ``top`` lists the ``logprobs`` most likely tokens at that step, most likely first (ties by
    token id); the generated token is among them only when it was that likely.
    """

    token: int
    text: str
    piece: bytes
    logprob: float
    top: Tuple[TopLogprob, ...]

    def to_dict(self) -> Dict[str, Any]:
        """OpenAI's chat ``logprobs.content`` entry, plus ``id``."""
        return {"id": self.token, "token": self.text, "bytes": list(self.piece), "logprob": self.logprob,
                "top_logprobs": [alternative.to_dict() for alternative in self.top]}


def top_logprobs(logits: "np.ndarray", token: int, n: int) -> Tuple[float, List[Tuple[int, float]]]:
    """The log-probability of ``token`` under ``softmax(logits)``, and the ``n`` most likely (id, logprob).

    ``logits`` is one row (one entry per vocabulary token), in any float dtype; the sums are
    done in float64. The alternatives come most likely first, equal ones by token id, so the
    result does not depend on how numpy orders ties. ``n`` 0 gives no alternatives.
    """
    import numpy as np

    row = np.asarray(logits, dtype=np.float64)
    if row.ndim != 1 or row.size == 0:
        raise ValueError(f"logits must be one non-empty row, got shape {row.shape}")
    if not 0 <= token < row.size:
        raise ValueError(f"token id {token} is outside the row of {row.size} logits")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    shifted = row - row.max()  # the largest is 0: exp cannot overflow, and huge logits keep their digits
    log_total = math.log(float(np.exp(shifted).sum()))
    n = min(n, row.size)
    if n == 0:
        return float(shifted[token]) - log_total, []
    candidates = np.argpartition(row, row.size - n)[row.size - n:] if n < row.size else np.arange(row.size)
    # Most likely first; among equal logits, the lower id first (lexsort's last key is the primary one).
    ordered = candidates[np.lexsort((candidates, -row[candidates]))]
    # Ties at the boundary: argpartition keeps an arbitrary one of several equal logits, so
    # take every token equal to the n-th value and keep the lowest ids among them.
    threshold = row[ordered[-1]]
    if n < row.size and np.count_nonzero(row == threshold) > np.count_nonzero(row[ordered] == threshold):
        above = ordered[row[ordered] > threshold]
        tied = np.flatnonzero(row == threshold)[:n - above.size]
        ordered = np.concatenate((above, tied))
    return float(shifted[token]) - log_total, [(int(i), float(shifted[i]) - log_total) for i in ordered]


def token_logprob(logits: "np.ndarray", token: int, n: int, piece_bytes: Callable[[int], bytes]) -> TokenLogprob:
    """:func:`top_logprobs` as a :class:`TokenLogprob`; ``piece_bytes`` gives a token's bytes."""
    logprob, top = top_logprobs(logits, token, n)
    alternatives = tuple(TopLogprob(i, *_text_and_piece(piece_bytes(i)), value) for i, value in top)
    return TokenLogprob(token, *_text_and_piece(piece_bytes(token)), logprob, alternatives)


def _text_and_piece(piece: bytes) -> Tuple[str, bytes]:
    """``(text, piece)``: the fields' order in both records."""
    return piece.decode("utf-8", "replace"), piece
