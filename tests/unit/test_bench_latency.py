"""The pure parts of bench/server.py and bench/fair_steps.py: arguments, event parsing, statistics.

No server, model or timing here: the scripts' measuring runs are benchmarks, not tests.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


stats = load("latency_stats")
server = load("server")
fair_steps = load("fair_steps")


# -- statistics --------------------------------------------------------------------------------------

def test_percentile_is_nearest_rank():
    values = list(range(100, 0, -1))  # 1..100, unordered
    assert stats.percentile(values, 50) == 50
    assert stats.percentile(values, 99) == 99
    assert stats.percentile(values, 100) == 100
    assert stats.percentile(values, 0) == 1
    assert stats.percentile([0.3, 0.1, 0.2], 99) == 0.3  # few values: p99 is the worst
    assert math.isnan(stats.percentile([], 50))


def test_gaps_overlapping_the_window_include_those_it_opens_and_closes_in():
    stamps = [0.0, 1.0, 2.0, 5.0, 6.0, 7.0]
    assert stats.gaps_in_window(stamps, 1.5, 5.5) == [1.0, 3.0, 1.0]
    assert stats.gaps_before(stamps, 1.5) == [1.0]
    # A stall spanning the whole window is one long gap.
    assert stats.gaps_in_window([0.0, 10.0], 2.0, 5.0) == [10.0]
    assert stats.gaps_in_window([0.0], 2.0, 5.0) == []


def test_geometric_mean_interval_and_its_format():
    summary = stats.geometric_mean_interval([2.0, 0.5])
    assert summary["mean"] == pytest.approx(1.0)
    assert summary["low"] < 1.0 < summary["high"]
    assert (summary["min"], summary["max"], summary["n"]) == (0.5, 2.0, 2)
    assert stats.format_ratio(summary).startswith("1.000 (95% ")
    single = stats.geometric_mean_interval([1.25])
    assert math.isnan(single["low"]) and stats.format_ratio(single) == "1.250 (n=1)"


def test_rotation_lets_each_item_lead_in_turn():
    items = ["a", "b", "c"]
    assert [stats.rotated(items, r)[0] for r in range(4)] == ["a", "b", "c", "a"]
    assert sorted(stats.rotated(items, 2)) == items


# -- bench/server.py -----------------------------------------------------------------------------------------

def test_server_arguments_defaults_and_checks():
    args = server.parse_args(["--llama-cpp-python", "python3"])
    assert args.servers == ["cyllama_cffi", "llama-server", "llama-cpp-python"]
    assert (args.scenario, args.rounds, args.clients, args.max_tokens) == ("throughput", 8, [1, 4, 8], 64)
    assert server.parse_args(["--servers", "llama-server", "--scenario", "fair"]).rounds == 3

    with pytest.raises(SystemExit):  # llama-cpp-python's interpreter is not guessed
        server.parse_args(["--servers", "llama-server,llama-cpp-python"])
    with pytest.raises(SystemExit):
        server.parse_args(["--servers", "llama-server,nonesuch"])
    with pytest.raises(SystemExit):
        server.parse_args(["--servers", "llama-server,llama-server"])
    with pytest.raises(SystemExit):
        server.parse_args(["--servers", "llama-server", "--clients", "4,0"])
    with pytest.raises(SystemExit):
        server.parse_args(["--servers", "llama-server", "--command", "no-equals-sign"])
    with pytest.raises(SystemExit):  # nothing left that serves several requests at once
        server.parse_args(["--scenario", "fair", "--servers", "llama-cpp-python", "--llama-cpp-python", "python3"])


def test_fair_scenario_leaves_out_one_at_a_time_servers_and_commands_can_be_added():
    args = server.parse_args(["--scenario", "fair", "--llama-cpp-python", "python3",
                              "--command", "mine={python} -m mine --port {port}",
                              "--servers", "mine,llama-server,llama-cpp-python"])
    assert args.servers == ["mine", "llama-server"]
    assert args.commands["mine"] == "{python} -m mine --port {port}"
    assert args.commands["llama-server"] == server.SERVERS["llama-server"]


def test_server_command_fills_and_quotes_the_template():
    argv = server.server_command(server.SERVERS["llama-server"], llama_server="/opt/llama server/bin",
                                 model="/m/a b.gguf", port=8081, parallel=8, ctx_total=4096, ctx_slot=512,
                                 threads=2, budget=64)
    assert argv[:3] == ["/opt/llama server/bin", "-m", "/m/a b.gguf"]
    assert argv[argv.index("-np") + 1] == "8" and argv[argv.index("-c") + 1] == "4096"
    ours = server.server_command(server.SERVERS["cyllama_cffi"], python="py", model="m.gguf", port=1, parallel=4,
                                 ctx_total=2048, ctx_slot=512, threads=2, budget=64)
    assert ours[:3] == ["py", "-m", "cyllama_cffi.server"]
    assert ours[ours.index("--prompt-budget") + 1] == "64" and ours[ours.index("--ctx-size") + 1] == "2048"


def test_sse_lines_and_chunk_contents():
    assert server.parse_sse_line('data: {"choices": [{"text": "hi"}]}') == {"choices": [{"text": "hi"}]}
    assert server.parse_sse_line('data:{"a": 1}') == {"a": 1}
    assert server.parse_sse_line("data: [DONE]") is server.DONE
    assert server.parse_sse_line("") is None and server.parse_sse_line(": keep-alive") is None
    assert server.parse_sse_line("event: message") is None

    assert server.event_text({"choices": [{"text": "a", "finish_reason": None}]}) == "a"
    assert server.event_text({"choices": [{"delta": {"content": "b"}}]}) == "b"
    assert server.event_text({"choices": [{"delta": {"role": "assistant"}}]}) == ""
    assert server.event_text({"choices": [], "usage": {}}) == ""
    assert server.event_counts({"usage": {"completion_tokens": 64, "prompt_tokens": 33}}) == (64, 33)
    assert server.event_counts({"timings": {"predicted_n": 60, "prompt_n": 31}}) == (60, 31)
    assert server.event_counts({"choices": []}) == (None, None)


def record(sent, stamps, done, reported=None):
    result = server.StreamRecord(sent=sent)
    for stamp in stamps:
        result.feed({"choices": [{"text": "x", "finish_reason": None}]}, stamp)
    result.feed({"choices": [{"text": "", "finish_reason": "length"}]}, done)
    if reported is not None:
        result.feed({"choices": [], "usage": {"completion_tokens": reported, "prompt_tokens": 32}}, done)
    result.done = done
    return result


def test_stream_record_counts_tokens_from_the_server_else_from_chunks():
    by_chunks = record(1.0, [1.5, 1.6, 1.7], 1.8)
    assert by_chunks.tokens == 3 and by_chunks.ttft == pytest.approx(0.5)
    assert by_chunks.finish_reason == "length" and by_chunks.summary()["counted_from"] == "chunks"
    reported = record(1.0, [1.5, 1.6], 1.8, reported=5)  # two tokens' text came in one chunk, twice
    assert reported.tokens == 5 and reported.prompt_tokens == 32 and reported.summary()["counted_from"] == "server"
    silent = record(1.0, [], 2.0, reported=0)
    assert silent.ttft == pytest.approx(1.0)  # no text at all: its first output is its end


def test_aggregate_rate_spans_first_send_to_last_end():
    records = [record(0.0, [0.5], 1.0, reported=10), record(0.5, [1.0], 2.0, reported=30)]
    assert server.aggregate_tokens_per_second(records) == pytest.approx(20.0)


def test_throughput_report_pairs_rounds_and_counts_short_streams():
    samples = {"ours": {4: [[record(0.0, [0.1], 1.0, reported=64)] * 4, [record(0.0, [0.2], 1.0, reported=64)] * 4]},
               "theirs": {4: [[record(0.0, [0.2], 2.0, reported=64)] * 4, [record(0.0, [0.2], 2.0, reported=60)] * 4]}}
    report = server.throughput_report(samples, ["ours", "theirs"], [4], 64)
    ours, theirs = report["rows"]["ours"][4], report["rows"]["theirs"][4]
    assert ours["tok_s"] == [256.0, 256.0] and theirs["short_streams"] == 4 and theirs["streams"] == 8
    ratio = report["ratios"]["theirs"][4]
    assert ratio["tok_s"]["min"] == pytest.approx(2.0) and ratio["tok_s"]["max"] == pytest.approx(256 / 120)
    assert ratio["ttft_p50"]["min"] == pytest.approx(0.5) and ratio["ttft_p50"]["max"] == pytest.approx(1.0)


def test_fair_summary_pools_rounds():
    rounds = [{"gaps": [0.1, 0.2], "steady": [0.05], "ttft": 12.0, "solo_ttft": 10.0, "streams_ended_early": 0},
              {"gaps": [3.0], "steady": [0.05, 0.06], "ttft": 9.0, "solo_ttft": 10.0, "streams_ended_early": 1}]
    row = server.fair_summary(rounds)
    assert row["gap_max_ms"] == pytest.approx(3000) and row["gap_p50_ms"] == pytest.approx(200)
    assert row["steady_p50_ms"] == pytest.approx(50) and row["streams_ended_early"] == 1
    assert (row["ttft_s"], row["solo_s"]) == (10.5, 10.0)
    assert row["ttft_vs_solo"]["min"] == pytest.approx(0.9) and row["ttft_vs_solo"]["max"] == pytest.approx(1.2)


# -- bench/fair_steps.py ----------------------------------------------------------------------------------

def test_fair_steps_arguments():
    args = fair_steps.parse_args([])
    assert args.budgets == [16, 32, 64, 128, 256, 512, 1024, 2048] and args.rounds == 3 and args.long_tokens == 4000
    assert (args.clock, args.kv_unified) == ("wall", False)
    assert fair_steps.parse_args(["--budgets", "16,2048"]).budgets == [16, 2048]
    for bad in ("0", "4096", "64,64", "x", ""):
        with pytest.raises(SystemExit):
            fair_steps.parse_args(["--budgets", bad])
    with pytest.raises(SystemExit):
        fair_steps.parse_args(["--rounds", "0"])
    assert fair_steps.parse_args(["--clock", "cpu", "--threads", "1"]).clock == "cpu"
    with pytest.raises(SystemExit):  # the CPU clock sees the stepping thread only
        fair_steps.parse_args(["--clock", "cpu", "--threads", "2"])


def sample(budget, round_index, ttft, solo, gaps, alive=4):
    return {"budget": budget, "round": round_index, "ttft": ttft, "solo": solo, "gaps": gaps, "steady": [0.05],
            "streams_alive": alive}


def test_fair_steps_summary_and_choice():
    samples = [sample(64, 0, 12.0, 10.0, [0.1, 0.2]), sample(2048, 0, 8.5, 8.0, [9.0]),
               sample(64, 1, 14.0, 11.0, [0.15]), sample(2048, 1, 10.5, 10.0, [8.0], alive=3)]
    rows = fair_steps.summarize(samples, [64, 2048])
    small = rows[64]
    assert small["gap_p99_ms"] == pytest.approx(200) and small["gap_max_ms"] == pytest.approx(200)
    assert small["ttft_s"] == 13.0 and small["solo_s"] == 10.5
    # TTFT over the full-batch (largest budget) solo of the same round: 12/8 and 14/10.
    assert small["ttft_vs_full_solo"] == pytest.approx((1.5 + 1.4) / 2)
    assert rows[2048]["ttft_vs_full_solo"] == pytest.approx((8.5 / 8 + 1.05) / 2)
    assert rows[2048]["streams_ended_early"] == 1

    assert fair_steps.choose(rows, max_gap_ms=250, max_ttft_ratio=1.5) == 64
    assert fair_steps.choose(rows, max_gap_ms=250, max_ttft_ratio=1.4) is None
    assert fair_steps.choose(rows, max_gap_ms=10000, max_ttft_ratio=1.5) == 2048
