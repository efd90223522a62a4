"""Embeddings on the default model: shapes, pooling, batching, truncation, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from cyllama_cffi import LLM, ClosedError, Embedder
from cyllama_cffi.lowlevel.model import LlamaModel

N_CTX = 128

# A text's token rows alone and packed among others are the same bits (texts padded to equal
# lengths make one micro-batch, see cyllama_cffi/embeddings.py); a mean of them, normalised,
# may differ in float32's last bit. Texts leaking into each other would move it by 5e-3 and
# more, a one-token piece of a text by 1e-4 (that is what the tolerance used to allow).
PACKING_TOL = 1e-6

TEXTS = [
    "The cat sat on the mat.",
    "A kitten is resting on a rug.",
    "Stock markets fell sharply after the announcement.",
    "Photosynthesis turns sunlight into chemical energy.",
    "How do I bake bread at home?",
]

# 20 texts of assorted lengths, to be packed into several decodes
CROWD = [f"Sentence number {i} says {'something ' * (i % 7)}about topic {i * 13 % 17}." for i in range(20)]


@pytest.fixture(scope="module")
def embedder(model_path):
    with Embedder(model_path, n_ctx=N_CTX, n_seq_max=8) as embedder:
        yield embedder


def _unit(vector):
    return vector / np.linalg.norm(vector)


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_pooled_embeddings_are_float32_rows(embedder, pooling):
    vectors = embedder.embed(TEXTS, pooling=pooling)
    assert isinstance(vectors, np.ndarray)
    assert vectors.dtype == np.float32
    assert vectors.shape == (len(TEXTS), embedder.n_embd) == (len(TEXTS), embedder.model.n_embd)
    assert np.isfinite(vectors).all()


def test_one_str_gives_one_row(embedder):
    assert embedder.embed("hello world").shape == (1, embedder.n_embd)
    rows = embedder.embed("hello world", pooling="none")
    assert isinstance(rows, list) and len(rows) == 1 and rows[0].ndim == 2


def test_pooling_none_gives_one_row_per_token(embedder):
    rows = embedder.embed(TEXTS, pooling="none")
    assert isinstance(rows, list) and len(rows) == len(TEXTS)
    for text, matrix in zip(TEXTS, rows):
        assert matrix.dtype == np.float32
        assert matrix.shape == (len(embedder.model.vocab.tokenize(text)), embedder.n_embd)


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_normalize_gives_unit_vectors(embedder, pooling):
    np.testing.assert_allclose(np.linalg.norm(embedder.embed(TEXTS, pooling=pooling), axis=1), 1.0, atol=1e-5)
    raw = embedder.embed(TEXTS, pooling=pooling, normalize=False)
    assert np.abs(np.linalg.norm(raw, axis=1) - 1.0).max() > 0.1  # so normalising did something


def test_normalize_with_pooling_none_normalises_each_token_row(embedder):
    for matrix in embedder.embed(TEXTS, pooling="none"):
        np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)


def test_batched_mean_equals_the_mean_of_token_rows_one_text_at_a_time(embedder):
    batched = embedder.embed(CROWD, pooling="mean")  # several texts per decode, pooled by llama.cpp
    for index, text in enumerate(CROWD):
        (rows,) = embedder.embed([text], pooling="none", normalize=False)
        np.testing.assert_allclose(batched[index], _unit(rows.mean(axis=0)), atol=PACKING_TOL)


@pytest.mark.parametrize("pooling, row", [("cls", 0), ("last", -1)])
def test_cls_and_last_are_the_first_and_last_token_rows(embedder, pooling, row):
    pooled = embedder.embed(CROWD, pooling=pooling, normalize=False)
    token_rows = embedder.embed(CROWD, pooling="none", normalize=False)  # packed the same way
    for index in range(len(CROWD)):
        np.testing.assert_allclose(pooled[index], token_rows[index][row], atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "none"])
def test_a_text_embeds_the_same_alone_and_among_twenty_others(embedder, pooling):
    text = "Embeddings should not depend on their neighbours."
    alone = embedder.embed([text], pooling=pooling)[0]
    for position in (0, 7, 20):
        crowd = CROWD[:position] + [text] + CROWD[position:]
        np.testing.assert_allclose(embedder.embed(crowd, pooling=pooling)[position], alone, atol=PACKING_TOL)


def test_token_rows_are_the_same_bits_alone_and_packed(embedder):
    """Texts of unequal lengths share decodes: their rows do not move by a single bit."""
    packed = embedder.embed(CROWD, pooling="none", normalize=False)
    for text, rows in zip(CROWD, packed):
        (alone,) = embedder.embed([text], pooling="none", normalize=False)
        assert np.array_equal(rows, alone), text


def test_results_do_not_depend_on_how_many_texts_share_a_decode(model_path, embedder):
    packed = embedder.embed(CROWD)
    with Embedder(model_path, n_ctx=N_CTX, n_seq_max=1) as one_by_one:
        np.testing.assert_allclose(one_by_one.embed(CROWD), packed, atol=PACKING_TOL)


def test_similar_sentences_are_closer_than_unrelated_ones(embedder):
    cat, kitten, stocks = embedder.embed(TEXTS[:3])  # normalised: the dot product is the cosine
    assert float(cat @ kitten) > float(cat @ stocks)
    assert float(cat @ kitten) > float(kitten @ stocks)


def _words(embedder, count):
    """A text of exactly ``count`` tokens (checked): a repeated word."""
    text = "hello" + " hello" * (count - 1)
    assert len(embedder.model.vocab.tokenize(text)) == count
    return text


def test_a_text_longer_than_the_context_raises_naming_it(embedder):
    with pytest.raises(ValueError, match=rf"texts\[1\] has {N_CTX + 5} tokens but at most {N_CTX}"):
        embedder.embed(["short", _words(embedder, N_CTX + 5)])


def test_truncate_keeps_the_first_tokens(embedder):
    long_text, exact = _words(embedder, N_CTX + 40), _words(embedder, N_CTX)
    truncated = embedder.embed(["short", long_text], truncate=True)
    np.testing.assert_allclose(truncated[1], embedder.embed(exact)[0], atol=1e-5)
    rows = embedder.embed([long_text], pooling="none", truncate=True)[0]
    assert rows.shape[0] == N_CTX


def test_a_text_filling_the_whole_context_fits(embedder):
    assert embedder.embed(_words(embedder, N_CTX)).shape == (1, embedder.n_embd)


def test_no_texts_gives_an_empty_result(embedder):
    empty = embedder.embed([])
    assert empty.shape == (0, embedder.n_embd) and empty.dtype == np.float32
    assert embedder.embed([], pooling="none") == []


@pytest.mark.parametrize("texts, message", [
    (["ok", 7], r"texts\[1\] must be a str, got int"),
    ([b"bytes"], r"texts\[0\] must be a str, got bytes"),
    (None, "texts must be a str or a sequence of str, got NoneType"),
])
def test_bad_types_raise_type_error_naming_the_index(embedder, texts, message):
    with pytest.raises(TypeError, match=message):
        embedder.embed(texts)


def test_bad_values_raise_value_error(embedder):
    with pytest.raises(ValueError, match="pooling must be one of"):
        embedder.embed(["a"], pooling="max")
    with pytest.raises(ValueError, match=r"texts\[1\] has no tokens"):
        embedder.embed(["a", ""])
    assert embedder.embed(["still works"]).shape == (1, embedder.n_embd)


@pytest.mark.parametrize("kwargs, message", [
    ({"n_ctx": 0}, "n_ctx must be a positive int"),
    ({"n_seq_max": 0}, "n_seq_max must be an int in 1..256"),
    ({"n_seq_max": 257}, "n_seq_max must be an int in 1..256"),
    ({"pooling": "sum"}, "pooling must be one of"),
    ({"n_threads": 0}, "n_threads must be a positive int"),
])
def test_bad_embedder_settings_raise_before_loading(model_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Embedder(model_path, **kwargs)


def test_a_vocab_only_model_has_no_embeddings(model_path):
    model = LlamaModel(model_path, vocab_only=True)
    try:
        with pytest.raises(ValueError, match="vocab_only=True: it has no weights"):
            Embedder(model)
        assert model.ptr is not None  # a borrowed model stays loaded
    finally:
        model.close()


def test_embedder_defaults_and_close(model_path):
    embedder = Embedder(model_path, n_ctx=64, pooling="last", normalize=False)
    model = embedder.model
    last = embedder.embed(TEXTS[:2])
    np.testing.assert_allclose(last, embedder.embed(TEXTS[:2], pooling="last", normalize=False))
    embedder.close()
    embedder.close()  # idempotent
    with pytest.raises(ClosedError):
        embedder.embed("x")
    with pytest.raises(ClosedError):
        model.ptr  # noqa: B018 - the Embedder loaded it, so it freed it


def test_llm_embed_matches_an_embedder_and_survives_close(model_path, embedder):
    expected = embedder.embed(TEXTS)
    with LLM(model_path, n_ctx=N_CTX, max_tokens=4) as llm:
        np.testing.assert_allclose(llm.embed(TEXTS), expected, atol=1e-5)
        assert llm.embed(TEXTS[0], pooling="none")[0].shape[1] == embedder.n_embd
        inner = llm._embedder
        assert isinstance(llm("Hello"), object)  # generation and embedding contexts coexist
        llm.close()  # frees the embedding context too, keeps the model
        assert llm._embedder is None and inner._ctx is None
        np.testing.assert_allclose(llm.embed(TEXTS), expected, atol=1e-5)
    with pytest.raises(ClosedError, match="this LLM is closed"):
        llm.embed(TEXTS)
