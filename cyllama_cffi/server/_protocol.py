"""OpenAI request bodies to checked work orders, and OpenAI-shaped error bodies.

Pure Python (no llama.cpp): every field is checked here, before anything reaches the engine,
and a problem becomes an :class:`APIError` whose body is the one OpenAI sends
(``{"error": {"message", "type", "param", "code"}}``), so clients report it as they would
OpenAI's. The policy on fields:

* honoured: ``model`` (any name is accepted: the server has one model), ``max_tokens`` /
  ``max_completion_tokens``, ``temperature``, ``top_p``, ``frequency_penalty`` and
  ``presence_penalty`` (>= 0), ``stop``, ``seed``, ``stream``, ``stream_options.include_usage``,
  ``response_format`` (``text``, ``json_object``, ``json_schema``), ``n`` (1 only),
  ``logprobs`` (chat: ``true`` with ``top_logprobs`` 0 to 20; completions: 0 to 20),
  ``logit_bias`` (token ids to -100..100), and the llama.cpp extensions ``top_k``, ``min_p``,
  ``repeat_penalty``;
* OpenAI fields that are not built (tools, ``echo``, ``suffix``, ``best_of`` > 1, audio...)
  are a 400 naming the field, unless given with their "off" value (``false``, ``null``,
  ``[]``, ``1``);
* fields that only label a request (``user``, ``metadata``, ``store``, ``service_tier``...)
  and names OpenAI does not define are ignored, so clients that send extras still work.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .._logprobs import MAX_LOGPROBS

__all__ = ["APIError", "Completion", "parse_completion", "parse_chat", "parse_embeddings", "error_body"]

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_BIAS = 100.0  # OpenAI's range for a logit bias: -100 to 100


class APIError(Exception):
    """An HTTP error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type: str = "invalid_request_error", code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code
        self.headers = headers or {}

    @property
    def body(self) -> Dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> Dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, message, param)


@dataclass
class Completion:
    """A checked generation request: what to render or tokenize, and how to sample."""

    prompt: Any  # str, or a list of token ids (completions), or None (chat)
    messages: Optional[List[Dict[str, Any]]]
    max_tokens: Optional[int]  # None: until the slot is full
    sampling: Dict[str, Any] = field(default_factory=dict)  # GenerationConfig fields
    stop: List[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    response_format: Optional[Dict[str, Any]] = None  # the json_schema, {} for json_object
    model: Optional[str] = None
    logprobs: Optional[int] = None  # None: off; n: an entry per token with n alternatives


# Fields OpenAI defines that this server does not build, and the values that mean "off".
_NOT_BUILT: Dict[str, Tuple[Any, ...]] = {
    "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "parallel_tool_calls": (None, False, True),
    "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "web_search_options": (None,),
    "reasoning_effort": (None,),
}


def _not_built(body: Mapping[str, Any]) -> None:
    for name, off in _NOT_BUILT.items():
        value = body.get(name)
        if value is None or any(type(value) is type(o) and value == o for o in off if o is not None):
            continue
        raise bad(f"'{name}' is not supported by this server", name)


def _object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {_json_type(body)}")
    return body


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _number(body: Mapping[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"'{name}' must be a number, got {_json_type(value)}", name)
    if not low <= value <= high:
        raise bad(f"'{name}' must be between {low} and {high}, got {value}", name)
    return float(value)


def _integer(body: Mapping[str, Any], name: str, low: int, high: int) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{name}' must be an integer, got {_json_type(value)}", name)
    if not low <= value <= high:
        raise bad(f"'{name}' must be between {low} and {high}, got {value}", name)
    return value


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be a boolean, got {_json_type(value)}", name)
    return value


def _stop(body: Mapping[str, Any]) -> List[str]:
    value = body.get("stop")
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise bad("'stop' must be a string or an array of strings", "stop")
    if len(items) > MAX_STOP:
        raise bad(f"'stop' takes at most {MAX_STOP} sequences, got {len(items)}", "stop")
    if any(item == "" or "\0" in item for item in items):
        raise bad("'stop' sequences must be non-empty and contain no NUL character", "stop")
    return list(items)


def _response_format(body: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    value = body.get("response_format")
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise bad("'response_format' must be an object with a 'type'", "response_format")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise bad("'response_format.json_schema' must be an object", "response_format")
        schema = spec.get("schema", {})
        if not isinstance(schema, (dict, bool)):
            raise bad("'response_format.json_schema.schema' must be an object", "response_format")
        return schema  # type: ignore[return-value]
    raise bad(f"'response_format.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}",
              "response_format")


def _logit_bias(body: Mapping[str, Any]) -> Optional[Dict[int, float]]:
    """``{"token id": bias}`` as ``{id: bias}``; whether the ids are in the vocabulary is checked later."""
    value = body.get("logit_bias")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad(f"'logit_bias' must be an object mapping token ids to numbers, got {_json_type(value)}",
                  "logit_bias")
    biases: Dict[int, float] = {}
    for key, bias in value.items():
        if not re.fullmatch(r"[0-9]{1,10}", key):
            raise bad(f"'logit_bias' keys must be token ids (non-negative integers), got {key!r}", "logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -MAX_BIAS <= bias <= MAX_BIAS:
            raise bad(f"'logit_bias' values must be numbers from {-MAX_BIAS:g} to {MAX_BIAS:g}, got {bias!r} "
                      f"for token {key}", "logit_bias")
        biases[int(key)] = float(bias)
    return biases or None


def _common(body: Mapping[str, Any], max_tokens_default: Optional[int]) -> Completion:
    _not_built(body)
    n = _integer(body, "n", 1, 128)
    if n not in (None, 1):
        raise bad("'n' must be 1: this server generates one choice per request", "n")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad(f"'model' must be a string, got {_json_type(model)}", "model")
    max_tokens = _integer(body, "max_completion_tokens", 1, 2**31 - 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1, 2**31 - 1)
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(options, dict):
            raise bad("'stream_options' must be an object", "stream_options")
        include_usage = _flag(options, "include_usage")
    sampling: Dict[str, Any] = {
        "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0),
        "frequency_penalty": _number(body, "frequency_penalty", 0.0, 0.0, 2.0),
        "presence_penalty": _number(body, "presence_penalty", 0.0, 0.0, 2.0),
        "top_k": _integer(body, "top_k", 0, 2**31 - 1) or 0,
        "min_p": _number(body, "min_p", 0.0, 0.0, 1.0),
        "repeat_penalty": _number(body, "repeat_penalty", 1.0, 0.0, 10.0),
    }
    bias = _logit_bias(body)
    if bias:
        sampling["logit_bias"] = bias
    seed = _integer(body, "seed", -(2**63), 2**63 - 1)
    if seed is not None:
        sampling["seed"] = seed % 2**32 if seed % 2**32 != 0xFFFFFFFF else 0  # 0xFFFFFFFF means "random"
    return Completion(prompt=None, messages=None, max_tokens=max_tokens if max_tokens is not None else max_tokens_default,
                      sampling=sampling, stop=_stop(body), stream=stream, include_usage=include_usage,
                      response_format=_response_format(body), model=model)


def parse_completion(body: Any) -> Completion:
    """A ``/v1/completions`` body: ``prompt`` is a string, an array of one string, or token ids."""
    body = _object(body)
    if "prompt" not in body:
        raise bad("'prompt' is required", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if prompt == "":
            raise bad("'prompt' is empty", "prompt")
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise bad("'prompt' must be one prompt: this server takes one prompt per request", "prompt")
    else:
        raise bad("'prompt' must be a string or an array of token ids", "prompt")
    request = _common(body, 16)  # OpenAI's default for completions
    request.prompt = prompt
    if body.get("logprobs") is not False:  # false: off, as null
        request.logprobs = _integer(body, "logprobs", 0, MAX_LOGPROBS)
    return request


_ROLES = ("system", "developer", "user", "assistant", "tool")


def parse_chat(body: Any) -> Completion:
    """A ``/v1/chat/completions`` body; text content only (a string or text parts)."""
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty array", "messages")
    checked = []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad(f"{param} must be an object", param)
        role = message.get("role")
        if role not in _ROLES:
            raise bad(f"{param}.role must be one of {', '.join(_ROLES)}, got {role!r}", param)
        if message.get("tool_calls") or message.get("function_call"):
            raise bad(f"{param}: tool calls are not supported by this server", param)
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"{param}.content: only text parts are supported", param)
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise bad(f"{param}.content must be a string or an array of text parts", param)
        if "\0" in content:
            raise bad(f"{param}.content contains a NUL character", param)
        checked.append({"role": "system" if role == "developer" else role, "content": content})
    request = _common(body, None)
    request.messages = checked
    top = _integer(body, "top_logprobs", 0, MAX_LOGPROBS)
    if _flag(body, "logprobs"):
        request.logprobs = top or 0
    elif top:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return request


def parse_embeddings(body: Any) -> Tuple[List[str], str]:
    """A ``/v1/embeddings`` body: the texts, and ``encoding_format`` ("float" or "base64")."""
    body = _object(body)
    value = body.get("input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise bad("'input' must be a non-empty string or a non-empty array of non-empty strings", "input")
    if body.get("dimensions") is not None:
        raise bad("'dimensions' is not supported by this server", "dimensions")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise bad(f"'encoding_format' must be 'float' or 'base64', got {encoding!r}", "encoding_format")
    return texts, encoding
