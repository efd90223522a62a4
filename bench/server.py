"""OpenAI-compatible servers under concurrent streaming clients: ``cyllama_cffi.server`` against
native ``llama-server`` and llama-cpp-python's server, on the same model and llama.cpp.

    python bench/server.py --llama-cpp-python PYTHON                 # throughput, all three servers
    python bench/server.py --servers llama-server,llama-cpp-python --llama-cpp-python PYTHON
    python bench/server.py --scenario fair --servers cyllama_cffi,llama-server

Every server runs as a subprocess on a free port of 127.0.0.1, a fresh process for each round,
the servers in rotating order (each leads a round in turn); the script waits for ``/health``
(or ``/v1/models`` where there is no ``/health``) and sends one short warm-up request first.
Each server gets the same slots and the same context per slot: ``--ctx-size`` and llama-server's
``-c`` are the total, split among the slots (llama.cpp's split KV cache, which llama-server is
told to use: it would choose it anyway for an explicit slot count); llama-cpp-python serves one
request at a time, with one slot's context. Everything else is each server's default (for
llama-server: batches of 2048 tokens, micro-batches of 512, its prompt cache in RAM; for
cyllama_cffi: flash attention off, 16 prompt tokens a step paced to 200 ms). All run 2 threads
(``--threads``); llama-server and llama-cpp-python run flash attention as llama.cpp decides it
on a CPU (on; llama-cpp-python is told so). ``--command
NAME=TEMPLATE`` adds or replaces a server (see ``SERVERS`` for the placeholders).

Throughput (``--scenario throughput``, the default): C clients at once (``--clients``, default
1, 4 and 8) each stream one ``/v1/completions`` request (``stream: true``, ``temperature: 0``,
``max_tokens`` 64) of its own 32-token prompt of random vocabulary pieces, from which greedy
decoding rambles on rather than ending its turn; a server with 8 slots. The generated tokens
are counted from the stream (the usage or timings a server reports at the end, else the text
chunks), so a stream that ended early at EOS counts what it generated; such streams are
listed. Reported per server and client count: generated tokens per second over all streams
(from the first request sent to the last stream's end), time to first token p50/p99 pooled over
the rounds; then the first server of ``--servers`` against each other one: the geometric mean of
the per-round ratios of tokens/s, its 95 % interval and range, and the same for TTFT p50.

Fairness (``--scenario fair``): 5 slots of ``--long-tokens + 512`` cells. Four streams generate
(long ``max_tokens``); once each has a few tokens, a ``--long-tokens`` prompt arrives. Reported:
the four streams' gaps between tokens (chunk arrivals) that overlap the long prompt's read, p50,
p99 and max, pooled over rounds, against their gap before it; the long prompt's time to first
token against its solo prefill (the same prompt, same length, alone on the same fresh server,
measured first). Servers that serve one request at a time are left out of this scenario (the
long prompt would wait for the streams to end). Every prompt starts with its own request number,
so no server can reuse a cached prefix of an earlier one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cyllama_cffi.server._defaults import DEFAULT_PROMPT_BUDGET  # noqa: E402

from bench.latency_stats import (format_ratio, gaps_before, gaps_in_window, geometric_mean_interval,  # noqa: E402
                                 percentile, rotated)

# Command templates. Placeholders: {python} (this interpreter), {llama_server}, {lcpp_python},
# {model}, {port}, {parallel} (slots), {ctx_total} (cells in all), {ctx_slot} (cells a slot),
# {threads}, {budget} (prompt tokens a step reads besides the generating slots' tokens).
SERVERS: Dict[str, str] = {
    "cyllama_cffi": ("{python} -m cyllama_cffi.server {model} --host 127.0.0.1 --port {port} --parallel {parallel} "
                     "--ctx-size {ctx_total} --prompt-budget {budget}"),
    "llama-server": ("{llama_server} -m {model} --host 127.0.0.1 --port {port} -np {parallel} -c {ctx_total} "
                     "-t {threads} -tb {threads} --no-kv-unified"),
    "llama-cpp-python": ("{lcpp_python} -m llama_cpp.server --model {model} --host 127.0.0.1 --port {port} "
                         "--n_ctx {ctx_slot} --n_threads {threads} --n_threads_batch {threads} --flash_attn True "
                         # its default True ends a running stream when the next request arrives
                         "--interrupt_requests False"),
}
ONE_AT_A_TIME = {"llama-cpp-python"}  # servers that run one request at a time
DEFAULT_SERVERS = "cyllama_cffi,llama-server,llama-cpp-python"

THROUGHPUT_SLOTS, THROUGHPUT_SLOT_CTX = 8, 512
FAIR_SLOTS, FAIR_STREAMS, SETTLE_CHUNKS = 5, 4, 4
PROMPT_TOKENS, MAX_TOKENS, LONG_MAX_TOKENS = 32, 64, 4
LONG_UNIT = "The history of the river towns, told street by street and year by year. "


# -- arguments ---------------------------------------------------------------------------------------

def int_list(text: str) -> List[int]:
    """``"1,4,8"`` -> ``[1, 4, 8]``; each at least 1, no repeats."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1 or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct integers >= 1, got {text!r}")
    return values


def command_entry(text: str) -> Tuple[str, str]:
    """``NAME=TEMPLATE`` -> ``(NAME, TEMPLATE)``."""
    name, sep, template = text.partition("=")
    if not sep or not name.strip() or not template.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=TEMPLATE, got {text!r}")
    return name.strip(), template.strip()


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=("throughput", "fair"), default="throughput")
    parser.add_argument("--servers", default=DEFAULT_SERVERS,
                        help=f"comma-separated, the first compared with each other one (default {DEFAULT_SERVERS})")
    parser.add_argument("--command", action="append", type=command_entry, default=[], metavar="NAME=TEMPLATE",
                        help="add or replace a server's command line (placeholders: see SERVERS in this file)")
    parser.add_argument("--model", help="GGUF (default: the default model)")
    parser.add_argument("--llama-server", help="the llama-server binary (default: the cached native build's)")
    parser.add_argument("--llama-cpp-python", metavar="PYTHON", help="an interpreter with llama-cpp-python[server]")
    parser.add_argument("--rounds", type=int, default=None, help="fresh processes per server (default 8; fair: 3)")
    parser.add_argument("--clients", type=int_list, default=[1, 4, 8], help="concurrent streams (default 1,4,8)")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--ignore-eos", action="store_true",
                        help="also send ignore_eos (llama-server's and perhaps others'; a server that ignores it may stop early)")
    parser.add_argument("--long-tokens", type=int, default=4000, help="the fair scenario's long prompt")
    parser.add_argument("--prompt-budget", type=int, default=DEFAULT_PROMPT_BUDGET,
                        help="{budget} in a command template (default: the server's own default)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds a server may take to start")
    parser.add_argument("--json", help="write every measurement here")
    args = parser.parse_args(argv)
    args.commands = dict(SERVERS)
    args.commands.update(args.command)
    args.servers = [name.strip() for name in args.servers.split(",") if name.strip()]
    unknown = [name for name in args.servers if name not in args.commands]
    if unknown:
        parser.error(f"unknown server(s) {unknown}; known: {sorted(args.commands)} (or add one with --command)")
    if not args.servers or len(set(args.servers)) != len(args.servers):
        parser.error("--servers needs distinct names")
    if args.scenario == "fair":
        args.servers = [name for name in args.servers if name not in ONE_AT_A_TIME]
        if not args.servers:
            parser.error("the fair scenario needs a server that runs several requests at once")
    if "llama-cpp-python" in args.servers and "{lcpp_python}" in args.commands["llama-cpp-python"] \
            and not args.llama_cpp_python:
        parser.error("llama-cpp-python needs --llama-cpp-python PYTHON (or leave it out of --servers)")
    if args.rounds is None:
        args.rounds = 3 if args.scenario == "fair" else 8
    for name in ("rounds", "max_tokens", "threads", "prompt_budget"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.long_tokens < 16:
        parser.error("--long-tokens must be >= 16")
    return args


def server_command(template: str, **values: Any) -> List[str]:
    """The argv of a template filled with ``values`` (each quoted, so paths may hold spaces)."""
    return shlex.split(template.format(**{k: shlex.quote(str(v)) for k, v in values.items()}))


# -- server-sent events --------------------------------------------------------------------------------

DONE = "[DONE]"


def parse_sse_line(line: str) -> Any:
    """One line of an event stream: the decoded JSON of a ``data:`` line, :data:`DONE` for
    ``data: [DONE]``, None for anything else (blank separators, comments, ``event:`` lines)."""
    if not line.startswith("data:"):
        return None
    payload = line[len("data:"):].strip()
    if payload == DONE:
        return DONE
    return json.loads(payload) if payload else None


def event_text(event: Dict[str, Any]) -> str:
    """The text an OpenAI-style completion (or chat) chunk carries, "" for none."""
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "text" in choice:
        return choice.get("text") or ""
    return (choice.get("delta") or {}).get("content") or ""


def event_counts(event: Dict[str, Any]) -> Tuple[Optional[int], Optional[int]]:
    """(generated, prompt) token counts a chunk reports: OpenAI's ``usage`` (sent at the end when
    asked with ``stream_options.include_usage``) or llama-server's ``timings``; None if absent."""
    usage = event.get("usage") or {}
    timings = event.get("timings") or {}
    generated = usage.get("completion_tokens", timings.get("predicted_n"))
    prompt = usage.get("prompt_tokens", timings.get("prompt_n"))
    return generated, prompt


@dataclass
class StreamRecord:
    """One streamed request as the client saw it (perf_counter seconds)."""

    sent: float = 0.0
    stamps: List[float] = field(default_factory=list)  # arrival of each chunk that carried text
    done: float = 0.0
    reported_tokens: Optional[int] = None  # what the server said it generated, if it said
    prompt_tokens: Optional[int] = None
    finish_reason: Optional[str] = None
    text: str = ""
    on_text: Optional[Callable[["StreamRecord"], None]] = None  # called after each chunk with text

    def feed(self, event: Any, now: float) -> None:
        if not isinstance(event, dict):
            return
        text = event_text(event)
        if text:
            self.stamps.append(now)
            self.text += text
            if self.on_text is not None:
                self.on_text(self)
        generated, prompt = event_counts(event)
        if generated is not None:
            self.reported_tokens = int(generated)
        if prompt is not None:
            self.prompt_tokens = int(prompt)
        for choice in event.get("choices") or []:
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    @property
    def tokens(self) -> int:
        """Generated tokens: the server's own count, else one per text chunk."""
        return self.reported_tokens if self.reported_tokens is not None else len(self.stamps)

    @property
    def first_output(self) -> float:
        """When the first text came (the end, for a stream that ended without any)."""
        return self.stamps[0] if self.stamps else self.done

    @property
    def ttft(self) -> float:
        return self.first_output - self.sent

    def summary(self) -> Dict[str, Any]:
        return {"ttft": self.ttft, "seconds": self.done - self.sent, "tokens": self.tokens,
                "counted_from": "server" if self.reported_tokens is not None else "chunks",
                "chunks": len(self.stamps), "prompt_tokens": self.prompt_tokens, "finish_reason": self.finish_reason}


def aggregate_tokens_per_second(records: Sequence[StreamRecord]) -> float:
    """All streams' generated tokens over the span from the first request sent to the last end."""
    span = max(r.done for r in records) - min(r.sent for r in records)
    return sum(r.tokens for r in records) / span if span > 0 else float("nan")


# -- prompts --------------------------------------------------------------------------------------------

class Prompts:
    """Distinct prompts, each opening with its own request number (no two share a cached prefix)."""

    def __init__(self, model: Path, seed: int = 42) -> None:
        import random

        from cyllama_cffi.lowlevel.model import LlamaModel

        self._draw = random.Random(seed)
        self._model = LlamaModel(model, vocab_only=True)
        vocab = self._model.vocab
        self._pieces = [t for t in range(1000, vocab.n_tokens) if not vocab.is_eog(t)]
        self._next = 0

    def _number(self) -> str:
        self._next += 1
        return f"Request {self._next:06d}."

    def rambling(self) -> str:
        """About PROMPT_TOKENS tokens of random vocabulary pieces: greedy decoding goes on from them."""
        vocab = self._model.vocab
        head = self._number()
        n_head = len(vocab.tokenize(head, add_special=False))
        return head + vocab.detokenize([self._draw.choice(self._pieces) for _ in range(PROMPT_TOKENS - n_head)])

    def long(self, n_tokens: int) -> str:
        """A prompt of ``n_tokens`` tokens (as this model's tokenizer reads it) of plain text."""
        vocab = self._model.vocab
        text = self._number() + " " + LONG_UNIT * (n_tokens // 10 + 2)
        return vocab.detokenize(vocab.tokenize(text, add_special=False)[:n_tokens])

    def close(self) -> None:
        self._model.close()


# -- running a server --------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server subprocess on a free port: started, waited for, stopped; its output in a log file."""

    def __init__(self, name: str, command: List[str], port: int, ready_timeout: float) -> None:
        self.name, self.command, self.port, self.ready_timeout = name, command, port, ready_timeout
        self.base = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)
        self.process: Optional[subprocess.Popen] = None

    def __enter__(self) -> "Server":
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
                                        start_new_session=True)  # Ctrl-C reaches the bench only
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        if exc[0] is None:
            os.unlink(self.log.name)
        else:
            print(f"{self.name}'s output is in {self.log.name}", file=sys.stderr)

    def _wait_ready(self) -> None:
        import httpx

        assert self.process is not None
        deadline = time.monotonic() + self.ready_timeout
        with httpx.Client(base_url=self.base, timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")
                try:
                    status = client.get("/health").status_code
                    if status == 200 or (status in (404, 405) and client.get("/v1/models").status_code == 200):
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
        raise RuntimeError(f"{self.name} was not ready after {self.ready_timeout:.0f} s:\n{self.tail()}")

    def tail(self, size: int = 3000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-size:]

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_server(args: argparse.Namespace, name: str, model: Path, parallel: int, ctx_slot: int) -> Server:
    port = free_port()
    values = {"python": sys.executable, "llama_server": args.llama_server or "", "lcpp_python": args.llama_cpp_python or "",
              "model": model, "port": port, "parallel": parallel, "ctx_total": parallel * ctx_slot,
              "ctx_slot": ctx_slot, "threads": args.threads, "budget": args.prompt_budget}
    return Server(name, server_command(args.commands[name], **values), port, args.ready_timeout)


def default_llama_server() -> Path:
    """llama-server of the native build of the pinned llama.cpp, built on first use.

    It lives in a ``server`` directory beside the package's own native build, configured with
    the same CMake flags but for ``LLAMA_BUILD_SERVER=ON`` (the package's build leaves the
    server out), so both sides run the same ggml.
    """
    import build_libllama

    cmake_dir = build_libllama.native_build_dir(build_libllama.resolve_source()) / "server" / "cmake"
    binary = cmake_dir / "bin" / "llama-server"
    if not binary.is_file():
        flags = [f for f in build_libllama.cmake_flags() if not f.startswith("-DLLAMA_BUILD_SERVER=")]
        print(f"building llama-server in {cmake_dir} (minutes, once)", file=sys.stderr)
        subprocess.run(["cmake", "-S", str(build_libllama.resolve_source()), "-B", str(cmake_dir), "-G", "Ninja",
                        *flags, "-DLLAMA_BUILD_SERVER=ON"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(cmake_dir), "--parallel", str(build_libllama.usable_cores()),
                        "--target", "llama-server"], check=True, stdout=subprocess.DEVNULL)
    return binary


# -- clients -------------------------------------------------------------------------------------------------

def completion_body(prompt: str, max_tokens: int, ignore_eos: bool, model_name: str) -> Dict[str, Any]:
    body: Dict[str, Any] = {"model": model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                            "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    return body


async def stream_request(client, body: Dict[str, Any], record: StreamRecord,
                         until: Optional["asyncio.Future[float]"] = None) -> StreamRecord:
    """POST a streaming completion and fill ``record`` as the chunks arrive. With ``until``: stop
    reading (closing the connection, which ends the request) at the first chunk with text after
    the perf_counter time ``until`` resolves to."""
    record.sent = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:500]}")
        async for line in response.aiter_lines():
            now = time.perf_counter()
            event = parse_sse_line(line)
            if event == DONE:
                break
            before = len(record.stamps)
            record.feed(event, now)
            if until is not None and until.done() and len(record.stamps) > before and now > until.result():
                break
    record.done = time.perf_counter()
    return record


def http_client(base: str, connections: int):
    import httpx

    return httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(None, connect=30.0),
                             limits=httpx.Limits(max_connections=connections + 4, max_keepalive_connections=0))


async def concurrent_streams(base: str, bodies: Sequence[Dict[str, Any]]) -> List[StreamRecord]:
    async with http_client(base, len(bodies)) as client:
        return list(await asyncio.gather(*(stream_request(client, body, StreamRecord()) for body in bodies)))


async def fair_contention(base: str, stream_bodies: Sequence[Dict[str, Any]],
                          long_body: Dict[str, Any]) -> Tuple[List[StreamRecord], StreamRecord]:
    """The streams start; once each has SETTLE_CHUNKS chunks the long prompt is sent; the streams
    read on until each has a chunk after the long prompt's first one, then hang up."""
    loop = asyncio.get_running_loop()
    settled = [loop.create_future() for _ in stream_bodies]
    first_long_text: "asyncio.Future[float]" = loop.create_future()

    def settle(future: "asyncio.Future[Any]") -> Callable[[StreamRecord], None]:
        def on_text(record: StreamRecord) -> None:
            if len(record.stamps) >= SETTLE_CHUNKS and not future.done():
                future.set_result(None)
        return on_text

    def long_started(record: StreamRecord) -> None:
        if not first_long_text.done():
            first_long_text.set_result(record.stamps[0])

    async with http_client(base, len(stream_bodies) + 1) as client:
        records = [StreamRecord(on_text=settle(future)) for future in settled]
        tasks = [asyncio.ensure_future(stream_request(client, body, record, until=first_long_text))
                 for body, record in zip(stream_bodies, records)]
        # Each stream has settled, or ended (early, or with an error that surfaces below).
        await asyncio.wait([asyncio.ensure_future(asyncio.wait([f, t], return_when=asyncio.FIRST_COMPLETED))
                            for f, t in zip(settled, tasks)])
        for task in tasks:
            if task.done():
                task.result()
        long_record = await stream_request(client, long_body, StreamRecord(on_text=long_started))
        if not first_long_text.done():  # it ended without text
            first_long_text.set_result(long_record.done)
        await asyncio.gather(*tasks)
        return records, long_record


# -- scenarios ----------------------------------------------------------------------------------------------

def throughput_round(args: argparse.Namespace, name: str, model: Path,
                     batches: Dict[int, List[str]], warm_up: str) -> Dict[int, List[StreamRecord]]:
    model_name = model.name
    results = {}
    with start_server(args, name, model, THROUGHPUT_SLOTS, THROUGHPUT_SLOT_CTX) as server:
        asyncio.run(concurrent_streams(server.base, [completion_body(warm_up, 8, args.ignore_eos, model_name)]))
        for clients, prompts in batches.items():
            bodies = [completion_body(p, args.max_tokens, args.ignore_eos, model_name) for p in prompts]
            results[clients] = asyncio.run(concurrent_streams(server.base, bodies))
    return results


def run_throughput(args: argparse.Namespace, model: Path) -> Dict[str, Any]:
    prompts = Prompts(model)
    try:  # the same prompts for every server and round; each server process sees each one once
        warm_up = prompts.rambling()
        batches = {c: [prompts.rambling() for _ in range(c)] for c in args.clients}
    finally:
        prompts.close()
    samples: Dict[str, Dict[int, List[List[StreamRecord]]]] = {n: {c: [] for c in args.clients} for n in args.servers}
    for round_index in range(args.rounds):
        for name in rotated(args.servers, round_index):
            started = time.perf_counter()
            for clients, records in throughput_round(args, name, model, batches, warm_up).items():
                samples[name][clients].append(records)
            rates = "  ".join(f"{c}: {aggregate_tokens_per_second(samples[name][c][-1]):.1f}" for c in args.clients)
            print(f"round {round_index} {name:<18} tok/s {rates}  ({time.perf_counter() - started:.0f} s)", flush=True)
    report = throughput_report(samples, args.servers, args.clients, args.max_tokens)
    print_throughput(report, args)
    return {"samples": {n: {c: [[r.summary() for r in records] for records in rounds] for c, rounds in by_c.items()}
                        for n, by_c in samples.items()}, "report": report}


def throughput_report(samples: Dict[str, Dict[int, List[List[StreamRecord]]]], servers: Sequence[str],
                      clients: Sequence[int], max_tokens: int) -> Dict[str, Any]:
    """Per server and client count: tokens/s per round, pooled TTFT percentiles, short streams;
    per other server: the first server's per-round ratios over it."""
    rows: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for name in servers:
        rows[name] = {}
        for c in clients:
            rounds = samples[name][c]
            rates = [aggregate_tokens_per_second(records) for records in rounds]
            ttfts = [r.ttft for records in rounds for r in records]
            rows[name][c] = {"tok_s": rates, "tok_s_median": statistics.median(rates),
                             "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
                             "ttft_p50_rounds": [percentile([r.ttft for r in records], 50) for records in rounds],
                             "short_streams": sum(r.tokens < max_tokens for records in rounds for r in records),
                             "streams": sum(len(records) for records in rounds),
                             "counted_from": sorted({r.summary()["counted_from"] for rs in rounds for r in rs})}
    ours, others = servers[0], servers[1:]
    ratios = {}
    for other in others:
        ratios[other] = {}
        for c in clients:
            mine, theirs = rows[ours][c], rows[other][c]
            ratios[other][c] = {
                "tok_s": geometric_mean_interval([a / b for a, b in zip(mine["tok_s"], theirs["tok_s"])]),
                "ttft_p50": geometric_mean_interval([a / b for a, b in zip(mine["ttft_p50_rounds"],
                                                                           theirs["ttft_p50_rounds"])])}
    return {"rows": rows, "ratios": ratios, "first": ours}


def print_throughput(report: Dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\n{args.max_tokens} tokens per stream, {args.rounds} round(s), {args.threads} threads:\n")
    print("| clients | server | tok/s (median over rounds) | TTFT p50 | TTFT p99 | short streams | tokens counted from |")
    print("|---|---|---|---|---|---|---|")
    for c in args.clients:
        for name in args.servers:
            row = report["rows"][name][c]
            print(f"| {c} | {name} | {row['tok_s_median']:.1f} | {1000 * row['ttft_p50']:.0f} ms | "
                  f"{1000 * row['ttft_p99']:.0f} ms | {row['short_streams']}/{row['streams']} | "
                  f"{', '.join(row['counted_from'])} |")
    if report["ratios"]:
        first = report["first"]
        print(f"\n{first} over each other server, per-round ratios: geometric mean (95 % interval; range, n)\n")
        print("| clients | against | tok/s ratio | TTFT p50 ratio |")
        print("|---|---|---|---|")
        for c in args.clients:
            for other, by_c in report["ratios"].items():
                print(f"| {c} | {other} | {format_ratio(by_c[c]['tok_s'])} | {format_ratio(by_c[c]['ttft_p50'])} |")


def fair_round(args: argparse.Namespace, name: str, model: Path, texts: Dict[str, Any]) -> Dict[str, Any]:
    model_name = model.name
    ctx_slot = args.long_tokens + 512
    with start_server(args, name, model, FAIR_SLOTS, ctx_slot) as server:
        asyncio.run(concurrent_streams(server.base, [completion_body(texts["warm_up"], 8, False, model_name)]))
        solo = asyncio.run(concurrent_streams(
            server.base, [completion_body(texts["solo"], LONG_MAX_TOKENS, False, model_name)]))[0]
        stream_bodies = [completion_body(p, ctx_slot - 2 * PROMPT_TOKENS, args.ignore_eos, model_name)
                         for p in texts["streams"]]
        streams, long = asyncio.run(fair_contention(
            server.base, stream_bodies, completion_body(texts["long"], LONG_MAX_TOKENS, False, model_name)))
    start, end = long.sent, long.first_output
    return {"solo_ttft": solo.ttft, "ttft": long.ttft, "long_prompt_tokens": long.prompt_tokens,
            "gaps": [g for s in streams for g in gaps_in_window(s.stamps, start, end)],
            "steady": [g for s in streams for g in gaps_before(s.stamps, start)],
            "streams_ended_early": sum(1 for s in streams if not s.stamps or s.stamps[-1] < end)}


def run_fair(args: argparse.Namespace, model: Path) -> Dict[str, Any]:
    prompts = Prompts(model)
    try:  # the same texts for every server and round: solo and contended prompts differ only in their number
        texts = {"warm_up": prompts.rambling(), "solo": prompts.long(args.long_tokens),
                 "long": prompts.long(args.long_tokens), "streams": [prompts.rambling() for _ in range(FAIR_STREAMS)]}
    finally:
        prompts.close()
    samples: Dict[str, List[Dict[str, Any]]] = {name: [] for name in args.servers}
    for round_index in range(args.rounds):
        for name in rotated(args.servers, round_index):
            result = fair_round(args, name, model, texts)
            samples[name].append(result)
            print(f"round {round_index} {name:<18} long prompt TTFT {result['ttft']:.2f} s (solo "
                  f"{result['solo_ttft']:.2f} s), streams' gap p99 {1000 * percentile(result['gaps'], 99):.0f} ms "
                  f"max {1000 * max(result['gaps'], default=float('nan')):.0f} ms", flush=True)
    report = {name: fair_summary(rounds) for name, rounds in samples.items()}
    print(f"\n{FAIR_STREAMS} streams generating, then a {args.long_tokens}-token prompt; {args.rounds} round(s), "
          f"{args.threads} threads:\n")
    print("| server | gap p50 | gap p99 | gap max | gap before | long TTFT | solo prefill TTFT | TTFT / solo "
          "| streams ended early |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in report.items():
        print(f"| {name} | {row['gap_p50_ms']:.0f} ms | {row['gap_p99_ms']:.0f} ms | {row['gap_max_ms']:.0f} ms | "
              f"{row['steady_p50_ms']:.0f} ms | {row['ttft_s']:.2f} s | {row['solo_s']:.2f} s | "
              f"{format_ratio(row['ttft_vs_solo'])} | {row['streams_ended_early']} |")
    return {"samples": samples, "report": report}


def fair_summary(rounds: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    gaps = [g for r in rounds for g in r["gaps"]]
    steady = [g for r in rounds for g in r["steady"]]
    return {"gap_p50_ms": 1000 * percentile(gaps, 50), "gap_p99_ms": 1000 * percentile(gaps, 99),
            "gap_max_ms": 1000 * max(gaps, default=float("nan")), "steady_p50_ms": 1000 * percentile(steady, 50),
            "ttft_s": statistics.median(r["ttft"] for r in rounds),
            "solo_s": statistics.median(r["solo_ttft"] for r in rounds),
            "ttft_vs_solo": geometric_mean_interval([r["ttft"] / r["solo_ttft"] for r in rounds]),
            "streams_ended_early": sum(r["streams_ended_early"] for r in rounds)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from cyllama_cffi.models import default_model_path

    model = Path(args.model) if args.model else default_model_path()
    if "llama-server" in args.servers and "{llama_server}" in args.commands["llama-server"]:
        args.llama_server = args.llama_server or str(default_llama_server())
        if not Path(args.llama_server).is_file():
            raise SystemExit(f"no llama-server at {args.llama_server}")
    started = time.time()
    result = run_fair(args, model) if args.scenario == "fair" else run_throughput(args, model)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("command",)}
        Path(args.json).write_text(json.dumps({"settings": settings, **result}, indent=2, default=str))
    print(f"({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
