"""No input crashes the process: bad model files, mutated GGUFs, API misuse, shutdown.

Every risky case runs in a child process (``crashproof.Worker``): a crash is a
negative return code there, reported against the case, instead of killing
pytest. Each case must end in success or a clean Python exception. Model
files are mutants of the tiny models of ``tiny_gguf`` (both tokenizer kinds),
so thousands of loads take seconds.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable, Dict, List

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import robustness_cases
from crashproof import Case, Outcome, Worker, mutant_case
from cyllama_cffi._gguf_check import InvalidGGUFError, check_gguf
from tiny_gguf import TinySpec, bpe_vocabulary, field_map, header_size, vocabulary, write_tiny_llama

FUZZ_EXAMPLES = int(os.environ.get("CYLLAMA_FUZZ_EXAMPLES", "300"))
INTERESTING = (0, 1, 2, 3, 7, 8, 31, 32, 33, 63, 64, 255, 256, 511, 512, 513, 1024, 65535, 65536,
               2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1)


def describe(outcomes: List[Outcome]) -> str:
    return "\n".join(f"{o.case_id}: {o.status} rc={o.returncode} {o.error} {o.message[:300]}\n{o.stderr[-1200:]}"
                     for o in outcomes)


def assert_all_clean(outcomes: List[Outcome]) -> None:
    bad = [o for o in outcomes if not o.is_clean()]
    assert not bad, describe(bad)


@pytest.fixture(scope="module")
def worker():
    with Worker(timeout=120) as child:
        yield child


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Dict[str, Path]:
    """The tiny models: SentencePiece, byte-level BPE, and one with general.alignment = 64."""
    root = tmp_path_factory.mktemp("tiny")
    return {"llama": write_tiny_llama(root / "llama.gguf"),
            "gpt2": write_tiny_llama(root / "gpt2.gguf", TinySpec(tokenizer="gpt2")),
            "aligned": write_tiny_llama(root / "aligned.gguf", TinySpec(alignment=64))}


# -- the tiny models themselves --------------------------------------------------------------

@pytest.mark.parametrize("tokenizer", ["llama", "gpt2"])
def test_tiny_model_loads_and_generates(tmp_path, tokenizer):
    from cyllama_cffi import LLM, LlamaModel

    path = write_tiny_llama(tmp_path / "tiny.gguf", TinySpec(tokenizer=tokenizer))
    assert path.stat().st_size < 300_000
    with LlamaModel(path) as model:
        assert (model.n_layer, model.n_embd, model.n_head) == (2, 32, 2)
        assert model.metadata["general.architecture"] == "llama"
        assert model.metadata["tokenizer.ggml.model"] == tokenizer
        assert model.vocab.detokenize(model.vocab.tokenize("the cat sat", add_special=False)).strip() == "the cat sat"
    with LLM(path, temperature=0.0, max_tokens=6, n_threads=1) as llm:
        first = llm("the cat sat")
        assert first.stats.generated_tokens > 0 and first.finish_reason in ("stop", "length")
        assert llm("the cat sat").text == first.text  # greedy is deterministic
        assert llm.vocab.n_tokens == len(bpe_vocabulary() if tokenizer == "gpt2" else vocabulary())


# -- paths that are not model files -----------------------------------------------------------

def test_missing_directory_empty_and_foreign_files(worker, tmp_path, tiny):
    cases = {"missing": tmp_path / "missing.gguf", "directory": tmp_path, "broken_symlink": tmp_path / "link.gguf",
             "empty": tmp_path / "empty.gguf", "text": tmp_path / "notes.gguf", "zeros": tmp_path / "zeros.gguf",
             "elf": Path(sys.executable).resolve(), "fifo": tmp_path / "fifo.gguf", "dev_zero": Path("/dev/zero"),
             "magic_only": tmp_path / "magic.gguf", "version_1": tmp_path / "v1.gguf",
             "version_huge": tmp_path / "vhuge.gguf", "nul_in_path": Path(str(tmp_path) + "/a\0b.gguf")}
    (tmp_path / "link.gguf").symlink_to(tmp_path / "nowhere.gguf")
    cases["empty"].write_bytes(b"")
    cases["text"].write_text("this is not a model\n" * 50)
    cases["zeros"].write_bytes(bytes(4096))
    os.mkfifo(cases["fifo"])  # opening it for reading would block forever
    cases["magic_only"].write_bytes(b"GGUF")
    good = tiny["llama"].read_bytes()
    cases["version_1"].write_bytes(good[:4] + struct.pack("<I", 1) + good[8:])
    cases["version_huge"].write_bytes(good[:4] + struct.pack("<I", 0xFFFF0003) + good[8:])
    outcomes = worker.run([Case(name, "file", str(path)) for name, path in cases.items()])
    assert_all_clean(outcomes)
    errors = {o.case_id: o.error for o in outcomes}
    assert errors["missing"] == errors["broken_symlink"] == errors["nul_in_path"] == "FileNotFoundError"
    assert errors["directory"] == "IsADirectoryError"
    assert all(errors[name] == "InvalidGGUFError" for name in
               ("empty", "text", "zeros", "elf", "fifo", "dev_zero", "magic_only", "version_1", "version_huge"))


# setpriv without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH: root then obeys file modes like anyone
DROP_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def test_unreadable_file(worker, tmp_path, tiny):
    """chmod 000 -> PermissionError. Tests run as root here, and root reads any file (the
    DAC-override capability), so a mode-000 model simply loads; the PermissionError path is
    then tested in a worker started without that capability."""
    locked = tmp_path / "locked.gguf"
    locked.write_bytes(tiny["llama"].read_bytes())
    locked.chmod(0)
    try:
        as_is = worker.run_one(Case("unreadable", "file", str(locked)))
        if os.access(locked, os.R_OK):  # root: the mode bits do not stop a read
            assert os.geteuid() == 0 and as_is.status == "ok", describe([as_is])
            assert shutil.which("setpriv"), "as root, the PermissionError path needs setpriv (util-linux)"
            with Worker(timeout=120, prefix=DROP_DAC) as unprivileged:
                denied = unprivileged.run_one(Case("unreadable-without-dac-override", "file", str(locked)))
        else:
            denied = as_is
    finally:
        locked.chmod(0o644)
    assert denied.status == "error" and denied.error == "PermissionError", describe([denied])


def test_truncated_at_every_kind_of_boundary(worker, tiny):
    cases = []
    for name, path in tiny.items():
        data = path.read_bytes()
        cuts = {0, 3, 4, 8, 16, 23, 24, header_size(data) - 1, header_size(data), len(data) // 2, len(data) - 1}
        cuts |= {field.offset + field.width // 2 for field in field_map(data)[::25]}  # inside header fields
        cases += [mutant_case(f"{name}[:{cut}]", path, truncate=cut) for cut in sorted(cuts)]
    outcomes = worker.run(cases)
    assert len(outcomes) == len(cases) >= 30
    assert_all_clean(outcomes)
    assert all(o.status == "error" for o in outcomes)  # a cut file never loads


# -- header-field mutations: every kind of field, the values that break parsers -------------------

def test_every_kind_of_header_field_with_boundary_values(worker, tiny):
    cases = []
    for name, path in tiny.items():
        by_kind: Dict[str, list] = {}
        for field in field_map(path.read_bytes()):
            by_kind.setdefault(field.kind, []).append(field)
        for kind, fields in sorted(by_kind.items()):
            for field in (fields[0], fields[len(fields) // 2]):  # the first and a middle one
                for value in INTERESTING:
                    raw = (value % (1 << 8 * field.width)).to_bytes(field.width, "little")
                    cases.append(mutant_case(f"{name}:{kind}:{field.label}={value}", path, [(field.offset, raw)]))
    outcomes = worker.run(cases)
    kinds = {case.case_id.split(":")[1] for case in cases}
    assert {"n_tensors", "n_kv", "key_len", "value_type", "array_type", "array_len", "string_len", "name_len",
            "n_dims", "dim", "tensor_type", "tensor_offset", "alignment", "value"} <= kinds
    assert len(outcomes) == len(cases) >= 1000
    assert_all_clean(outcomes)


# -- Hypothesis: random byte flips and field mutations, shrunk to the smallest crasher -------------

def _mutation():
    flip = st.tuples(st.just("flip"), st.integers(0, 10 ** 9), st.integers(1, 255))
    field = st.tuples(st.just("field"), st.integers(0, 10 ** 9),
                      st.one_of(st.sampled_from(INTERESTING), st.integers(0, 2 ** 64 - 1)))
    nudge = st.tuples(st.just("nudge"), st.integers(0, 10 ** 9), st.integers(-64, 64))
    return st.one_of(flip, field, nudge)


def apply_mutations(data: bytes, mutations, header_only: bool) -> bytes:
    """Apply (kind, where, value) mutations; positions are taken modulo what they index."""
    out = bytearray(data)
    fields = field_map(data)
    limit = header_size(data) + 64 if header_only else len(data)
    for kind, where, value in mutations:
        if kind == "flip":
            out[where % limit] ^= value
            continue
        target = fields[where % len(fields)]
        old = int.from_bytes(out[target.offset:target.offset + target.width], "little")
        new = value if kind == "field" else old + value
        out[target.offset:target.offset + target.width] = (new % (1 << 8 * target.width)).to_bytes(
            target.width, "little")
    return bytes(out)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(base=st.sampled_from(["llama", "gpt2", "aligned"]), header_only=st.booleans(),
       mutations=st.lists(_mutation(), min_size=1, max_size=4))
def test_mutated_tiny_models_never_crash(worker, tiny, base, header_only, mutations):
    original = tiny[base].read_bytes()
    mutant = apply_mutations(original, mutations, header_only)
    patches = [(offset, mutant[offset:offset + 1]) for offset in range(len(mutant)) if mutant[offset] != original[offset]]
    outcome = worker.run_one(mutant_case(f"{base} {mutations}", tiny[base], patches))
    assert outcome.is_clean(), describe([outcome])


# -- each rule of the pre-check prevents a real crash ----------------------------------------------

def _set_field(data: bytearray, kind: str, label: str, packed: bytes) -> bytearray:
    field = next(f for f in field_map(bytes(data)) if f.kind == kind and f.label == label)
    data[field.offset:field.offset + field.width] = packed
    return data


def _set_string(data: bytearray, key: str, new: bytes) -> bytearray:
    """Replace a string value in place (same length; a NUL ends it for llama.cpp)."""
    field = next(f for f in field_map(bytes(data)) if f.kind == "string_len" and f.label == key)
    length = int.from_bytes(data[field.offset:field.offset + 8], "little")
    assert len(new) == length
    data[field.offset + 8:field.offset + 8 + length] = new
    return data


def _replace(data: bytearray, old: bytes, new: bytes) -> bytearray:
    assert len(old) == len(new) and old in data
    start = data.index(old)
    data[start:start + len(old)] = new
    return data


def _tiny(tmp_path: Path, tokenizer: str = "llama", **kwargs) -> bytearray:
    spec_fields = {k: kwargs.pop(k) for k in ("alignment",) if k in kwargs}
    path = write_tiny_llama(tmp_path / "base.gguf", TinySpec(tokenizer=tokenizer, **spec_fields), **kwargs)
    return bytearray(path.read_bytes())


_u32 = struct.Struct("<I").pack
_f32 = struct.Struct("<f").pack
RULES: Dict[str, Callable[[Path], bytearray]] = {
    "block_count_0": lambda t: _set_field(_tiny(t), "value", "llama.block_count", _u32(0)),
    "block_count_513": lambda t: _set_field(_tiny(t), "value", "llama.block_count", _u32(513)),
    "nextn_over_block_count": lambda t: _tiny(t, extra=lambda w: w.add_uint32("llama.nextn_predict_layers", 5)),
    "expert_used_without_experts": lambda t: _tiny(t, extra=lambda w: w.add_uint32("llama.expert_used_count", 2)),
    "expert_count_over_1024": lambda t: _tiny(t, extra=lambda w: (w.add_uint32("llama.expert_count", 2000),
                                                                   w.add_uint32("llama.expert_used_count", 2))),
    "expert_groups_not_below_expert_count": lambda t: _tiny(t, extra=lambda w: (
        w.add_uint32("llama.expert_count", 4), w.add_uint32("llama.expert_used_count", 2),
        w.add_uint32("llama.expert_group_count", 4))),
    "rope_scaling_unknown": lambda t: _tiny(t, extra=lambda w: w.add_string("llama.rope.scaling.type", "bogus")),
    "rms_eps_nan": lambda t: _set_field(_tiny(t), "value", "llama.attention.layer_norm_rms_epsilon",
                                        _f32(float("nan"))),
    "rms_eps_negative": lambda t: _set_field(_tiny(t), "value", "llama.attention.layer_norm_rms_epsilon",
                                             _f32(-1e-5)),
    "duplicate_token": lambda t: _replace(_tiny(t), b"<0x41>", b"<0x42>"),
    "duplicate_token_after_nul": lambda t: _replace(_tiny(t), b"\x04\0\0\0\0\0\0\0\xe2\x96\x81a",
                                                    b"\x04\0\0\0\0\0\0\0\xe2\x96\x81\0"),  # "▁a" reads as "▁"
    "spm_byte_token_missing": lambda t: _replace(_tiny(t), b"<0x41>", b"<0xZZ>"),
    "wordpiece_with_byte_tokens": lambda t: _set_string(_tiny(t), "tokenizer.ggml.model", b"bert\0"),
    "no_vocabulary": lambda t: _set_string(_tiny(t), "tokenizer.ggml.model", b"none\0"),
    "bos_added_but_missing": lambda t: _set_field(
        _set_string(_tiny(t, "gpt2"), "tokenizer.ggml.model", b"t5\0\0"), "value", "tokenizer.ggml.bos_token_id",
        _u32(99999)),
    "i32_weights": lambda t: _set_field(_tiny(t), "tensor_type", "blk.0.attn_q.weight", _u32(26)),
    "tensor_data_misaligned": lambda t: _tiny(t, alignment=8),
}


def test_every_precheck_rule_prevents_a_real_crash(worker, tmp_path):
    """Without the pre-check llama.cpp aborts or segfaults on each file; with it, InvalidGGUFError.

    If a llama.cpp update makes one of them load cleanly, this fails: the rule
    (in cyllama_cffi/_gguf_semantics.py or _gguf_check.py) can then go.
    """
    cases = []
    for name, build in RULES.items():
        folder = tmp_path / name
        folder.mkdir()
        target = folder / "model.gguf"
        target.write_bytes(build(folder))
        with pytest.raises(InvalidGGUFError):
            check_gguf(target)
        cases += [Case(name, "file", str(target)), Case(name + "!unchecked", "file_unchecked", str(target))]
    outcomes = {o.case_id: o for o in worker.run(cases)}
    assert len(outcomes) == 2 * len(RULES)
    for name in RULES:
        refused, crashed = outcomes[name], outcomes[name + "!unchecked"]
        assert refused.error == "InvalidGGUFError", describe([refused])
        assert crashed.status == "crash" and crashed.returncode < 0, f"{name} no longer crashes llama.cpp: " + \
            describe([crashed])


def test_precheck_accepts_the_default_model(model_path):
    summary = check_gguf(model_path)
    assert summary["n_tensors"] > 200 and summary["version"] == 3


def test_precheck_accepts_every_real_vocabulary_shipped_with_llama_cpp(llama_cpp_dir):
    """No false alarms: llama.cpp's own vocabulary files (SentencePiece, WordPiece, a dozen BPE
    pre-tokenizers, Gemma 4) all pass the rules, which are stricter than llama.cpp only where it aborts."""
    vocabularies = sorted((llama_cpp_dir / "models").glob("ggml-vocab-*.gguf"))
    assert len(vocabularies) >= 15
    for path in vocabularies:
        assert check_gguf(path)["n_kv"] > 0, path


# -- API misuse ----------------------------------------------------------------------------------

def test_api_misuse_ends_in_clean_exceptions(worker, tiny, model_path):
    models = {"spm": str(tiny["llama"]), "bpe": str(model_path)}
    cases = [Case(f"{name}[{kind}]", "api", f"{name}::{path}")
             for kind, path in models.items() for name in robustness_cases.CASES]
    outcomes = worker.run(cases)
    assert len(outcomes) == len(cases) > 40
    failed = [o for o in outcomes if o.status != "ok"]  # each case asserts its exact exception itself
    assert not failed, describe(failed)


# -- interpreter shutdown with live objects --------------------------------------------------------

SHUTDOWN_SCRIPTS = {
    "live_llm": """
        llm = LLM(MODEL, n_threads=1, temperature=0.0, max_tokens=4)
        llm("the cat sat")
    """,
    "stream_suspended_mid_generation": """
        llm = LLM(MODEL, n_threads=1, temperature=0.0, max_tokens=50)
        stream = llm("the cat sat", stream=True)
        next(stream)
        other = LLM(MODEL, n_threads=1, temperature=0.0, max_tokens=50)
        never_started = other.stream("once upon a time")
    """,
    "raw_objects": """
        model = LlamaModel(MODEL)
        ctx, ctx2 = LlamaContext(model, n_ctx=64, n_threads=1), LlamaContext(model, n_ctx=64, n_threads=1)
        batch = LlamaBatch(16)
        grammar = LlamaSampler().add_grammar(model.vocab, 'root ::= [a-z]+').add_greedy()
        batch.set_tokens(model.vocab.tokenize("the cat"), 0)
        ctx.decode(batch)
        grammar.sample(ctx)
        ctx2.set_abort_callback(lambda: False)  # a Python callback still installed at exit
        ctx2.decode(batch)
    """,
    "reference_cycles_with_gc_off": """
        import gc
        gc.disable()
        class Holder: pass
        holder = Holder(); holder.me = holder
        holder.llm = LLM(MODEL, n_threads=1, temperature=0.0, max_tokens=50)
        holder.stream = holder.llm("the cat sat", stream=True); next(holder.stream)
        holder.llm.back = holder
    """,
    "sigint_handler_never_restored": """
        llm = LLM(MODEL, n_threads=1, temperature=0.0, max_tokens=50)
        handle = llm.install_sigint_handler()
        stream = llm("the cat sat", stream=True); next(stream)
    """,
    "daemon_thread_parked_between_tokens": """
        import threading
        llm = LLM(MODEL, n_threads=1, temperature=0.0, max_tokens=50)
        stream = llm("the cat sat", stream=True)
        parked = threading.Event()
        def work():
            next(stream)
            parked.set()
            threading.Event().wait()  # holds the live stream forever
        threading.Thread(target=work, daemon=True).start()
        parked.wait()
    """,
    "sys_exit_after_worker_thread": """
        import sys, threading
        llm = LLM(MODEL, n_threads=1, temperature=0.0, max_tokens=20)
        worker = threading.Thread(target=lambda: list(llm("the cat sat", stream=True)))
        worker.start(); worker.join()
        print("END", flush=True)
        sys.exit(0)  # the END printed after the script is never reached
    """,
    # The exit hook aborts the decode and closes the context before the finalizers run.
    "daemon_thread_decoding": """
        import threading
        llm = LLM(MODEL, n_threads=1, temperature=0.0, max_tokens=5000, n_ctx=4096)
        stream = llm("the cat sat", stream=True)
        started = threading.Event()
        def work():
            for index, _ in enumerate(stream):
                if index == 2:
                    started.set()
        threading.Thread(target=work, daemon=True).start()
        started.wait()
    """,
}
# The default model's decodes are long enough that a daemon thread is inside llama_decode at
# exit every time, on PyPy too (with the tiny model the race is rarely even run).
LONG_DECODES = {"daemon_thread_decoding"}
_PRELUDE = "import sys\nfrom cyllama_cffi import LLM, LlamaModel, LlamaContext, LlamaBatch, LlamaSampler\nMODEL = sys.argv[1]\n"


def run_script(body: str, model: Path) -> subprocess.CompletedProcess:
    code = _PRELUDE + textwrap.dedent(body) + "\nprint('END', flush=True)\n"
    return subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONFAULTHANDLER="1"))


@pytest.mark.parametrize("name", sorted(SHUTDOWN_SCRIPTS))
def test_interpreter_shutdown_with_live_objects(name, tiny, model_path):
    result = run_script(SHUTDOWN_SCRIPTS[name], model_path if name in LONG_DECODES else tiny["llama"])
    assert result.returncode == 0 and result.stdout.rstrip().endswith("END"), (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr and "Fatal Python error" not in result.stderr, result.stderr[-3000:]
    assert "Exception ignored" not in result.stderr, result.stderr[-3000:]
