"""Build llama.cpp's shared libraries and the cffi out-of-line module over them.

One build module, four steps, each a function so setup.py, the benchmarks and a
developer at the shell can call them separately:

1. ``resolve_source()``  - find the llama.cpp tree: the user's checkout
   (``CYLLAMA_LLAMA_CPP_DIR``) or the pinned ``vendor/llama.cpp`` tree of the
   ``llama-cpp-python`` sdist, fetched with pip, hash-checked and unpacked into
   the git-ignored ``llama.cpp/`` beside this file.
2. ``build_native()``    - CMake build of ``libllama`` + ``libggml*`` (shared,
   Release), cached under a key of (source hash, cmake flags, compiler) so a
   second ``pip install`` takes seconds. ``CYLLAMA_LIBLLAMA_DIR`` skips it and
   uses a prebuilt library instead.
3. ``generate_cdef()``   - the cffi declarations, generated from the pinned
   headers with the C preprocessor instead of being copied by hand.
4. ``make_ffibuilder()`` - the ``cffi.FFI`` in API mode: generated cdef, plus the
   tiny C shim in ``csrc/`` (abort flag, SIGINT hook, log sink), a C source
   file of its own compiled into the same extension. ``extension_settings()``
   is what that extension is built with; setup.py hands the same to setuptools.

Environment variables (all optional):

``CYLLAMA_LLAMA_CPP_DIR``  use this llama.cpp checkout instead of the pinned one.
``CYLLAMA_LIBLLAMA_DIR``   use the prebuilt ``libllama``/``libggml*`` in this dir.
``CYLLAMA_LLAMA_INCLUDE``  headers for the prebuilt library
                           (default ``$CYLLAMA_LIBLLAMA_DIR/../include``).
``CYLLAMA_BACKEND``        cpu (default), cuda, vulkan or metal.
``CYLLAMA_NATIVE``         1 (default) builds for this CPU; 0 for baseline x86-64 kernels only.
``CYLLAMA_PORTABLE``       1 builds every CPU variant of ggml as a loadable module
                           (``libggml-cpu-<variant>.so``); the package loads the best
                           one for the running CPU at import. Used for portable wheels.
``CYLLAMA_CMAKE_ARGS``     extra arguments for the CMake configure step.
``CYLLAMA_CACHE_DIR``      cache root (default ``~/.cache/cyllama_cffi``).
``CYLLAMA_BUILD_JOBS``     parallel compile jobs (default: usable cores).
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

HERE = Path(__file__).resolve().parent
SHIM_DIR = HERE / "csrc"
MODULE_NAME = "cyllama_cffi._libllama"

PINNED_SDIST = "llama-cpp-python==0.3.36"
PINNED_SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
PINNED_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
PINNED_TREE_PREFIX = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
SOURCE_MARKER = ".cyllama-source"

# The shared libraries we link and ship, in dependency order (base first).
NATIVE_LIBS = ("ggml-base", "ggml-cpu", "ggml", "llama")
# Headers whose exported functions become part of ``lib``; the other ggml
# headers contribute only the types llama.h needs.
FUNCTION_HEADERS = ("llama.h", "ggml.h", "ggml-backend.h", "ggml-cpu.h", "gguf.h")

BACKEND_FLAGS = {
    "cpu": [],
    "cuda": ["-DGGML_CUDA=ON"],
    "vulkan": ["-DGGML_VULKAN=ON"],
    "metal": ["-DGGML_METAL=ON"],
}


class BuildError(RuntimeError):
    """A build step failed in a way the user has to act on."""


def log(message: str) -> None:
    print(f"[cyllama_cffi build] {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    return Path(os.environ.get("CYLLAMA_CACHE_DIR") or Path.home() / ".cache" / "cyllama_cffi")


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------
# 1. The llama.cpp source tree
# --------------------------------------------------------------------------

def resolve_source() -> Path:
    """Return a llama.cpp source tree, fetching the pinned one when needed."""
    user_tree = os.environ.get("CYLLAMA_LLAMA_CPP_DIR")
    if user_tree:
        tree = Path(user_tree).expanduser().resolve()
        _check_tree(tree, origin="CYLLAMA_LLAMA_CPP_DIR")
        return tree
    tree = HERE / "llama.cpp"
    marker = tree / SOURCE_MARKER
    if marker.is_file() and marker.read_text().strip() == PINNED_SDIST_SHA256:
        _check_tree(tree, origin="the unpacked pinned source")
        return tree
    if tree.exists():
        log(f"replacing {tree}: it is not the verified pinned source")
        shutil.rmtree(tree)
    unpack_pinned_source(fetch_pinned_sdist(), tree)
    return tree


def _check_tree(tree: Path, origin: str) -> None:
    needed = ["CMakeLists.txt", "include/llama.h", "ggml/include/ggml.h"]
    missing = [name for name in needed if not (tree / name).is_file()]
    if missing:
        raise BuildError(f"{origin} ({tree}) is not a llama.cpp tree: missing {', '.join(missing)}")


def fetch_pinned_sdist() -> Path:
    """Download (once) and verify the sdist that carries the pinned llama.cpp."""
    downloads = cache_root() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    target = downloads / PINNED_SDIST_FILE
    if not (target.is_file() and sha256_file(target) == PINNED_SDIST_SHA256):
        log(f"fetching {PINNED_SDIST} (llama.cpp source) with pip download")
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            # pip prepares an sdist's metadata even for `download --no-deps`, which
            # needs llama-cpp-python's build backend (scikit-build-core): keep pip's
            # build isolation so pip fetches it, nothing is compiled.
            command = [sys.executable, "-m", "pip", "download", "--no-deps",
                       "--no-binary", ":all:", PINNED_SDIST, "-d", tmp]
            result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            fetched = Path(tmp) / PINNED_SDIST_FILE
            if result.returncode != 0 or not fetched.is_file():
                raise BuildError(f"could not download {PINNED_SDIST}:\n{result.stdout[-3000:]}")
            os.replace(fetched, target)
    actual = sha256_file(target)
    if actual != PINNED_SDIST_SHA256:
        target.unlink()
        raise BuildError(f"{PINNED_SDIST_FILE} has sha256 {actual}, expected {PINNED_SDIST_SHA256}; "
                         "the download was removed, nothing was built")
    return target


def unpack_pinned_source(sdist: Path, tree: Path) -> None:
    """Unpack only ``vendor/llama.cpp`` of the sdist, atomically."""
    log(f"unpacking vendor/llama.cpp into {tree}")
    staging = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=tree.parent))
    try:
        with tarfile.open(sdist) as archive:
            for member in archive:
                if not member.name.startswith(PINNED_TREE_PREFIX) or member.name == PINNED_TREE_PREFIX:
                    continue
                relative = member.name[len(PINNED_TREE_PREFIX):]
                if relative.startswith("/") or ".." in Path(relative).parts:
                    raise BuildError(f"refusing unsafe path in sdist: {member.name}")
                if not (member.isfile() or member.isdir()):
                    continue  # no links or devices from an archive
                destination = staging / relative
                if member.isdir():
                    destination.mkdir(parents=True, exist_ok=True)
                    continue
                destination.parent.mkdir(parents=True, exist_ok=True)
                source = archive.extractfile(member)
                assert source is not None
                with source, open(destination, "wb") as out:
                    shutil.copyfileobj(source, out)
                os.chmod(destination, 0o755 if member.mode & 0o111 else 0o644)
        _check_tree(staging, origin="the pinned sdist")
        (staging / SOURCE_MARKER).write_text(PINNED_SDIST_SHA256 + "\n")
        os.replace(staging, tree)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# --------------------------------------------------------------------------
# 2. The native build
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class NativeBuild:
    """Where the native libraries and their headers are."""

    lib_dir: Path
    include_dirs: Tuple[Path, ...]
    bin_dir: Optional[Path] = None

    def library_files(self) -> List[Path]:
        """The real files (sonames) of the libraries we link, base first."""
        files = []
        for name in linked_libs():
            candidates = sorted(self.lib_dir.glob(f"lib{name}.so*")) + sorted(self.lib_dir.glob(f"lib{name}.dylib"))
            if not candidates:
                raise BuildError(f"lib{name} not found in {self.lib_dir}")
            files.append(_soname_file(candidates))
        return files

    def cpu_variant_files(self) -> List[Path]:
        """A portable build's CPU backend modules (``libggml-cpu-<variant>.so``), loaded at run time."""
        if not portable():
            return []
        return sorted(path for path in self.lib_dir.glob("libggml-cpu-*.so")
                      if path.name[len("libggml-cpu-"):-len(".so")] not in AMX_VARIANTS)


def linked_libs() -> Tuple[str, ...]:
    """The libraries the extension links: a portable build loads its CPU backend instead."""
    if portable():
        return tuple(name for name in NATIVE_LIBS if name != "ggml-cpu")
    return NATIVE_LIBS


def _soname_file(candidates: Sequence[Path]) -> Path:
    """Pick the file the dynamic linker will ask for (its SONAME), following links."""
    for path in candidates:
        soname = read_soname(path)
        if soname:
            named = path.parent / soname
            if named.exists():
                return named
    return candidates[0]


def read_soname(path: Path) -> Optional[str]:
    try:
        output = subprocess.run(["objdump", "-p", str(path)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True).stdout
    except FileNotFoundError:
        return None
    match = re.search(r"SONAME\s+(\S+)", output)
    return match.group(1) if match else None


def _env_flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() not in ("0", "off", "false", "no", "")


def portable() -> bool:
    """``CYLLAMA_PORTABLE=1``: ship every CPU variant, chosen at load time."""
    return _env_flag("CYLLAMA_PORTABLE", "0")


# A portable build: ggml's CPU backend is not linked into libggml but built once per
# instruction-set level as a module; ggml_backend_load_all_from_path() scores each
# against the running CPU and loads the best (see cyllama_cffi/_ffi.py).
PORTABLE_FLAGS = ["-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON"]

# ggml's AMX matrix kernels crash the process in the first prompt's matrix products on Intel
# Sapphire Rapids machines (a segmentation fault in ggml_backend_amx_mul_mat, also reported
# upstream as llama.cpp issue 20824, unfixed). Builds here leave them out: -march=native minus
# AMX on a CPU that has it, and a portable build does not ship the one variant compiled for
# AMX (ggml then loads the AVX-512 variant the CPU scores best for). Everything else
# -march=native enables stays. CYLLAMA_CMAKE_ARGS="-DCMAKE_C_FLAGS= -DCMAKE_CXX_FLAGS=" puts
# AMX back in a native build.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
AMX_VARIANTS = ("sapphirerapids",)


def cpu_has_amx() -> bool:
    """Whether -march=native would compile ggml's AMX kernels in (Linux x86: /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(line.startswith("flags") and " amx_tile" in line for line in cpuinfo)
    except OSError:
        return False


def cmake_flags() -> List[str]:
    backend = os.environ.get("CYLLAMA_BACKEND", "cpu").lower()
    if backend not in BACKEND_FLAGS:
        raise BuildError(f"CYLLAMA_BACKEND={backend!r}: choose one of {', '.join(BACKEND_FLAGS)}")
    native = _env_flag("CYLLAMA_NATIVE", "1") and not portable()
    flags = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=ON",
        "-DCMAKE_INSTALL_RPATH=$ORIGIN",
        "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=ON",  # configured, not compiled: llama-simple for the tests
        "-DLLAMA_BUILD_TOOLS=ON",  # llama-bench, llama-simple: built only when asked for
        "-DLLAMA_BUILD_SERVER=OFF",
        "-DLLAMA_BUILD_APP=OFF",
        "-DLLAMA_BUILD_COMMON=ON",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF",
        f"-DGGML_NATIVE={'ON' if native else 'OFF'}",
        *BACKEND_FLAGS[backend],
        *(PORTABLE_FLAGS if portable() else []),
    ]
    if native and cpu_has_amx():
        flags += [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
    flags += shlex.split(os.environ.get("CYLLAMA_CMAKE_ARGS", ""))
    return flags


def compiler_identity() -> str:
    parts = []
    for tool in (os.environ.get("CC", "cc"), os.environ.get("CXX", "c++")):
        try:
            parts.append(subprocess.run([tool, "--version"], stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True).stdout.splitlines()[0])
        except (FileNotFoundError, IndexError):
            parts.append(f"{tool}: missing")
    return " | ".join(parts)


def tree_hash(tree: Path) -> str:
    """Hash what the native build reads; the pinned tree is named by its sdist hash."""
    marker = tree / SOURCE_MARKER
    if marker.is_file():
        return "sdist:" + marker.read_text().strip()
    digest = hashlib.sha256()
    for top in ("CMakeLists.txt", "cmake", "include", "src", "ggml", "common", "tools", "vendor"):
        root = tree / top
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in paths:
            digest.update(str(path.relative_to(tree)).encode())
            digest.update(path.read_bytes())
    return "tree:" + digest.hexdigest()


def native_build_dir(tree: Path) -> Path:
    key_material = "\n".join([tree_hash(tree), *cmake_flags(), compiler_identity(), sys.platform])
    key = hashlib.sha256(key_material.encode()).hexdigest()[:16]
    # Portable builds live apart so a developer finds (and clears) them separately.
    return cache_root() / ("portable" if portable() else "native") / key


def build_native(targets: Sequence[str] = ("llama",)) -> NativeBuild:
    """Build (or reuse) libllama and friends; return where they are."""
    prebuilt = os.environ.get("CYLLAMA_LIBLLAMA_DIR")
    if prebuilt:
        lib_dir = Path(prebuilt).expanduser().resolve()
        include = Path(os.environ.get("CYLLAMA_LLAMA_INCLUDE") or lib_dir.parent / "include")
        include_dirs = tuple(Path(p).resolve() for p in str(include).split(os.pathsep))
        if not any((d / "llama.h").is_file() for d in include_dirs):
            raise BuildError(f"llama.h not found in {include}; set CYLLAMA_LLAMA_INCLUDE")
        native = NativeBuild(lib_dir, include_dirs)
        native.library_files()  # fail early and clearly when a library is missing
        return native

    tree = resolve_source()
    build_dir = native_build_dir(tree)
    cmake_dir = build_dir / "cmake"
    stamp = build_dir / ("done-" + "-".join(sorted(targets)))
    native = NativeBuild(cmake_dir / "bin", (tree / "include", tree / "ggml" / "include"), cmake_dir / "bin")
    if stamp.is_file() and _all_present(native):
        log(f"reusing cached native build {build_dir}")
        return native

    jobs = os.environ.get("CYLLAMA_BUILD_JOBS") or str(usable_cores())
    if not (cmake_dir / "CMakeCache.txt").is_file():
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        log(f"configuring llama.cpp in {cmake_dir}")
        _run_logged(["cmake", "-S", str(tree), "-B", str(cmake_dir), *generator, *cmake_flags()],
                    build_dir / "configure.log")
    log(f"compiling {', '.join(targets)} with {jobs} jobs (a cold build takes minutes)")
    _run_logged(["cmake", "--build", str(cmake_dir), "--parallel", jobs, "--target", *targets],
                build_dir / "build.log", progress=True)
    if not _all_present(native):
        raise BuildError(f"the native build finished but libraries are missing in {native.lib_dir}")
    stamp.write_text("ok\n")
    return native


def _all_present(native: NativeBuild) -> bool:
    try:
        native.library_files()
        return not portable() or bool(native.cpu_variant_files())
    except BuildError:
        return False


def _run_logged(command: List[str], log_path: Path, progress: bool = False) -> None:
    """Run a command, keep its full output in a log, show progress lines."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    last_shown = -1
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert process.stdout is not None
        for line in process.stdout:
            log_file.write(line)
            match = re.match(r"\[\s*(\d+)/(\d+)\]", line) or re.match(r"\[\s*(\d+)%\]", line)
            if progress and match:
                done = int(match.group(1))
                total = int(match.group(2)) if match.lastindex == 2 else 100
                percent = 100 * done // max(total, 1)
                if percent >= last_shown + 10 or done == total:
                    last_shown = percent
                    log(f"  {done}/{total} ({percent}%)")
        code = process.wait()
    if code != 0:
        tail = log_path.read_text()[-4000:]
        raise BuildError(f"{' '.join(command[:3])} failed with exit code {code}; full log: {log_path}\n{tail}")


# --------------------------------------------------------------------------
# 3. cdef generated from the headers
# --------------------------------------------------------------------------

def exported_symbols(libraries: Iterable[Path]) -> Set[str]:
    symbols: Set[str] = set()
    for library in libraries:
        output = subprocess.run(["nm", "-D", "--defined-only", str(library)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        if output.returncode != 0:
            raise BuildError(f"nm failed on {library}: {output.stderr}")
        for line in output.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1] in "TtWiV":
                symbols.add(parts[2].split("@")[0])
    return symbols


def preprocess(include_dirs: Sequence[Path], header: str = "llama.h") -> str:
    compiler = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "cdef_probe.c"
        probe.write_text(f'#include "{header}"\n')
        command = [compiler, "-E", "-std=c11", "-D__attribute__(x)=", "-D__restrict=", "-D__restrict__=",
                   "-D__extension__=", "-D__asm__(x)=", *[f"-I{d}" for d in include_dirs], str(probe)]
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise BuildError(f"preprocessing {header} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def _lines_from_headers(preprocessed: str, include_dirs: Sequence[Path]) -> Iterator[Tuple[str, str]]:
    """Yield (header file name, line) for lines that come from llama/ggml headers."""
    roots = tuple(str(d.resolve()) for d in include_dirs)
    current: Optional[str] = None
    for line in preprocessed.splitlines():
        marker = re.match(r'#\s*\d+\s+"([^"]+)"', line)
        if marker:
            path = os.path.realpath(marker.group(1))
            current = os.path.basename(path) if path.startswith(roots) else None
            continue
        if current and line.strip():
            yield current, line


def _split_declarations(lines: Iterable[Tuple[str, str]]) -> Iterator[Tuple[str, str]]:
    """Split the header text into top-level declarations; drop inline function bodies."""
    buffer: List[str] = []
    origin = ""
    depth = 0
    skipping_body = False
    for header, line in lines:
        for char in line + "\n":
            if not buffer and not char.strip():
                continue
            if not buffer:
                origin = header
            buffer.append(char)
            if char == "{":
                if depth == 0 and "".join(buffer[:-1]).rstrip().endswith(")"):
                    skipping_body = True
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0 and skipping_body:
                    buffer, skipping_body = [], False
            elif char == ";" and depth == 0:
                yield origin, " ".join("".join(buffer).split())
                buffer = []


def _sizeof_table() -> Dict[str, int]:
    table = {f"{sign}int{bits}_t": bits // 8 for sign in ("", "u") for bits in (8, 16, 32, 64)}
    table.update({"float": 4, "double": 8, "size_t": struct.calcsize("N"), "int": struct.calcsize("i"),
                  "char": 1, "void *": struct.calcsize("P")})
    return table


def _fold_sizeof_array_bounds(declaration: str) -> str:
    """``int32_t op_params[64 / sizeof(int32_t)]`` -> ``int32_t op_params[16]``."""
    sizes = _sizeof_table()

    def fold(match: "re.Match[str]") -> str:
        expression = re.sub(r"sizeof\s*\(\s*([\w\s\*]+?)\s*\)", lambda m: str(sizes[m.group(1)]), match.group(1))
        value = _eval_int(expression)
        if value is None:
            raise BuildError(f"cannot fold array bound [{match.group(1)}]")
        return f"[{value}]"

    return re.sub(r"\[([^\]]*sizeof[^\]]*)\]", fold, declaration)


def _eval_int(expression: str) -> Optional[int]:
    cleaned = re.sub(r"(?<=[0-9a-fA-F])[uUlL]+\b", "", expression)
    cleaned = cleaned.replace("/", "//")
    try:
        tree = ast.parse(cleaned, mode="eval")
    except SyntaxError:
        return None
    allowed = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.operator, ast.unaryop)
    if not all(isinstance(node, allowed) for node in ast.walk(tree)):
        return None
    value = eval(compile(tree, "<bound>", "eval"))  # only arithmetic on literals reaches here
    return value if isinstance(value, int) else None


def _function_name(declaration: str) -> Optional[str]:
    if declaration.startswith(("typedef ", "struct ", "enum ", "union ")) and "(" not in declaration.split("{")[0]:
        return None
    if declaration.startswith("typedef "):
        return None
    match = re.search(r"(\w+)\s*\(", declaration)
    return match.group(1) if match else None


def integer_constants(include_dirs: Sequence[Path]) -> List[str]:
    """The ``#define`` integer constants of the llama/ggml/gguf headers, as cdef lines."""
    compiler = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "macros.c"
        probe.write_text('#include "llama.h"\n')
        result = subprocess.run([compiler, "-E", "-dM", *[f"-I{d}" for d in include_dirs], str(probe)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise BuildError(f"listing macros failed:\n{result.stderr[-2000:]}")
    macros: Dict[str, str] = {}
    for line in result.stdout.splitlines():
        match = re.match(r"#define ((?:LLAMA|GGML|GGUF)_\w+) (.+)$", line)
        if match:
            macros[match.group(1)] = match.group(2).strip()

    def resolve(value: str, seen: int = 0) -> Optional[int]:
        if seen > 10:
            return None
        if value in macros:
            return resolve(macros[value], seen + 1)
        return _eval_int(value)

    lines = []
    for name in sorted(macros):
        if resolve(macros[name]) is not None:
            lines.append(f"#define {name} ...")
    return lines


def generate_cdef(native: NativeBuild) -> str:
    """Turn the preprocessed headers into a cdef cffi accepts."""
    exported = exported_symbols(native.library_files())
    text = preprocess(native.include_dirs)
    seen: Set[str] = set()
    kept: List[str] = []
    dropped: List[str] = []
    for header, declaration in _split_declarations(_lines_from_headers(text, native.include_dirs)):
        if declaration.startswith("static "):
            continue  # header-only constants such as GGML_TENSOR_SIZE
        declaration = _fold_sizeof_array_bounds(declaration)
        if declaration.startswith("extern "):
            declaration = declaration[len("extern "):]
        name = _function_name(declaration)
        if name is not None:
            if header not in FUNCTION_HEADERS:
                continue
            if name not in exported:
                dropped.append(name)
                continue
        if declaration in seen:
            continue  # identical typedefs repeated across ggml headers
        seen.add(declaration)
        kept.append(declaration)
    if dropped:
        log(f"cdef: left out {len(dropped)} declared functions the libraries do not export: "
            + ", ".join(sorted(dropped)[:10]) + (" ..." if len(dropped) > 10 else ""))
    constants = integer_constants(native.include_dirs)
    return "\n".join(kept + constants) + "\n"


# --------------------------------------------------------------------------
# 4. The cffi builder
# --------------------------------------------------------------------------

def shim_declarations() -> str:
    """The part of csrc/cyllama_shim.h between the cdef markers."""
    header = (SHIM_DIR / "cyllama_shim.h").read_text()
    match = re.search(r"/\* BEGIN CDEF \*/(.*)/\* END CDEF \*/", header, re.S)
    if not match:
        raise BuildError("csrc/cyllama_shim.h has no BEGIN CDEF / END CDEF section")
    return match.group(1)


# cyl_py_log is "Python+C": cffi then defines it with external linkage, so the shim
# (a separate translation unit) can call it; the other two are only passed as pointers.
PYTHON_CALLBACKS = """
extern "Python+C" void cyl_py_log(int level, const char *text);
extern "Python" bool cyl_py_abort(void *user_data);
extern "Python" bool cyl_py_progress(float progress, void *user_data);
"""


# The C prelude of the module cffi generates: the declarations its cdef names.
CFFI_SOURCE = '#include "llama.h"\n#include "cyllama_shim.h"\n'


def extension_settings(native: NativeBuild, link_dir: Optional[Path] = None) -> Dict[str, List[str]]:
    """How the extension is compiled and linked, as keyword arguments of a setuptools
    ``Extension`` (and of cffi's ``set_source``, which passes them on to one).

    ``sources`` are the C files compiled besides the one cffi generates (the shim),
    with absolute paths: cffi compiles from a temporary directory. ``link_dir``
    holds the libraries to link (default: native.lib_dir).
    """
    link_dir = link_dir or native.lib_dir
    link_files = [str(link_dir / path.name) for path in native.library_files()]
    if sys.platform == "darwin":
        link_args = [*link_files, "-Wl,-rpath,@loader_path"]
    else:
        # -ldl: dlopen/dlsym (the shim's OpenMP look-up) live in libdl before glibc 2.34
        link_args = [*link_files, "-Wl,-rpath,$ORIGIN", "-Wl,--no-as-needed", "-ldl"]
    return {
        "sources": [str(SHIM_DIR / "cyllama_shim.c")],
        "depends": [str(SHIM_DIR / "cyllama_shim.h")],
        "include_dirs": [str(d) for d in native.include_dirs] + [str(SHIM_DIR)],
        "extra_link_args": link_args,
        "extra_compile_args": ["-O2", "-std=gnu11"],
    }


def make_ffibuilder(native: NativeBuild, link_dir: Optional[Path] = None):
    """Create the FFI. ``link_dir`` holds the libraries to link (default: native.lib_dir)."""
    import cffi

    ffibuilder = cffi.FFI()
    ffibuilder.cdef(generate_cdef(native))
    ffibuilder.cdef(shim_declarations())
    ffibuilder.cdef(PYTHON_CALLBACKS)
    ffibuilder.set_source(MODULE_NAME, CFFI_SOURCE, **extension_settings(native, link_dir))
    return ffibuilder


def copy_libraries(native: NativeBuild, destination: Path) -> List[Path]:
    """Copy the native libraries (under their soname, no symlinks) next to the module,
    and a portable build's CPU variants, which the package loads from its own directory."""
    destination.mkdir(parents=True, exist_ok=True)
    copied = []
    for source in [*native.library_files(), *native.cpu_variant_files()]:
        target = destination / source.name
        real = source.resolve()
        if not (target.exists() and target.stat().st_size == real.stat().st_size
                and target.stat().st_mtime >= real.stat().st_mtime):
            tmp = target.with_name(target.name + ".tmp")
            shutil.copy2(real, tmp)
            os.replace(tmp, target)
        copied.append(target)
    return copied


def build_inplace() -> Path:
    """Developer entry point: build everything into ./cyllama_cffi."""
    native = build_native()
    package = HERE / "cyllama_cffi"
    copy_libraries(native, package)
    ffibuilder = make_ffibuilder(native, link_dir=package)
    with tempfile.TemporaryDirectory() as tmp:
        built = ffibuilder.compile(tmpdir=tmp, verbose=False)
        target = package / Path(built).name
        shutil.copy2(built, target)
    log(f"built {target}")
    return target


if __name__ == "__main__":
    try:
        build_inplace()
    except BuildError as error:
        sys.exit(f"build failed: {error}")
