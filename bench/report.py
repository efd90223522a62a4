"""Turn a bench/run.py JSON file into the Markdown tables of docs/performance.md.

    python bench/report.py bench/results/latest.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> int:
    data = json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/latest.json").read_text())
    machine = data["machine"]
    print(f"Machine: {machine['cores_usable']} usable cores, {machine['cpu']}, {machine['platform']}, "
          f"{machine['implementation']} {machine['python']}; threads: {data['threads']}; model: {data['model']}.\n")
    print(f"Command: `{data['command']}`\n")
    throughput = [k for k in ("decode tg128", "prefill pp512", "prefill pp4096", "prefill pp4096 hugepages") if k in data]
    if throughput:
        print("| row | native llama-bench (median, min) | cyllama_cffi (median, min) | ratio of medians "
              "| median paired ratio |")
        print("|---|---|---|---|---|")
        for key in throughput:
            row = data[key]
            print(f"| {key} | {row['native']['median']:.1f} ({row['native']['min']:.1f}) tok/s | "
                  f"{row['binding']['median']:.1f} ({row['binding']['min']:.1f}) tok/s | {row['ratio_median']:.3f} "
                  f"| {row.get('ratio_paired_median', float('nan')):.3f} |")
        print()
    latencies = [k for k in ("cancel between tokens", "cancel during decoding", "cancel mid-prefill", "SIGINT mid-prefill",
                             "import (fresh process)", "model load") if k in data]
    if latencies:
        print("| latency | p50 | p99 | max | trials |")
        print("|---|---|---|---|---|")
        for key in latencies:
            row = data[key]
            print(f"| {key} | {row['p50']:.2f} ms | {row['p99']:.2f} ms | {row['max']:.2f} ms | {row['n']} |")
        print()
    if "machinery" in data:
        row = data["machinery"]
        print(f"Cancellation machinery (abort callback + per-token check) on decode: with "
              f"{row['with']['median']:.1f} tok/s, without {row['without']['median']:.1f} tok/s, "
              f"cost {row['cost'] * 100:+.2f} % (median of {row.get('pairs', row['with']['n'])} paired ratios).\n")
    pypy_rows = {k: v for k, v in data.get("pypy", {}).items() if k != "error"}
    if pypy_rows:
        print("| PyPy row (interleaved) | native (median) | CPython | PyPy | PyPy / native | PyPy / CPython |")
        print("|---|---|---|---|---|---|")
        for kind, row in pypy_rows.items():
            print(f"| {kind} | {row['native']['median']:.1f} tok/s | {row['cpython']['median']:.1f} tok/s | "
                  f"{row['pypy']['median']:.1f} tok/s | {row['pypy_vs_native']:.3f} | {row['pypy_vs_cpython']:.3f} |")
        print()
    if "ubatch_sweep" in data:
        print("| n_ubatch | prefill 4000 tokens | of the fastest | mid-prefill cancel p50 | p99 | trials |")
        print("|---|---|---|---|---|---|")
        for size, row in data["ubatch_sweep"].items():
            print(f"| {size} | {row['prefill_tok_s']:.1f} tok/s | {row.get('prefill_vs_fastest', float('nan')):.3f} | "
                  f"{row['cancel_ms']['p50']:.2f} ms | {row['cancel_ms']['p99']:.2f} ms | {row['cancel_ms']['n']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
