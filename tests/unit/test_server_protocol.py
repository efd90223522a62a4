"""The server's pure parts: request checking (OpenAI's error shape) and the metrics text.

Neither needs the model, the compiled module, FastAPI or uvicorn.
"""

from __future__ import annotations

import pytest

from cyllama_cffi.server._metrics import Metrics
from cyllama_cffi.server._protocol import APIError, parse_chat, parse_completion, parse_embeddings

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def refused(parse, body) -> APIError:
    with pytest.raises(APIError) as caught:
        parse(body)
    assert caught.value.status == 400
    error = caught.value.body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    return caught.value


def test_a_chat_request_becomes_sampling_settings():
    order = parse_chat({**CHAT, "max_tokens": 5, "temperature": 0, "top_p": 0.5, "stop": "x", "seed": 3,
                        "stream": True, "stream_options": {"include_usage": True}})
    assert order.max_tokens == 5 and order.stop == ["x"] and order.stream and order.include_usage
    assert order.sampling["temperature"] == 0.0 and order.sampling["top_p"] == 0.5 and order.sampling["seed"] == 3
    assert order.sampling["top_k"] == 0 and order.sampling["min_p"] == 0.0  # plain OpenAI sampling
    assert order.messages == [{"role": "user", "content": "hi"}]


def test_max_completion_tokens_wins_and_defaults_differ_by_endpoint():
    assert parse_chat({**CHAT, "max_tokens": 5, "max_completion_tokens": 7}).max_tokens == 7
    assert parse_chat(CHAT).max_tokens is None  # the rest of the slot
    assert parse_completion({"prompt": "a"}).max_tokens == 16  # OpenAI's default


def test_text_parts_and_developer_messages():
    order = parse_chat({"messages": [{"role": "developer", "content": "be brief"},
                                     {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                  {"type": "text", "text": "b"}]}]})
    assert order.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    assert refused(parse_chat, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).param \
        == "messages[0]"


def test_response_formats():
    assert parse_chat({**CHAT, "response_format": {"type": "json_object"}}).response_format == {"type": "object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    order = parse_chat({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                                            "schema": schema}}})
    assert order.response_format == schema
    assert parse_chat({**CHAT, "response_format": {"type": "text"}}).response_format is None
    assert refused(parse_chat, {**CHAT, "response_format": {"type": "yaml"}}).param == "response_format"


@pytest.mark.parametrize("field, value", [
    ("logprobs", 1), ("top_logprobs", 2), ("top_logprobs", 21), ("tools", [{"type": "function"}]),
    ("logit_bias", []), ("logit_bias", {"x": 5}), ("logit_bias", {"-1": 5}), ("logit_bias", {"1": 101}),
    ("logit_bias", {"1": "5"}), ("logit_bias", {"1": True}), ("logit_bias", {"1": float("nan")}), ("n", 2), ("temperature", "hot"), ("temperature", 3), ("top_p", -0.1), ("max_tokens", 0),
    ("max_tokens", 1.5), ("stop", [1]), ("stop", ["a"] * 5), ("stream", "yes"), ("seed", True),
    ("frequency_penalty", -1), ("model", 3),
])
def test_bad_fields_are_refused_by_name(field, value):
    assert refused(parse_chat, {**CHAT, field: value}).param == field


def test_off_values_and_unknown_names_are_accepted():
    parse_chat({**CHAT, "logprobs": False, "tools": [], "n": 1, "user": "me", "frobnicate": {"x": 1}})
    parse_completion({"prompt": "a", "logprobs": None, "echo": False, "best_of": 1})


def test_logprobs_and_top_logprobs_for_chat():
    assert parse_chat(CHAT).logprobs is None
    assert parse_chat({**CHAT, "logprobs": False, "top_logprobs": 0}).logprobs is None
    assert parse_chat({**CHAT, "logprobs": True}).logprobs == 0  # the tokens' own log-probabilities only
    assert parse_chat({**CHAT, "logprobs": True, "top_logprobs": 20}).logprobs == 20
    assert "'logprobs': true" in refused(parse_chat, {**CHAT, "logprobs": False, "top_logprobs": 3}).message


def test_logprobs_for_completions_is_a_count():
    assert parse_completion({"prompt": "a"}).logprobs is None
    assert parse_completion({"prompt": "a", "logprobs": False}).logprobs is None
    assert parse_completion({"prompt": "a", "logprobs": 0}).logprobs == 0
    assert parse_completion({"prompt": "a", "logprobs": 5}).logprobs == 5
    for value in (21, -1, True, 2.5, "3"):
        assert refused(parse_completion, {"prompt": "a", "logprobs": value}).param == "logprobs"


def test_logit_bias_becomes_a_sampling_setting():
    order = parse_chat({**CHAT, "logit_bias": {"42": 100, "7": -100, "9": 0.5}})
    assert order.sampling["logit_bias"] == {42: 100.0, 7: -100.0, 9: 0.5}
    assert "logit_bias" not in parse_chat({**CHAT, "logit_bias": {}}).sampling
    assert "logit_bias" not in parse_completion({"prompt": "a", "logit_bias": None}).sampling
    error = refused(parse_completion, {"prompt": "a", "logit_bias": {"3": -100.5}})
    assert error.param == "logit_bias" and "-100 to 100" in error.message


def test_stream_options_need_a_stream():
    assert refused(parse_chat, {**CHAT, "stream_options": {"include_usage": True}}).param == "stream_options"


@pytest.mark.parametrize("body", [[], "text", None, {}, {"messages": []}, {"messages": [{"role": "robot",
                                                                                         "content": "x"}]}])
def test_malformed_chat_bodies(body):
    refused(parse_chat, body)


def test_completion_prompts():
    assert parse_completion({"prompt": ["one"]}).prompt == "one"
    assert parse_completion({"prompt": [1, 2, 3]}).prompt == [1, 2, 3]
    for prompt in ("", ["a", "b"], [True], {"a": 1}, None):
        assert refused(parse_completion, {"prompt": prompt}).param == "prompt"


def test_embedding_bodies():
    assert parse_embeddings({"input": "a"}) == (["a"], "float")
    assert parse_embeddings({"input": ["a", "b"], "encoding_format": "base64"}) == (["a", "b"], "base64")
    for body in ({"input": ""}, {"input": [1]}, {"input": "a", "dimensions": 8}, {"input": "a", "encoding_format": "x"}):
        refused(parse_embeddings, body)


def test_metrics_render_prometheus_text():
    metrics = Metrics(slots=4)
    metrics.request("/v1/completions", "stop")
    metrics.add(generated_tokens=3, cancels=1)
    metrics.set(slots_busy=2)
    metrics.first_token(0.2)
    text = metrics.render()
    assert 'cyllama_requests_total{endpoint="/v1/completions",outcome="stop"} 1' in text
    assert "cyllama_generated_tokens_total 3" in text and "cyllama_cancels_total 1" in text
    assert "cyllama_slots 4" in text and "cyllama_slots_busy 2" in text
    assert 'cyllama_time_to_first_token_seconds_bucket{le="0.1"} 0' in text
    assert 'cyllama_time_to_first_token_seconds_bucket{le="0.25"} 1' in text
    assert "cyllama_time_to_first_token_seconds_count 1" in text
    for line in text.splitlines():  # every sample line is "name{labels} value"
        assert line.startswith("#") or float(line.rpartition(" ")[2]) >= 0


def test_the_command_line_defaults_and_usage_errors(capsys):
    from cyllama_cffi.server import main
    from cyllama_cffi.server._main import build_parser

    args = build_parser().parse_args([])
    assert (args.model, args.host, args.port, args.parallel, args.prompt_budget, args.max_queue, args.api_key) == \
        (None, "127.0.0.1", 8000, 4, 16, 64, None)
    assert args.flash_attn == "off" and args.step_ms == 200
    assert build_parser().parse_args(["-fa", "auto"]).flash_attn == "auto"
    args = build_parser().parse_args(["m.gguf", "--port", "9", "-np", "8", "-c", "4096", "--api-key", "k"])
    assert (args.model, args.port, args.parallel, args.ctx_size, args.api_key) == ("m.gguf", 9, 8, 4096, "k")
    assert main(["--help"]) == 0
    assert main(["--port", "not-a-port"]) == 2
    assert "usage:" in capsys.readouterr().err
