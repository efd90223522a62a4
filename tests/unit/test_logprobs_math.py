"""``top_logprobs``/``token_logprob``: the log-softmax of a row of logits, the top alternatives, the records."""

from __future__ import annotations

import json
import math
from typing import List

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyllama_cffi._logprobs import MAX_LOGPROBS, TokenLogprob, TopLogprob, token_logprob, top_logprobs
from cyllama_cffi.response import Response


def reference(values: List[float]) -> List[float]:
    """log-softmax in plain Python, exact sums (math.fsum)."""
    peak = max(values)
    log_total = peak + math.log(math.fsum(math.exp(v - peak) for v in values))
    return [v - log_total for v in values]


rows = st.lists(st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32), min_size=1, max_size=60)


@settings(max_examples=200, deadline=None)
@given(rows, st.data())
def test_logprobs_and_alternatives_equal_a_plain_python_log_softmax(values, data):
    token = data.draw(st.integers(0, len(values) - 1))
    n = data.draw(st.integers(0, MAX_LOGPROBS))
    logprob, top = top_logprobs(np.array(values, dtype=np.float32), token, n)
    expected = reference(values)
    assert logprob == pytest.approx(expected[token], abs=1e-9)
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))[:n]  # most likely first, ties by id
    assert [i for i, _ in top] == order
    assert all(value == pytest.approx(expected[i], abs=1e-9) for i, value in top)
    assert all(isinstance(i, int) and isinstance(value, float) for i, value in top)


def test_ties_at_the_boundary_keep_the_lowest_ids():
    row = np.zeros(1000, dtype=np.float32)
    row[700] = 1.0
    _, top = top_logprobs(row, 3, 4)
    assert [i for i, _ in top] == [700, 0, 1, 2]
    assert top[1][1] == top[2][1] == top[3][1]


def test_huge_logits_neither_overflow_nor_lose_the_small_differences():
    row = np.array([3e38, 3e38, -3e38], dtype=np.float32)
    logprob, top = top_logprobs(row, 0, 3)
    assert logprob == pytest.approx(-math.log(2), abs=1e-12)
    assert top[2][0] == 2 and top[2][1] == pytest.approx(-6e38 - math.log(2), rel=1e-6)
    row = np.array([1e6, 1e6 + 1.0], dtype=np.float64)
    assert top_logprobs(row, 1, 0)[0] == pytest.approx(-math.log1p(math.exp(-1.0)), abs=1e-12)


def test_n_larger_than_the_row_lists_every_token_and_zero_lists_none():
    row = np.array([0.5, 2.0, 1.0])
    assert [i for i, _ in top_logprobs(row, 0, 10)[1]] == [1, 2, 0]
    assert top_logprobs(row, 0, 0)[1] == []
    assert sum(math.exp(v) for _, v in top_logprobs(row, 0, 3)[1]) == pytest.approx(1.0)


@pytest.mark.parametrize("logits, token, n, message", [
    (np.zeros(4), 4, 1, "token id 4 is outside the row of 4 logits"),
    (np.zeros(4), -1, 1, "token id -1 is outside the row of 4 logits"),
    (np.zeros(4), 0, -1, "n must be >= 0, got -1"),
    (np.zeros((2, 2)), 0, 1, r"logits must be one non-empty row, got shape \(2, 2\)"),
    (np.zeros(0), 0, 1, r"logits must be one non-empty row, got shape \(0,\)"),
])
def test_bad_arguments_are_value_errors(logits, token, n, message):
    with pytest.raises(ValueError, match=message):
        top_logprobs(logits, token, n)


PIECES = {0: b"a", 1: b"\xe2\x82", 2: b"\xac", 3: b" b"}  # 1 and 2: halves of the euro sign


def test_token_logprob_keeps_the_bytes_of_a_partial_character():
    entry = token_logprob(np.array([0.0, 3.0, 1.0, 2.0]), 1, 2, PIECES.__getitem__)
    assert entry.token == 1 and entry.piece == b"\xe2\x82" and entry.text == "\ufffd"
    assert [t.token for t in entry.top] == [1, 3] and entry.top[1] == TopLogprob(3, " b", b" b", entry.top[1].logprob)
    assert entry.logprob == entry.top[0].logprob
    assert (entry.piece + PIECES[2]).decode() == "€"  # the pieces, joined, give the character back


def test_records_are_immutable_and_serialise_in_openais_shape():
    entry = token_logprob(np.array([0.0, 3.0, 1.0, 2.0]), 3, 1, PIECES.__getitem__)
    with pytest.raises(AttributeError):
        entry.logprob = 0.0  # type: ignore[misc]
    assert isinstance(entry.top, tuple)
    data = entry.to_dict()
    assert data == {"id": 3, "token": " b", "bytes": [32, 98], "logprob": entry.logprob,
                    "top_logprobs": [{"id": 1, "token": "\ufffd", "bytes": [226, 130], "logprob": entry.top[0].logprob}]}
    response = Response(" b", logprobs=[entry])
    assert json.loads(response.to_json())["logprobs"] == [data]
    assert "logprobs" not in Response(" b").to_dict()


def test_a_record_is_a_named_tuple_of_plain_values():
    entry = TokenLogprob(7, "x", b"x", -1.5, ())
    assert entry == (7, "x", b"x", -1.5, ()) and entry._fields == ("token", "text", "piece", "logprob", "top")
