"""The OpenAI-compatible server, end to end: a real uvicorn process on the default model.

What is proven: the official ``openai`` client works against it (chat and completions,
streamed and not, JSON modes, ``include_usage``); a client that disconnects during its prompt
or its tokens frees its slot and its work stops (seen in ``/metrics``); a full queue is a 429
with Retry-After, a wrong key a 401, bad input a 400 in OpenAI's error shape, a huge body a
413; SIGTERM ends running streams cleanly and the process within 2 s; under a bounded load
with random disconnects no request is lost or wedged and every answer equals its solo answer;
a next chat turn decodes only its new tokens and answers as a fresh server does.

The solo reference is the same server with nothing else running (one request at a time):
the server reads a prompt in even chunks of at most ``--prompt-budget`` tokens whatever else
runs, and each step is one micro-batch, so a request's sums do not depend on its neighbours;
an ``LLM`` reads prompts in other chunks, with flash attention, whose last bits differ
(docs/state.md).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
LONG_PROMPT = "The history of the world, told in great detail. " * 300  # ~3,000 tokens
END_OF_TURN = (0, 2, 4)  # the default model's end-of-generation tokens
COUNTING = "Count from one to one thousand: 1, 2, 3, 4, 5, 6, 7, 8,"  # goes on without an end-of-text
STARTUP = 120.0  # seconds a server may take to load on a busy machine
PATIENCE = 120.0  # seconds any one wait may take


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``python -m cyllama_cffi.server`` in a child process, stopped at the end."""

    def __init__(self, model_path: Path, *args: str, key: Optional[str] = None,
                 launcher: Optional[List[str]] = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = key
        self.log = tempfile.TemporaryFile()
        # One thread: these tests measure behaviour, not speed, and on a shared runner a second
        # decoding thread that waits for a descheduled first one only slows everything down.
        launcher = launcher or ["-m", "cyllama_cffi.server", str(model_path)]
        command = [sys.executable, *launcher, "--port", str(self.port), "--threads", "1", *args]
        if key:
            command += ["--api-key", key]
        self.proc = subprocess.Popen(command, cwd=str(REPO), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the server did not answer /health in {STARTUP} s:\n{self.output()}")
            time.sleep(0.1)  # polling for the port to open

    @property
    def headers(self) -> Dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")[-4000:]

    def post(self, path: str, body: dict, timeout: float = PATIENCE) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self.headers, timeout=timeout)

    def metrics(self) -> Dict[str, float]:
        text = httpx.get(self.url + "/metrics", headers=self.headers, timeout=PATIENCE).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name.replace("cyllama_", "", 1)] = float(value)
        return values

    def wait_for(self, condition, what: str, timeout: float = PATIENCE) -> Dict[str, float]:
        """Poll /metrics until ``condition(metrics)`` holds; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            values = self.metrics()
            if condition(values):
                return values
            if time.monotonic() > deadline:
                pytest.fail(f"waited {timeout} s for {what}; metrics: {values}")
            time.sleep(0.05)

    def settled(self) -> Dict[str, float]:
        """Metrics once nothing runs or waits, and the token counters stand still."""
        previous = None
        deadline = time.monotonic() + PATIENCE
        while True:
            values = self.wait_for(lambda m: m["slots_busy"] == 0 and m["queue_depth"] == 0, "idle slots")
            counters = (values["generated_tokens_total"], values["prompt_tokens_decoded_total"], values["steps_total"])
            if counters == previous:
                return values
            if time.monotonic() > deadline:
                pytest.fail(f"the counters kept moving: {values}")
            previous = counters
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server(model_path):
    # Eight slots of 4096 cells: a request runs beside up to seven others.
    running = Server(model_path, "--parallel", "8", "--ctx-size", "32768", "--max-queue", "256")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def small(model_path):
    """One slot, one place in the queue, an API key: for 401, 429 and SIGTERM."""
    running = Server(model_path, "--parallel", "1", "--ctx-size", "4096", "--max-queue", "1", key="sekrit")
    yield running
    running.stop()


def openai_client(server: Server):
    if platform.python_implementation() == "PyPy" and sys.version_info < (3, 10):
        # openai needs jiter, a Rust extension with no wheel for PyPy 3.9 (pyproject.toml does
        # not install it there); the same requests are checked with httpx in the other tests.
        pytest.skip("the openai client cannot be installed on PyPy 3.9 (jiter has no pp39 wheel)")
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.key or "unused", max_retries=0,
                         timeout=PATIENCE)


def raw_request(server: Server, path: str, body: dict) -> socket.socket:
    """An HTTP request sent on a socket we can close whenever we like (a client that leaves)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    auth = "".join(f"{k}: {v}\r\n" for k, v in server.headers.items())
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


# -- the openai client ------------------------------------------------------------------------

def test_completions_with_the_openai_client(server):
    client = openai_client(server)
    plain = client.completions.create(model="any", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert plain.choices[0].text and plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens <= 8 and plain.usage.prompt_tokens > 0
    pieces = [c.choices[0].text for c in client.completions.create(
        model="any", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == plain.choices[0].text


def test_chat_with_the_openai_client(server):
    client = openai_client(server)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    plain = client.chat.completions.create(model="any", messages=messages, max_tokens=12, temperature=0)
    answer = plain.choices[0].message.content
    assert answer and plain.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="any", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_json_modes_give_valid_json(server):
    import jsonschema

    client = openai_client(server)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Invent a person."}], max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    reply = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": 'Reply with the JSON object {"ok": true}.'}],
        max_tokens=64, temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


# -- log-probabilities and logit bias -------------------------------------------------------------

def assert_same_chat_entries(got, expected):
    assert [e.token for e in got] == [e.token for e in expected]
    for mine, theirs in zip(got, expected):
        # The repeated prompt reuses the first request's cells but its last two tokens: with
        # flash attention off (the default) it gets the first request's logits, bit for bit.
        assert mine.logprob == theirs.logprob
        assert [t.token for t in mine.top_logprobs] == [t.token for t in theirs.top_logprobs]


def test_chat_logprobs_with_the_openai_client_streamed_and_not(server):
    client = openai_client(server)
    from openai.types.chat.chat_completion_token_logprob import ChatCompletionTokenLogprob

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    # A stop sequence met in the answer: its tokens' text is held back, their entries still come.
    request = dict(model="any", messages=messages, max_tokens=16, temperature=0, logprobs=True, top_logprobs=3,
                   stop=[" la "])
    plain = client.chat.completions.create(**request)
    choice = plain.choices[0]
    entries = choice.logprobs.content
    assert all(isinstance(e, ChatCompletionTokenLogprob) for e in entries)
    assert len(entries) == plain.usage.completion_tokens > 0  # every generated token, none for the end
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token for e in entries)  # greedy
    assert all(e.logprob == e.top_logprobs[0].logprob <= 0 for e in entries)
    joined = bytes(b for e in entries for b in e.bytes).decode()
    assert choice.finish_reason == "stop" and " la " not in choice.message.content
    assert joined.startswith(choice.message.content) and " la " in joined[len(choice.message.content):]
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].logprobs is None  # the role chunk
    streamed = [e for c in chunks[1:] if c.choices for e in c.choices[0].logprobs.content]
    assert_same_chat_entries(streamed, entries)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].usage.completion_tokens == len(streamed)
    # no top_logprobs: the tokens' own log-probabilities only
    bare = client.chat.completions.create(**{**request, "top_logprobs": None, "max_tokens": 4, "stop": None})
    assert bare.choices[0].logprobs.content and all(e.top_logprobs == [] for e in bare.choices[0].logprobs.content)
    assert client.chat.completions.create(**{**request, "logprobs": False, "top_logprobs": None}).choices[0] \
        .logprobs is None


def test_completions_logprobs_streamed_and_not(server, model):
    client = openai_client(server)
    prompt = "The capital of France is"
    request = dict(model="any", prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
    plain = client.completions.create(**request)
    logprobs = plain.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) \
        == len(logprobs.text_offset) == plain.usage.completion_tokens
    assert "".join(logprobs.tokens) == plain.choices[0].text
    # offsets count from the prompt's start, as OpenAI's do
    assert logprobs.text_offset == [len(prompt) + len("".join(logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        # the 2 most likely, and the token (among them: greedy)
        assert len(top) == 2 and top[token] == value == max(top.values())
    chunks = [c.choices[0] for c in client.completions.create(**request, stream=True) if c.choices]
    joined = {key: [v for c in chunks for v in getattr(c.logprobs, key)] for key in ("tokens", "text_offset")}
    assert joined == {"tokens": logprobs.tokens, "text_offset": logprobs.text_offset}
    streamed = [v for c in chunks for v in c.logprobs.token_logprobs]
    assert streamed == logprobs.token_logprobs  # the repeated prompt's logits, bit for bit
    assert all(c.logprobs.tokens == [] or "".join(c.logprobs.tokens) == c.text for c in chunks)
    ids = client.completions.create(**{**request, "prompt": model.vocab.tokenize(prompt, add_special=False)})
    assert ids.choices[0].logprobs.text_offset[0] == len(prompt)  # a prompt of token ids counts as its text


def test_logit_bias_forces_and_bans_tokens(server, model):
    client = openai_client(server)
    prompt = "The capital of France is"
    london = model.vocab.tokenize(" London", add_special=False)[0]
    paris = model.vocab.tokenize(" Paris", add_special=False)[0]
    request = dict(model="any", prompt=prompt, max_tokens=3, temperature=0)
    assert client.completions.create(**request).choices[0].text.startswith(" Paris")
    forced = client.completions.create(**request, logit_bias={str(london): 100})
    assert forced.choices[0].text == " London" * 3
    banned = client.completions.create(**request, logit_bias={str(paris): -100}, logprobs=1)
    assert " Paris" not in banned.choices[0].text
    # the log-probabilities describe the model, not the bias: " Paris" is still what it finds most likely
    first = banned.choices[0].logprobs.top_logprobs[0]
    assert first[" Paris"] == max(first.values()) and banned.choices[0].logprobs.tokens[0] != " Paris"
    chat = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                          temperature=0, logit_bias={str(london): 100})
    assert chat.choices[0].message.content == " London" * 2


@pytest.fixture(scope="module")
def token_paced(model_path):
    """Steps paced by the token budget alone (16, the default), not also by time (--step-ms)."""
    running = Server(model_path, "--parallel", "2", "--ctx-size", "8192", "--step-ms", "0")
    yield running
    running.stop()


def test_running_streams_keep_flowing_while_a_long_prompt_is_read(token_paced):
    """Fair steps: a step reads at most --prompt-budget prompt tokens (16) beside the streams'
    tokens, so a ~1,000-token prompt is read over many steps, each giving the running stream
    a token; read in one step, the stream would get none while it is read."""
    server = token_paced
    arrivals: List[float] = []
    with httpx.Client(timeout=PATIENCE, headers=server.headers) as client:
        with client.stream("POST", server.url + "/v1/completions",
                           json={"prompt": COUNTING, "max_tokens": 3000, "stream": True, "temperature": 0}) as stream:
            lines = stream.iter_lines()
            while len(arrivals) < 3:
                if next(lines).startswith("data: {"):
                    arrivals.append(time.perf_counter())
            long = concurrent.futures.ThreadPoolExecutor(1).submit(
                server.post, "/v1/completions", {"prompt": LONG_PROMPT[:len(LONG_PROMPT) // 3], "max_tokens": 1})
            sent = time.perf_counter()
            while not long.done():
                if next(lines).startswith("data: {"):
                    arrivals.append(time.perf_counter())
            answered = time.perf_counter()
    usage = long.result().json()["usage"]
    assert usage["prompt_tokens"] > 900
    during = sum(sent < t < answered for t in arrivals)
    assert during >= usage["prompt_tokens"] // 16 - 1, (during, usage)


# -- clients that leave -------------------------------------------------------------------------

def test_disconnect_during_the_prompt_frees_the_slot(server):
    for stream in (False, True):
        before = server.settled()
        sock = raw_request(server, "/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 8, "stream": stream})
        server.wait_for(lambda m: m["prompt_tokens_decoded_total"] > before["prompt_tokens_decoded_total"],
                        "the prompt to start")
        sock.close()
        after = server.settled()
        assert after["cancels_total"] == before["cancels_total"] + 1
        assert after["generated_tokens_total"] == before["generated_tokens_total"]  # it never got to its tokens
        decoded = after["prompt_tokens_decoded_total"] - before["prompt_tokens_decoded_total"]
        prompt = after["prompt_tokens_total"] - before["prompt_tokens_total"]
        assert 0 < decoded < prompt  # the prompt's reading stopped part way


def test_disconnect_during_the_tokens_frees_the_slot(server):
    for stream in (False, True):
        before = server.settled()
        sock = raw_request(server, "/v1/completions", {"prompt": COUNTING, "max_tokens": 3000, "stream": stream,
                                                       "temperature": 0})
        server.wait_for(lambda m: m["generated_tokens_total"] >= before["generated_tokens_total"] + 3,
                        "tokens to come")
        sock.close()
        after = server.settled()
        assert after["cancels_total"] == before["cancels_total"] + 1
        assert 3 <= after["generated_tokens_total"] - before["generated_tokens_total"] < 3000


# -- refusals -------------------------------------------------------------------------------------

def assert_error(response: httpx.Response, status: int, param: Optional[str] = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_bad_requests_get_openai_errors(server):
    url = server.url + "/v1/chat/completions"
    assert_error(httpx.post(url, content=b"{not json", timeout=PATIENCE), 400)
    assert_error(httpx.post(url, content=b"[1, 2]", timeout=PATIENCE), 400)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert_error(server.post("/v1/chat/completions", {**chat, "temperature": "hot"}), 400, "temperature")
    assert_error(server.post("/v1/chat/completions", {**chat, "max_tokens": -1}), 400, "max_tokens")
    assert_error(server.post("/v1/chat/completions", {**chat, "stop": [1]}), 400, "stop")
    assert_error(server.post("/v1/chat/completions", {"messages": "hi"}), 400, "messages")
    error = assert_error(server.post("/v1/chat/completions", {**chat, "top_logprobs": 2}), 400, "top_logprobs")
    assert error["type"] == "invalid_request_error" and error["code"] is None
    assert_error(server.post("/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 21}), 400,
                 "top_logprobs")
    assert_error(server.post("/v1/chat/completions", {**chat, "logprobs": 2}), 400, "logprobs")
    assert_error(server.post("/v1/completions", {"prompt": "hi", "logprobs": 21}), 400, "logprobs")
    for bias in ({"999999999": 5}, {"12": 150}, {"twelve": 1}, [[12, 1]]):
        assert_error(server.post("/v1/completions", {"prompt": "hi", "logit_bias": bias}), 400, "logit_bias")
    assert_error(server.post("/v1/chat/completions", {**chat, "n": 2}), 400, "n")
    assert_error(server.post("/v1/chat/completions", {**chat, "tools": [{"type": "function"}]}), 400, "tools")
    # "off" values of fields that are not built, and names OpenAI does not define, are accepted
    assert server.post("/v1/chat/completions", {**chat, "logprobs": False, "frobnicate": 1}).status_code == 200
    error = assert_error(server.post("/v1/completions", {"prompt": "word " * 5000}), 400, "prompt")
    assert "5001 tokens" in error["message"] and "4096" in error["message"]
    huge = b'{"prompt": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    assert_error(httpx.post(server.url + "/v1/completions", content=huge, timeout=PATIENCE), 413)
    metrics = server.settled()
    assert metrics["slots_busy"] == 0


def test_models_health_and_embeddings(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    client = openai_client(server)
    result = client.embeddings.create(model="any", input=["hello", "world"])
    assert len(result.data) == 2 and len(result.data[0].embedding) > 100
    assert abs(sum(x * x for x in result.data[0].embedding) - 1.0) < 1e-3


# -- next turns -----------------------------------------------------------------------------------

def test_a_next_turn_decodes_only_its_new_tokens(server, small):
    first = [{"role": "user", "content": "What is the capital of France?"}]
    body = {"messages": first, "max_tokens": 16, "temperature": 0}
    reply = server.post("/v1/chat/completions", body).json()
    turn = first + [reply["choices"][0]["message"], {"role": "user", "content": "And of Germany?"}]
    before = server.settled()
    second = server.post("/v1/chat/completions", {**body, "messages": turn}).json()
    after = server.settled()
    usage = second["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= reply["usage"]["prompt_tokens"]
    decoded = after["prompt_tokens_decoded_total"] - before["prompt_tokens_decoded_total"]
    assert decoded == usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
    # a fresh server (nothing cached) gives the same answers
    assert small.post("/v1/chat/completions", body).json()["choices"] == reply["choices"]
    fresh = small.post("/v1/chat/completions", {**body, "messages": turn}).json()
    assert fresh["choices"] == second["choices"]


# -- load -----------------------------------------------------------------------------------------

LOAD_PROMPTS = ["Once upon a time,", "The capital of France is", "def fibonacci(n):", "List three colors:",
                "Water boils at", "My favourite food is", "In 1492, Columbus", "The quick brown fox jumps over"]


def test_a_bounded_load_loses_nothing_and_matches_solo_answers(server):
    n_requests = int(os.environ.get("CYLLAMA_SERVER_LOAD", "200"))
    rng = random.Random(7)
    orders = [(rng.choice(LOAD_PROMPTS), rng.choice((2, 16)), rng.random() < 0.2) for _ in range(n_requests)]

    def body(prompt: str, max_tokens: int) -> dict:
        return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}

    solo = {}  # the same server, one request at a time
    for prompt, max_tokens, _ in orders:
        if (prompt, max_tokens) not in solo:
            solo[prompt, max_tokens] = server.post("/v1/completions", body(prompt, max_tokens)).json()
    before = server.settled()

    def run(order):
        prompt, max_tokens, leave = order
        if leave:
            sock = raw_request(server, "/v1/completions", {**body(prompt, max_tokens), "stream": True})
            sock.recv(1)  # the response has started: then go away
            sock.close()
            return None
        with httpx.Client(timeout=PATIENCE) as client:
            with client.stream("POST", server.url + "/v1/completions",
                               json={**body(prompt, max_tokens), "stream": True}) as response:
                assert response.status_code == 200
                lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        return "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["choices"][0]["finish_reason"]

    deadline = time.monotonic() + 600
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(run, order) for order in orders]
        results = [f.result(timeout=max(1.0, deadline - time.monotonic())) for f in futures]
    for order, result in zip(orders, results):
        if result is not None:
            expected = solo[order[0], order[1]]["choices"][0]
            assert result == (expected["text"], expected["finish_reason"]), order
    after = server.settled()
    answered = sum(n for name, n in after.items() if name.startswith("requests_total{endpoint=\"/v1/completions\""))
    answered -= sum(n for name, n in before.items() if name.startswith("requests_total{endpoint=\"/v1/completions\""))
    assert answered == n_requests  # every request reached an outcome (a disconnect counts too)
    assert after["slots_busy"] == 0 and after["queue_depth"] == 0


# -- the small server: keys, a full queue, SIGTERM (last: it ends the server) ------------------------

def test_a_wrong_key_is_401_and_health_stays_open(small):
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
        response = httpx.post(small.url + "/v1/chat/completions", json=chat, headers=headers, timeout=PATIENCE)
        assert_error(response, 401)
    assert httpx.get(small.url + "/v1/models").status_code == 401
    assert httpx.get(small.url + "/health").status_code == 200
    assert small.post("/v1/chat/completions", chat).status_code == 200


def test_a_full_queue_is_429_with_retry_after(small):
    before = small.settled()
    running = raw_request(small, "/v1/completions", {"prompt": COUNTING, "max_tokens": 3000, "stream": True})
    small.wait_for(lambda m: m["slots_busy"] == 1, "the slot to fill")
    waiting = raw_request(small, "/v1/completions", {"prompt": COUNTING, "max_tokens": 3000})
    small.wait_for(lambda m: m["queue_depth"] == 1, "the queue to fill")
    response = small.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})
    error = assert_error(response, 429)
    assert error["type"] == "rate_limit_error" and int(response.headers["retry-after"]) >= 1
    waiting.close()
    running.close()
    after = small.settled()
    assert after["cancels_total"] == before["cancels_total"] + 2


def test_sigterm_ends_the_streams_and_the_process_within_2s(small):
    small.wait_for(lambda m: m["slots_busy"] == 0, "an idle server")
    lines: Dict[int, List[str]] = {0: [], 1: []}  # the running request, the one in the queue
    started = threading.Event()

    def read(index: int) -> None:
        # End-of-turn tokens banned: the answers can only end by the shutdown (what the slot
        # holds from earlier tests could otherwise steer greedy decoding to an early end).
        body = {"messages": [{"role": "user", "content": COUNTING}], "max_tokens": 3000, "stream": True,
                "logit_bias": {str(token): -100 for token in END_OF_TURN}}
        with httpx.Client(timeout=PATIENCE) as client:
            with client.stream("POST", small.url + "/v1/chat/completions", json=body,
                               headers=small.headers) as response:
                for line in response.iter_lines():
                    if line:
                        lines[index].append(line)
                        if index == 0 and len(lines[0]) >= 3:
                            started.set()

    readers = [threading.Thread(target=read, args=(i,)) for i in (0, 1)]
    readers[0].start()
    assert started.wait(PATIENCE)
    readers[1].start()
    small.wait_for(lambda m: m["queue_depth"] == 1, "the second stream to wait")
    t0 = time.monotonic()
    small.proc.send_signal(signal.SIGTERM)
    small.proc.wait(PATIENCE)
    elapsed = time.monotonic() - t0
    for reader in readers:
        reader.join(PATIENCE)
    assert elapsed < 2.0, f"exited after {elapsed:.2f} s:\n{small.output()}"
    # uvicorn re-raises the signal once it has shut down, so the exit is SIGTERM's own
    assert small.proc.returncode in (0, -signal.SIGTERM), small.output()
    assert "Traceback" not in small.output()
    for index in (0, 1):
        assert lines[index][-1] == "data: [DONE]", lines[index][-3:]
        final = json.loads(lines[index][-2][6:])
        assert final["choices"][0]["finish_reason"] == "cancelled"


def test_the_cli_serve_subcommand_runs_the_same_server(model_path):
    # Global options before "serve" become the server's own (here: the model and the context).
    running = Server(model_path, "--parallel", "1",
                     launcher=["-m", "cyllama_cffi", "--model", str(model_path), "--ctx-size", "1024", "serve"])
    try:
        models = httpx.get(running.url + "/v1/models", timeout=PATIENCE).json()
        assert [entry["id"] for entry in models["data"]] == [Path(model_path).stem]
        answer = running.post("/v1/completions", {"prompt": COUNTING, "max_tokens": 4, "temperature": 0})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
        running.proc.send_signal(signal.SIGTERM)
        running.proc.wait(PATIENCE)
        assert running.proc.returncode is not None
    finally:
        running.stop()


def test_events_of_one_step_wake_the_event_loop_once():
    """A step posts an event for every running request; the loop is woken for the first only
    (each wake-up is a self-pipe write and a loop pass, CPU the decoding threads need)."""
    import asyncio

    from cyllama_cffi.server._app import _Mailbox

    async def scenario():
        loop = asyncio.get_running_loop()
        wakeups = []
        real = loop.call_soon_threadsafe

        def counting(callback, *args):
            wakeups.append(callback)
            return real(callback, *args)

        loop.call_soon_threadsafe = counting
        mailbox = _Mailbox(loop)
        queues = [asyncio.Queue() for _ in range(8)]
        poster = threading.Thread(target=lambda: [mailbox.post(q, ("text", str(i))) for i, q in enumerate(queues)])
        poster.start()
        poster.join()  # the loop is busy here: all eight events wait in the box
        got = [await asyncio.wait_for(q.get(), 5) for q in queues]
        mailbox.post(queues[0], ("done", None))  # an empty box wakes the loop again
        last = await asyncio.wait_for(queues[0].get(), 5)
        return wakeups, got, last

    wakeups, got, last = asyncio.run(scenario())
    assert got == [("text", str(i)) for i in range(8)]
    assert last == ("done", None)
    assert len(wakeups) == 2


def test_an_embedding_request_leaves_no_openmp_pool_on_its_worker_thread(model_path):
    """The handler's worker thread outlives the request; the pool its decode made must not
    (idle workers beside the scheduler's own pool make libgomp sleep at ggml's barriers)."""
    from test_openmp_pool import native_threads, wait_until_gone

    from cyllama_cffi.server import create_app

    import numpy  # noqa: F401  (its BLAS starts threads of its own when first imported)

    if "libgomp" not in Path("/proc/self/maps").read_text():
        pytest.skip("this build of ggml-cpu has no OpenMP runtime (GGML_OPENMP off)")
    state = create_app(model_path, parallel=1, ctx_size=512, n_threads=3).state.server
    state.scheduler.start()  # as the app's lifespan does; close() stops it
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as worker:  # stays alive, as the server's do
            before = native_threads()
            vectors, n_tokens = worker.submit(state.embed, ["a first text", "and a second one"]).result()
            assert vectors.shape[0] == 2 and n_tokens > 0
            left = wait_until_gone(native_threads() - before)
            assert left == set(), [Path(f"/proc/self/task/{tid}/comm").read_text().strip() for tid in left]
    finally:
        state.close()
