"""OpenAI's two ``logprobs`` shapes, made from the engine's :class:`~cyllama_cffi.TokenLogprob` entries.

Pure Python (no llama.cpp). Chat's ``choices[].logprobs`` is ``{"content": [entry...],
"refusal": null}``, an entry being ``{token, logprob, bytes, top_logprobs: [{token, logprob,
bytes}]}`` (plus the token's ``id``). Legacy completions' is four parallel lists: ``tokens``,
``token_logprobs``, ``top_logprobs`` (a dict of token text to logprob per token: the
alternatives and the chosen token, so up to n + 1 keys; tokens with the same text share a key,
the most likely one kept) and ``text_offset`` (where each token's text starts, counted in
characters from the start of the prompt, as OpenAI counts). Both are made a piece at a time:
a stream sends each chunk the entries of its tokens.
"""

from __future__ import annotations

import codecs
import math
from typing import Any, Dict, List, Sequence

from .._logprobs import TokenLogprob, TopLogprob

__all__ = ["CompletionLogprobs", "chat_logprobs"]

UNLIKELY = -9999.0  # OpenAI's value for a log-probability too small to tell (JSON has no -Infinity)


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else UNLIKELY


def _alternative(top: TopLogprob) -> Dict[str, Any]:
    return {"id": top.token, "token": top.text, "bytes": list(top.piece), "logprob": _finite(top.logprob)}


def _chat_entry(entry: TokenLogprob) -> Dict[str, Any]:
    return {"id": entry.token, "token": entry.text, "bytes": list(entry.piece), "logprob": _finite(entry.logprob),
            "top_logprobs": [_alternative(top) for top in entry.top]}


def chat_logprobs(entries: Sequence[TokenLogprob]) -> Dict[str, Any]:
    """Chat's ``choices[].logprobs`` (or a stream chunk's) for ``entries``."""
    return {"content": [_chat_entry(entry) for entry in entries], "refusal": None}


class CompletionLogprobs:
    """Legacy completions' ``choices[].logprobs``, a piece at a time, offsets carried across pieces.

    ``start`` is the prompt's length in characters: the first token's ``text_offset``. A token
    that holds part of a multi-byte character starts where that character does.
    """

    def __init__(self, start: int) -> None:
        self._offset = start
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def piece(self, entries: Sequence[TokenLogprob]) -> Dict[str, Any]:
        """The four lists for the next ``entries`` (the ones after the last call's)."""
        tokens: List[str] = []
        token_logprobs: List[float] = []
        top_logprobs: List[Dict[str, float]] = []
        text_offset: List[int] = []
        for entry in entries:
            text_offset.append(self._offset)
            self._offset += len(self._decoder.decode(entry.piece))
            tokens.append(entry.text)
            token_logprobs.append(_finite(entry.logprob))
            alternatives: Dict[str, float] = {}
            for top in entry.top:  # most likely first: a later token with the same text keeps the first's value
                alternatives.setdefault(top.text, _finite(top.logprob))
            alternatives.setdefault(entry.text, _finite(entry.logprob))
            top_logprobs.append(alternatives)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": text_offset}
