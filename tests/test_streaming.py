"""Streaming is UTF-8 exact and stop sequences never leak into the output."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyllama_cffi import LLM
from cyllama_cffi._text import TextAssembler


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",))), st.data())
def test_any_byte_split_reassembles_exactly(text, data):
    encoded = text.encode("utf-8")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(encoded)), max_size=20)))
    pieces = [encoded[a:b] for a, b in zip([0] + cuts, cuts + [len(encoded)])]
    assembler = TextAssembler()
    out = "".join(assembler.feed(piece) for piece in pieces) + assembler.finish()
    assert out == text
    assert "\ufffd" not in out or "\ufffd" in text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab\u00e9\U0001F999", max_size=30), st.text(alphabet="ab\u00e9\U0001F999", min_size=1, max_size=3),
       st.data())
def test_stop_sequence_is_cut_wherever_the_split_falls(text, stop, data):
    encoded = text.encode("utf-8")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(encoded)), max_size=10)))
    pieces = [encoded[a:b] for a, b in zip([0] + cuts, cuts + [len(encoded)])]
    assembler = TextAssembler([stop])
    out = ""
    for piece in pieces:
        out += assembler.feed(piece)
        if assembler.stopped:
            break
    out += assembler.finish()
    index = text.find(stop)
    assert out == (text if index == -1 else text[:index])
    assert assembler.stopped == (index != -1)


def test_incomplete_tail_becomes_one_replacement_at_the_end():
    assembler = TextAssembler()
    assert assembler.feed("é".encode()[:1]) == ""
    assert assembler.finish() == "\ufffd"


@pytest.fixture(scope="module")
def llm(model_path):
    with LLM(model_path, temperature=0.0, max_tokens=48) as instance:
        yield instance


def test_streamed_multibyte_text_equals_detokenizing_all_ids(llm):
    prompt = llm.format_chat([{"role": "user", "content": "Reply with ten different emoji and the Japanese word for cat."}],
                             template="chatml")
    stream = llm.stream(prompt, config=llm.config.replace(parse_special=True, max_tokens=400))
    chunks = list(stream)
    streamed = "".join(chunks)
    pieces = [llm.vocab.token_to_bytes(t) for t in stream.generated]
    split = [p for p in pieces if _is_partial_utf8(p)]
    assert split, "the prompt should make the model emit characters split across tokens"
    assert streamed == llm.detokenize(stream.generated)
    # A character is never replaced mid-stream; only a generation cut by max_tokens in the
    # middle of a character ends with one U+FFFD (exactly as detokenizing all ids gives).
    assert all("\ufffd" not in chunk for chunk in chunks[:-1])
    if stream.finish_reason == "stop":
        assert "\ufffd" not in streamed


def _is_partial_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True
