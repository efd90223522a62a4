"""The portable wheel against the build from source: decode and prefill, fresh processes, interleaved.

    python bench/portable.py                          # 6 pairs of each row, 2 threads
    python bench/portable.py --repeats 2 --only decode --json out.json

"native" is this checkout's package (llama.cpp compiled with GGML_NATIVE for this CPU);
"portable" is the CPython wheel of scripts/build_portable_wheels.py (built or reused),
installed into a venv of this interpreter kept under the build cache, which loads the CPU
variant ggml scores best here. Both run bench/run.py's sample code (``run_sample``): a fresh
process per sample with a warm-up run, decode = 128 greedy tokens through ``LLM`` streaming,
prefillN = llama-bench's pp N prompt tokens. Samples alternate (A B, B A, ...) and each ratio
is portable over its neighbouring native sample, so the machine's drift cancels; the row
reports both medians, the median of the paired ratios and their geometric mean with a 95%
interval. The CPU variant the wheel loaded is printed first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

REPO = Path(__file__).resolve().parent.parent

KINDS = ("decode", "prefill512")


def portable_python() -> Path:
    """A venv of this interpreter with the portable wheel installed (made once per wheel)."""
    sys.path.insert(0, str(REPO))
    import build_libllama

    sys.path.insert(0, str(REPO / "scripts"))
    from build_portable_wheels import build_portable_wheels

    (wheel,) = build_portable_wheels([sys.executable])
    key = hashlib.sha256(wheel.read_bytes()).hexdigest()[:16]
    venv = build_libllama.cache_root() / "bench" / f"portable-{key}"
    python = venv / "bin" / "python"
    if not (venv / "installed").is_file():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        str(wheel)], check=True)
        (venv / "installed").write_text(wheel.name + "\n")
    return python


def sample(side: str, python: Path, model: Path, threads: int, kind: str) -> float:
    """One fresh process: warm-up run, then the timed one; returns tokens/s."""
    command = [str(python), str(Path(__file__).resolve()), "--model", str(model), "--threads", str(threads),
               "--sample", kind, "--side", side]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CYLLAMA_LIBLLAMA_DIR")}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(REPO / "bench"))
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return float(result.stdout.split()[-1])


def child(model: Path, threads: int, kind: str, want_portable: bool) -> float:
    """The sample itself. The package is imported before bench.run puts the checkout first on
    sys.path, so the portable side runs the installed wheel and the native side this checkout."""
    if not want_portable:
        sys.path.insert(0, str(REPO))
    import cyllama_cffi

    installed = "site-packages" in cyllama_cffi.__file__
    if installed != want_portable:
        raise SystemExit(f"expected the {'installed wheel' if want_portable else 'checkout'}, "
                         f"imported {cyllama_cffi.__file__}")
    sys.path.append(str(REPO))
    from bench.run import run_sample

    return run_sample(model, threads, kind)


def geometric_mean_interval(ratios: Sequence[float]) -> str:
    logs = [math.log(r) for r in ratios]
    mean = statistics.mean(logs)
    if len(logs) < 2:
        return f"{math.exp(mean):.3f}"
    half = 1.96 * statistics.stdev(logs) / math.sqrt(len(logs))
    return f"{math.exp(mean):.3f} (95% {math.exp(mean - half):.3f}-{math.exp(mean + half):.3f})"


def variant_of(python: Path) -> str:
    code = "from cyllama_cffi import system_info; print(system_info())"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True,
                          cwd=str(REPO / "bench")).stdout.strip()


def run(model: Path, threads: int, repeats: int, kinds: Sequence[str]) -> Dict[str, Dict]:
    portable = portable_python()
    native = Path(sys.executable)
    print(f"portable: {variant_of(portable)}", flush=True)
    report: Dict[str, Dict] = {}
    for kind in kinds:
        values: Dict[str, List[float]] = {"native": [], "portable": []}
        for index in range(repeats + repeats % 2):
            order = ("native", "portable") if index % 2 == 0 else ("portable", "native")
            for side in order:
                python = native if side == "native" else portable
                values[side].append(sample(side, python, model, threads, kind))
        paired = [p / n for n, p in zip(values["native"], values["portable"])]
        report[kind] = {"native": values["native"], "portable": values["portable"], "paired_ratios": paired,
                        "native_median": statistics.median(values["native"]),
                        "portable_median": statistics.median(values["portable"])}
        print(f"{kind:<11} native {statistics.median(values['native']):8.1f} tok/s   "
              f"portable {statistics.median(values['portable']):8.1f} tok/s   "
              f"paired median {statistics.median(paired):.3f}  geo-mean {geometric_mean_interval(paired)}",
              flush=True)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=6, help="pairs per row (rounded up to even)")
    parser.add_argument("--only", default=",".join(KINDS), help=f"rows, comma-separated (of {', '.join(KINDS)}, "
                        "or any prefillN)")
    parser.add_argument("--json")
    parser.add_argument("--sample", help=argparse.SUPPRESS)  # child: one sample of this row
    parser.add_argument("--side", choices=("native", "portable"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sample:
        print(child(Path(args.model), args.threads, args.sample, want_portable=args.side == "portable"))
        return 0
    sys.path.insert(0, str(REPO))
    from cyllama_cffi.models import default_model_path

    model = Path(args.model) if args.model else default_model_path()
    started = time.time()
    report = run(model, args.threads, args.repeats, args.only.split(","))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
