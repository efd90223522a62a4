"""``Response`` stands in for its text; ``FinishReason`` for its string; both serialise plainly."""

from __future__ import annotations

import json

import pytest

from cyllama_cffi.response import FinishReason, GenerationStats, Response


def test_finish_reason_is_a_string():
    assert [reason.value for reason in FinishReason] == ["stop", "length", "cancelled", "error"]
    for reason in FinishReason:
        assert isinstance(reason, str)
        assert reason == reason.value and reason.value == reason
        assert str(reason) == reason.value and f"{reason}" == reason.value and "%s" % reason == reason.value
        assert FinishReason(reason.value) is reason
        assert json.dumps(reason) == f'"{reason.value}"'
    assert FinishReason.STOP == "stop" and FinishReason.STOP != "length"
    assert str(FinishReason.STOP) == "stop"
    assert {"stop": 1}[FinishReason.STOP] == 1  # hashes like the string
    with pytest.raises(ValueError):
        FinishReason("timeout")


def test_response_behaves_like_its_text():
    response = Response("héllo wörld", finish_reason=FinishReason.LENGTH, model="tiny.gguf")
    assert str(response) == "héllo wörld"
    assert response == "héllo wörld" and "héllo wörld" == response
    assert response != "hello" and response == Response("héllo wörld")
    assert len(response) == 11
    assert "wörld" in response and "xyz" not in response
    assert response + "!" == "héllo wörld!" and "> " + response == "> héllo wörld"
    assert response + Response("?") == "héllo wörld?"
    assert type(response + "!") is str and type("> " + response) is str
    assert list(response) == list("héllo wörld")
    assert response[0] == "h" and response[-1] == "d" and response[:5] == "héllo"
    assert hash(response) == hash("héllo wörld")
    assert response in {"héllo wörld"} and "héllo wörld" in {response}
    assert f"{response}" == "héllo wörld" and "%s" % response == "héllo wörld"


def test_response_against_other_types():
    response = Response("1")
    assert response != 1 and response != b"1" and response != None  # noqa: E711
    with pytest.raises(TypeError):
        response + 1  # noqa: B018
    with pytest.raises(TypeError):
        1 + response  # noqa: B018
    with pytest.raises(TypeError):
        b"x" + response  # noqa: B018


def test_response_repr_shows_text_and_plain_reason():
    assert repr(Response("a'b", finish_reason=FinishReason.CANCELLED)) == \
        "Response(text=\"a'b\", finish_reason='cancelled')"
    assert repr(Response("")) == "Response(text='', finish_reason='stop')"


def test_response_repr_cuts_long_text_at_50_characters():
    assert repr(Response("x" * 50)) == f"Response(text='{'x' * 50}', finish_reason='stop')"
    assert repr(Response("é" * 51 + "tail")) == f"Response(text='{'é' * 50}...', finish_reason='stop')"


def test_response_defaults_and_positional_order():
    first = Response("x")
    assert first.stats is None and first.finish_reason == "stop" and first.model == ""
    stats = GenerationStats(1, 2, 0.5, 4.0)
    second = Response("y", stats, "length", "models/m.gguf")
    assert (second.stats, second.finish_reason, second.model) == (stats, "length", "models/m.gguf")
    with pytest.raises(AttributeError):
        first.extra = 1  # __slots__: a typo in an attribute name fails loudly


def test_generation_stats_positional_order_is_cyllamas():
    stats = GenerationStats(5, 3, 0.5, 6.0, 0.2, 0.3)
    assert (stats.prompt_tokens, stats.generated_tokens, stats.total_time, stats.tokens_per_second,
            stats.prompt_time, stats.generation_time) == (5, 3, 0.5, 6.0, 0.2, 0.3)
    assert GenerationStats(5, 3, 0.5, 6.0).prompt_time == 0.0 == GenerationStats(5, 3, 0.5, 6.0).generation_time


def test_to_dict_and_to_json_serialise_the_finish_reason_as_a_plain_string():
    stats = GenerationStats(prompt_tokens=5, generated_tokens=3, total_time=0.5, prompt_time=0.2,
                            generation_time=0.3, tokens_per_second=10.0)
    response = Response("Paris.", stats=stats, finish_reason=FinishReason.LENGTH, model="m.gguf")
    data = response.to_dict()
    assert data == {"text": "Paris.", "finish_reason": "length", "model": "m.gguf",
                    "stats": {"prompt_tokens": 5, "generated_tokens": 3, "total_time": 0.5, "tokens_per_second": 10.0,
                              "prompt_time": 0.2, "generation_time": 0.3}}
    assert list(data["stats"]) == ["prompt_tokens", "generated_tokens", "total_time", "tokens_per_second",
                                   "prompt_time", "generation_time"]
    assert type(data["finish_reason"]) is str
    text = response.to_json()
    assert '"finish_reason": "length"' in text and "FinishReason" not in text
    assert json.loads(text) == data
    assert response.to_json(sort_keys=True, indent=2).splitlines()[1] == '  "finish_reason": "length",'
    assert response.to_json(2) == json.dumps(data, indent=2)  # indent is the first parameter, as in cyllama
    assert json.loads(Response("x").to_json()) == {"text": "x", "finish_reason": "stop", "model": ""}  # no stats


def test_to_dict_leaves_stats_out_only_when_there_are_none():
    assert "stats" not in Response("x").to_dict()
    assert Response("x", GenerationStats()).to_dict()["stats"]["generated_tokens"] == 0


def test_generation_stats_defaults_and_dict():
    assert GenerationStats().to_dict() == {"prompt_tokens": 0, "generated_tokens": 0, "total_time": 0.0,
                                           "tokens_per_second": 0.0, "prompt_time": 0.0, "generation_time": 0.0}
    stats = GenerationStats(generated_tokens=2)
    copy = stats.to_dict()
    copy["generated_tokens"] = 99
    assert stats.generated_tokens == 2
