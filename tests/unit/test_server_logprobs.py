"""The server's two OpenAI ``logprobs`` shapes, made from ``TokenLogprob`` entries (no model needed).

What is proven: chat entries carry ``token``/``logprob``/``bytes``/``top_logprobs`` (and ``id``);
a log-probability JSON cannot carry (``-inf``) becomes OpenAI's -9999.0; legacy completions'
``text_offset`` counts characters from the prompt's start and carries over from one piece (a
stream chunk) to the next, a character split over two tokens starting where it starts; each
``top_logprobs`` dict holds the alternatives and the chosen token, the most likely of equal texts.
"""

from __future__ import annotations

import json
import math

from cyllama_cffi._logprobs import TokenLogprob, TopLogprob
from cyllama_cffi.server._logprobs import UNLIKELY, CompletionLogprobs, chat_logprobs


def entry(token: int, piece: bytes, logprob: float, *top) -> TokenLogprob:
    text = piece.decode("utf-8", "replace")
    return TokenLogprob(token, text, piece, logprob, tuple(TopLogprob(i, p.decode("utf-8", "replace"), p, lp)
                                                         for i, p, lp in top))


E_ACUTE = "é".encode()  # two bytes: split over two tokens below
ENTRIES = [entry(1, b"Caf", -0.5, (1, b"Caf", -0.5), (2, b"Tea", -1.5)),
           entry(3, E_ACUTE[:1], -0.25),
           entry(4, E_ACUTE[1:], -math.inf, (5, b"x", -0.1), (6, b"x", -0.2)),
           entry(7, b" ok", -1.0)]


def test_chat_entries_have_openais_fields_and_json_safe_numbers():
    shape = chat_logprobs(ENTRIES)
    assert shape["refusal"] is None and len(shape["content"]) == 4
    first = shape["content"][0]
    assert first == {"id": 1, "token": "Caf", "bytes": [67, 97, 102], "logprob": -0.5,
                     "top_logprobs": [{"id": 1, "token": "Caf", "bytes": [67, 97, 102], "logprob": -0.5},
                                      {"id": 2, "token": "Tea", "bytes": [84, 101, 97], "logprob": -1.5}]}
    assert shape["content"][2]["logprob"] == UNLIKELY == -9999.0
    json.loads(json.dumps(shape, allow_nan=False))  # strict JSON: no -Infinity
    assert bytes(b for item in shape["content"] for b in item["bytes"]).decode() == "Café ok"
    assert chat_logprobs([]) == {"content": [], "refusal": None}


def test_completion_offsets_count_from_the_prompt_and_carry_across_pieces():
    whole = CompletionLogprobs(10).piece(ENTRIES)
    assert whole["tokens"] == ["Caf", "\ufffd", "\ufffd", " ok"]
    assert whole["text_offset"] == [10, 13, 13, 14]  # "é" starts at 13, and both its tokens with it
    assert whole["token_logprobs"] == [-0.5, -0.25, UNLIKELY, -1.0]
    pieces = CompletionLogprobs(10)
    parts = [pieces.piece(ENTRIES[:2]), pieces.piece([]), pieces.piece(ENTRIES[2:])]
    for key in whole:
        assert [v for part in parts for v in part[key]] == whole[key]


def test_completion_top_logprobs_hold_the_alternatives_and_the_token():
    tops = CompletionLogprobs(0).piece(ENTRIES)["top_logprobs"]
    assert tops[0] == {"Caf": -0.5, "Tea": -1.5}  # the token is among the alternatives
    assert tops[1] == {"\ufffd": -0.25}  # no alternatives asked: the token alone
    assert tops[2] == {"x": -0.1, "\ufffd": UNLIKELY}  # equal texts: the most likely one's value
