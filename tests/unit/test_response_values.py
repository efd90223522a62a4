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
        "Response(\"a'b\", finish_reason='cancelled')"
    assert repr(Response("")) == "Response('', finish_reason='stop')"


def test_response_defaults():
    first, second = Response("x"), Response("y")
    assert first.finish_reason == "stop" and first.model == ""
    assert first.stats == GenerationStats() and first.stats is not second.stats
    with pytest.raises(AttributeError):
        first.extra = 1  # __slots__: a typo in an attribute name fails loudly


def test_to_dict_and_to_json_serialise_the_finish_reason_as_a_plain_string():
    stats = GenerationStats(prompt_tokens=5, generated_tokens=3, total_time=0.5, prompt_time=0.2,
                            generation_time=0.3, tokens_per_second=10.0)
    response = Response("Paris.", stats=stats, finish_reason=FinishReason.LENGTH, model="m.gguf")
    data = response.to_dict()
    assert data == {"text": "Paris.", "finish_reason": "length", "model": "m.gguf",
                    "stats": {"prompt_tokens": 5, "generated_tokens": 3, "total_time": 0.5, "prompt_time": 0.2,
                              "generation_time": 0.3, "tokens_per_second": 10.0}}
    assert type(data["finish_reason"]) is str
    text = response.to_json()
    assert '"finish_reason": "length"' in text and "FinishReason" not in text
    assert json.loads(text) == data
    assert response.to_json(sort_keys=True, indent=2).splitlines()[1] == '  "finish_reason": "length",'
    assert json.loads(Response("x").to_json())["finish_reason"] == "stop"


def test_generation_stats_defaults_and_dict():
    assert GenerationStats().to_dict() == {"prompt_tokens": 0, "generated_tokens": 0, "total_time": 0.0,
                                           "prompt_time": 0.0, "generation_time": 0.0, "tokens_per_second": 0.0}
    stats = GenerationStats(generated_tokens=2)
    copy = stats.to_dict()
    copy["generated_tokens"] = 99
    assert stats.generated_tokens == 2
