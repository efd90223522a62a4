"""The pure rules of embedding: input checks, fitting texts to the context, packing decodes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cyllama_cffi._embed_plan import check_pooling, check_texts, fit_lengths, pack, pack_even


def test_pack_fills_decodes_in_order_up_to_the_token_budget():
    assert pack([3, 3, 3, 5, 1], n_batch=8, n_seq_max=8) == [[0, 1], [2, 3], [4]]


def test_pack_caps_the_sequences_of_one_decode():
    assert pack([1] * 5, n_batch=100, n_seq_max=2) == [[0, 1], [2, 3], [4]]


def test_pack_gives_a_text_of_exactly_n_batch_a_decode_of_its_own():
    assert pack([2, 8, 2], n_batch=8, n_seq_max=4) == [[0], [1], [2]]


@pytest.mark.parametrize("length", [0, 9])
def test_pack_rejects_a_length_outside_one_decode(length):
    with pytest.raises(ValueError, match="text 1 has"):
        pack([1, length], n_batch=8, n_seq_max=4)


@given(st.lists(st.integers(1, 16), max_size=40), st.integers(16, 64), st.integers(1, 8))
def test_pack_keeps_every_text_once_in_order_within_both_limits(lengths, n_batch, n_seq_max):
    groups = pack(lengths, n_batch, n_seq_max)
    assert [index for group in groups for index in group] == list(range(len(lengths)))
    for group in groups:
        assert 1 <= len(group) <= n_seq_max
        assert sum(lengths[index] for index in group) <= n_batch
    # greedy: the next group's first text would not have fitted the previous group
    for previous, following in zip(groups, groups[1:]):
        full = len(previous) == n_seq_max
        assert full or sum(lengths[i] for i in previous) + lengths[following[0]] > n_batch


def test_fit_lengths_raises_naming_the_text_and_its_length():
    with pytest.raises(ValueError, match=r"texts\[1\] has 5 tokens but at most 4"):
        fit_lengths([[1], [1, 2, 3, 4, 5]], limit=4, truncate=False)


def test_fit_lengths_truncates_to_the_first_tokens():
    assert fit_lengths([[1], [1, 2, 3, 4, 5]], limit=4, truncate=True) == [[1], [1, 2, 3, 4]]


def test_fit_lengths_rejects_a_text_without_tokens():
    with pytest.raises(ValueError, match=r"texts\[0\] has no tokens"):
        fit_lengths([[]], limit=4, truncate=True)


def test_check_texts_accepts_one_str_or_a_sequence():
    assert check_texts("a") == ["a"]
    assert check_texts(("a", "b")) == ["a", "b"]
    assert check_texts([]) == []


@pytest.mark.parametrize("texts, message", [
    (["a", 3], r"texts\[1\] must be a str, got int"),
    ([None], r"texts\[0\] must be a str, got NoneType"),
    (b"bytes", "texts must be a str or a sequence of str, got bytes"),
    (42, "got int"),
    ({"a"}, "got set"),
])
def test_check_texts_names_the_bad_item(texts, message):
    with pytest.raises(TypeError, match=message):
        check_texts(texts)


@pytest.mark.parametrize("pooling", ["mean", "cls", "last", "none"])
def test_check_pooling_accepts_the_four(pooling):
    assert check_pooling(pooling) == pooling


@pytest.mark.parametrize("pooling", ["max", "", None, "MEAN"])
def test_check_pooling_rejects_others(pooling):
    with pytest.raises(ValueError, match="pooling must be one of"):
        check_pooling(pooling)


def test_pack_even_groups_shortest_first_and_pads_to_the_longest():
    assert pack_even([5, 2, 9, 3], n_batch=12, n_seq_max=8) == [([1, 3], 3), ([0], 5), ([2], 9)]


def test_pack_even_pads_a_one_token_text_to_two_rows():
    assert pack_even([1], n_batch=8, n_seq_max=8) == [([0], 2)]
    assert pack_even([1], n_batch=1, n_seq_max=8) == [([0], 1)]  # unless two do not fit


@given(st.lists(st.integers(1, 16), max_size=40), st.integers(16, 64), st.integers(1, 8))
def test_pack_even_keeps_every_text_once_within_both_limits(lengths, n_batch, n_seq_max):
    groups = pack_even(lengths, n_batch, n_seq_max)
    assert sorted(index for group, _ in groups for index in group) == list(range(len(lengths)))
    for group, rows in groups:
        assert 1 <= len(group) <= n_seq_max
        assert rows == max(2, max(lengths[index] for index in group))
        assert len(group) * rows <= n_batch
