"""LoRA adapters: they change the model exactly as merged weights would, and bad ones change nothing.

The model is ``tiny_gguf``'s tiny llama; its adapters are written the way llama.cpp's
``convert_lora_to_gguf.py`` writes them. The reference for "what an adapter should do" is the
same tiny model with ``scale * alpha / rank * B @ A`` added to its weights in numpy
(``write_tiny_llama(deltas=...)``): its logits must equal those of the base model with the
adapter applied. Risky files go through ``crashproof``'s child process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO
from crashproof import Worker, lora_case
from test_robustness import INTERESTING, apply_mutations, assert_all_clean, describe
from tiny_gguf import TinySpec, field_map, header_size, merged_deltas, random_lora, write_tiny_llama, write_tiny_lora

from cyllama_cffi import LLM, ClosedError, InvalidGGUFError, LLMBusyError, StateError
from cyllama_cffi.lowlevel import LlamaBatch, LlamaContext, LlamaModel, LoraAdapter

PROMPT = "the cat sat on the mat"
FUZZ_EXAMPLES = int(os.environ.get("CYLLAMA_FUZZ_EXAMPLES", "300")) // 3
# adapter A: alpha 4, rank 2, on a matrix of each kind (attention, FFN, output, token embedding)
TARGETS_A = ["blk.0.attn_q.weight", "blk.1.ffn_down.weight", "output.weight", "token_embd.weight"]
# adapter B: no alpha (the scale applies as given), rank 3
TARGETS_B = ["blk.0.ffn_up.weight", "blk.1.attn_v.weight", "blk.1.attn_output.weight"]
ALPHA_A = 4.0


class Files:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.base = write_tiny_llama(root / "base.gguf")
        self.pairs_a = random_lora(TARGETS_A, rank=2, seed=7)
        self.pairs_b = random_lora(TARGETS_B, rank=3, seed=8)
        self.a = write_tiny_lora(root / "a.gguf", self.pairs_a, alpha=ALPHA_A)
        self.b = write_tiny_lora(root / "b.gguf", self.pairs_b)
        self._merged: Dict[Tuple, Path] = {}

    def merged(self, scale_a: float = 0.0, scale_b: float = 0.0) -> Path:
        """The base model with the adapters' deltas added to its weights."""
        key = (scale_a, scale_b)
        if key not in self._merged:
            deltas = merged_deltas([(self.pairs_a, ALPHA_A, scale_a), (self.pairs_b, 0.0, scale_b)])
            self._merged[key] = write_tiny_llama(self.root / f"merged-{len(self._merged)}.gguf", deltas=deltas)
        return self._merged[key]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    return Files(tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def worker():
    with Worker(timeout=120) as child:
        yield child


def last_logits(model_path: Path, adapters: Sequence[Tuple[Path, float]] = ()) -> np.ndarray:
    """The logits after PROMPT, computed by llama.cpp with ``adapters`` applied."""
    with LlamaModel(model_path) as model, LlamaContext(model, n_ctx=64, n_threads=1) as ctx, \
            LlamaBatch(64) as batch:
        loaded = [(LoraAdapter(model, path), scale) for path, scale in adapters]
        ctx.set_lora_adapters(loaded)
        batch.set_tokens(model.vocab.tokenize(PROMPT), 0)
        ctx.decode(batch)
        return ctx.get_logits_ith(-1).copy()


def greedy(llm: LLM, prompt: str = PROMPT) -> str:
    return llm(prompt).text


def make_llm(path: Path, **kwargs) -> LLM:
    return LLM(path, temperature=0.0, max_tokens=8, n_threads=1, **kwargs)


# -- the adapter does what the math says ------------------------------------------------------------

def test_adapter_logits_equal_those_of_the_merged_weights(files):
    base = last_logits(files.base)
    adapted = last_logits(files.base, [(files.a, 0.7)])
    merged = last_logits(files.merged(scale_a=0.7))
    assert np.abs(adapted - base).max() > 0.5  # it does change the model
    np.testing.assert_allclose(adapted, merged, rtol=0, atol=1e-4)


def test_two_adapters_add_up(files):
    adapted = last_logits(files.base, [(files.a, 0.5), (files.b, -1.5)])
    merged = last_logits(files.merged(scale_a=0.5, scale_b=-1.5))
    # B's delta is large (no alpha): float32 rounding through two layers reaches ~5e-4
    np.testing.assert_allclose(adapted, merged, rtol=0, atol=2e-3)
    alone = last_logits(files.base, [(files.a, 0.5)])
    assert np.abs(adapted - alone).max() > 0.1  # B does its part
    # without alpha the scale applies as given, not divided by the rank (3)
    assert np.abs(adapted - last_logits(files.merged(scale_a=0.5, scale_b=-0.5))).max() > 0.1


def test_scale_zero_is_exactly_the_base_model(files):
    np.testing.assert_array_equal(last_logits(files.base, [(files.a, 0.0)]), last_logits(files.base))


def test_llm_generates_as_the_merged_model_does(files):
    with make_llm(files.merged(scale_a=1.0)) as merged, make_llm(files.base) as base:
        expected, plain = greedy(merged), greedy(base)
    assert expected != plain
    with make_llm(files.base, lora=files.a) as llm:  # a bare path: scale 1.0
        assert llm.lora == [(str(files.a), 1.0)]
        assert greedy(llm) == expected


@pytest.mark.parametrize("form", ["mapping", "pairs", "one_pair"])
def test_every_form_of_the_lora_argument(files, form):
    spec = {"mapping": {files.a: 0.5, str(files.b): -1.5},
            "pairs": [(files.a, 0.5), (str(files.b), -1.5)],
            "one_pair": (files.a, 0.5)}[form]
    expected_file = files.merged(scale_a=0.5) if form == "one_pair" else files.merged(scale_a=0.5, scale_b=-1.5)
    with make_llm(expected_file) as merged:
        expected = greedy(merged)
    with make_llm(files.base, lora=spec) as llm:
        assert greedy(llm) == expected


# -- changing adapters on a live LLM -----------------------------------------------------------------

def test_set_lora_changes_scales_and_removing_restores_the_base_output(files):
    with make_llm(files.base) as base:
        plain = greedy(base)
    with make_llm(files.merged(scale_a=1.0)) as merged:
        at_one = greedy(merged)
    with make_llm(files.merged(scale_a=-2.0)) as merged:
        at_minus_two = greedy(merged)
    assert len({plain, at_one, at_minus_two}) == 3
    with make_llm(files.base) as llm:
        assert greedy(llm) == plain
        llm.set_lora({files.a: 1.0})
        assert greedy(llm) == at_one  # the cached prompt, computed without the adapter, is not reused
        adapter = llm._lora[0][0]
        llm.set_lora({files.a: -2.0})
        assert llm._lora[0][0] is adapter  # only the scale changed: the file is not read again
        assert greedy(llm) == at_minus_two
        llm.set_lora(None)
        assert llm.lora == [] and adapter.closed
        assert greedy(llm) == plain


def test_the_response_cache_forgets_answers_of_other_adapters(files):
    with make_llm(files.base, cache_size=8, seed=1) as llm:
        plain = greedy(llm)
        assert greedy(llm) == plain and llm.cache_info().hits == 1
        llm.set_lora([(files.a, 1.0)])
        assert greedy(llm) != plain and llm.cache_info().hits == 0


def test_streaming_and_cancelling_with_an_adapter(files):
    with make_llm(files.base, lora=[(files.a, 1.0)]) as llm:
        whole = greedy(llm)
        with llm(PROMPT, stream=True) as stream:
            assert "".join(stream) == whole
        stream = llm(PROMPT, stream=True, config=llm.config.replace(max_tokens=50))
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            llm.cancel()
        assert stream.finish_reason == "cancelled" and len(chunks) == 1
        with pytest.raises(LLMBusyError):
            running = llm(PROMPT, stream=True)
            next(running)
            llm.set_lora(None)
        running.close()
        assert greedy(llm) == whole


def test_a_saved_state_is_for_the_same_adapters_only(files):
    with make_llm(files.base, lora=[(files.a, 1.0)]) as llm:
        greedy(llm)
        state = llm.save_state()
    with make_llm(files.base) as plain:
        with pytest.raises(StateError, match="other LoRA adapters"):
            plain.load_state(state)
    with make_llm(files.base, lora=[(files.a, 0.5)]) as other_scale:
        with pytest.raises(StateError, match="other LoRA adapters"):
            other_scale.load_state(state)
    with make_llm(files.base, lora=[(files.a, 1.0)]) as llm:
        llm.load_state(state)


# -- bad input: a clear exception, and the LLM as it was ------------------------------------------------

def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def bad_adapters(files: Files, root: Path) -> Dict[str, Tuple[Path, type, str]]:
    """name -> (file, exception class, words of its message)."""
    root.mkdir(exist_ok=True)
    other_spec = TinySpec(n_embd=64, n_ff=128)
    return {
        "missing": (root / "nope.gguf", FileNotFoundError, "not found"),
        "directory": (root, IsADirectoryError, "directory"),
        "not_gguf": (_write(root / "text.gguf", b"hello, this is not a GGUF file at all\n"), InvalidGGUFError,
                     "not a GGUF file"),
        "truncated": (_write(root / "cut.gguf", files.a.read_bytes()[:-40]), InvalidGGUFError, "tensor"),
        "a_model": (files.base, InvalidGGUFError, "not a LoRA adapter"),
        "control_vector": (write_tiny_lora(root / "cv.gguf", files.pairs_a, adapter_type="control_vector"),
                           InvalidGGUFError, "adapter.type"),
        "other_arch": (write_tiny_lora(root / "arch.gguf", files.pairs_a, arch="gpt2"), InvalidGGUFError,
                       "architecture 'gpt2'"),
        "other_embedding_size": (write_tiny_lora(root / "n_embd.gguf", random_lora(TARGETS_A, spec=other_spec)),
                                 InvalidGGUFError, "do not fit"),
        "tensor_not_in_model": (write_tiny_lora(root / "layer9.gguf",
                                                {"blk.9.attn_q.weight": files.pairs_a["blk.0.attn_q.weight"]}),
                                InvalidGGUFError, "does not have"),
        "half_a_pair": (write_tiny_lora(root / "half.gguf", {}, extra=lambda w: w.add_tensor(
            "blk.0.attn_q.weight.lora_a", files.pairs_a["blk.0.attn_q.weight"].a)), InvalidGGUFError, "missing"),
        "not_lora_tensor": (write_tiny_lora(root / "extra.gguf", files.pairs_a, extra=lambda w: w.add_tensor(
            "blk.0.attn_q.weight", np.zeros((32, 32), np.float32))), InvalidGGUFError, "not a LoRA tensor"),
        "alpha_nan": (write_tiny_lora(root / "nan.gguf", files.pairs_a, alpha=float("nan")), InvalidGGUFError,
                      "finite"),
    }


def test_bad_adapters_raise_clearly_and_change_nothing(files, tmp_path):
    cases = bad_adapters(files, tmp_path / "bad")
    with make_llm(files.base, lora=[(files.a, 1.0)]) as llm:
        before = greedy(llm)
        for name, (path, error, words) in cases.items():
            with pytest.raises(error, match=words):
                llm.set_lora([(files.a, 1.0), (path, 1.0)])
            assert llm.lora == [(str(files.a), 1.0)], name
            assert greedy(llm) == before, name
            with pytest.raises(error, match=words):
                LLM(files.base, lora=path)


@pytest.mark.parametrize("spec, error, words", [
    ({"a.gguf": float("nan")}, ValueError, "finite"),
    ([("a.gguf", float("inf"))], ValueError, "finite"),
    ([("a.gguf", True)], TypeError, "number"),
    ([("a.gguf", "1.0")], TypeError, "number"),
    ([("a.gguf", 1.0), ("./a.gguf", 0.5)], ValueError, "listed twice"),
    ([3], TypeError, "path or a"),
    ({3: 1.0}, TypeError, "str or os.PathLike"),
    (3.5, TypeError, "lora must be"),
])
def test_bad_lora_arguments_are_refused_before_any_file_is_read(files, spec, error, words, monkeypatch):
    monkeypatch.chdir(files.root)
    with make_llm(files.base) as llm:
        with pytest.raises(error, match=words):
            llm.set_lora(spec)
        assert llm.lora == []
    with pytest.raises(error, match=words):
        LLM("no-such-model.gguf", lora=spec)  # refused before the model path is even looked at


# -- the low level: who frees what, and when ------------------------------------------------------------

def test_closing_the_model_frees_its_adapters_and_their_contexts_first(files):
    model = LlamaModel(files.base)
    adapter = LoraAdapter(model, files.a)
    ctx = LlamaContext(model, n_ctx=64, n_threads=1)
    ctx.set_lora_adapters([(adapter, 1.0)])
    assert adapter.alpha == ALPHA_A and adapter.n_pairs == len(TARGETS_A)
    assert adapter.meta("adapter.type") == "lora" and adapter.metadata["general.type"] == "adapter"
    model.close()
    assert adapter.closed and ctx.closed
    with pytest.raises(ClosedError):
        LoraAdapter(model, files.a)


def test_an_adapter_in_use_closes_its_context_before_it_is_freed(files):
    with LlamaModel(files.base) as model:
        adapter, other = LoraAdapter(model, files.a), LoraAdapter(model, files.b)
        ctx = LlamaContext(model, n_ctx=64, n_threads=1)
        ctx.set_lora_adapters([(adapter, 1.0)])
        ctx.set_lora_adapters([(other, 1.0)])
        adapter.close()  # no longer in use: the context stays
        assert not ctx.closed
        with pytest.raises(ClosedError):
            ctx.set_lora_adapters([(adapter, 1.0)])
        other.close()  # in use: the context goes first
        assert ctx.closed


def test_set_lora_adapters_refuses_foreign_and_bad_entries(files):
    with LlamaModel(files.base) as model, LlamaModel(files.base) as second, \
            LlamaContext(model, n_ctx=64, n_threads=1) as ctx:
        foreign = LoraAdapter(second, files.a)
        mine = LoraAdapter(model, files.a)
        with pytest.raises(ValueError, match="another model"):
            ctx.set_lora_adapters([(foreign, 1.0)])
        with pytest.raises(ValueError, match="finite"):
            ctx.set_lora_adapters([(mine, float("nan"))])
        with pytest.raises(ValueError, match="twice"):
            ctx.set_lora_adapters([(mine, 1.0), (mine, 2.0)])
        with pytest.raises(TypeError):
            ctx.set_lora_adapters([mine])
        assert ctx.lora_adapters == ()


FINALIZER_ORDERS = """
import sys
from cyllama_cffi.lowlevel import LlamaModel, LoraAdapter

for model_first in (True, False):
    model = LlamaModel(sys.argv[1])
    adapter = LoraAdapter(model, sys.argv[2])
    # what the collector may do with a cycle holding both: run their finalizers in any order
    first, second = (model, adapter) if model_first else (adapter, model)
    first._finalizer()
    second._finalizer()
    model._ptr = adapter._ptr = None
print("ok")
"""


def test_model_and_adapter_finalizers_run_safely_in_either_order(files):
    """llama_model_free frees the adapters still registered: the adapter's finalizer must not again."""
    done = subprocess.run([sys.executable, "-c", FINALIZER_ORDERS, str(files.base), str(files.a)],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONFAULTHANDLER="1"))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


# -- every abort rule of the adapter check prevents a real crash ----------------------------------------

def _rules(files: Files) -> Dict[str, bytes]:
    """Adapters llama.cpp crashes on; each name says which rule of _lora_check refuses it."""
    pairs = files.pairs_a
    root = files.root / "rules"
    root.mkdir(exist_ok=True)
    q = pairs["blk.0.attn_q.weight"]
    embd = pairs["token_embd.weight"]
    made = {
        # gguf_get_val_str / gguf_get_val_f32 assert the value type
        "general_type_not_a_string": write_tiny_lora(root / "t.gguf", pairs, general_type=None,
                                                     extra=lambda w: w.add_uint32("general.type", 1)),
        "alpha_not_a_float": write_tiny_lora(root / "alpha.gguf", pairs, extra=lambda w: w.add_uint32(
            "adapter.lora.alpha", 8)),
        # ggml_mul_mat asserts at the first decode
        "lora_a_3d": write_tiny_lora(root / "3d.gguf", {"blk.0.attn_q.weight": q._replace(
            a=np.stack([q.a, q.a]))}),
        "token_embd_ranks_differ": write_tiny_lora(root / "embd.gguf", {"token_embd.weight": embd._replace(
            b=np.concatenate([embd.b, embd.b], axis=1))}),
    }
    return {name: path.read_bytes() for name, path in made.items()}


def test_every_adapter_rule_prevents_a_real_crash(files, worker):
    """Without the check llama.cpp aborts on each adapter; with it, InvalidGGUFError and a usable LLM.

    If a llama.cpp update makes one of them load cleanly, this fails: the rule in
    cyllama_cffi/_lora_check.py can then go.
    """
    cases = []
    for name, data in _rules(files).items():
        target = _write(files.root / "rules" / f"{name}.bin", data)
        cases += [lora_case(name, files.base, target), lora_case(name + "!unchecked", files.base, target,
                                                                 unchecked=True)]
    outcomes = {o.case_id: o for o in worker.run(cases)}
    for case in cases[::2]:
        refused, crashed = outcomes[case.case_id], outcomes[case.case_id + "!unchecked"]
        assert refused.error == "InvalidGGUFError", describe([refused])
        assert crashed.status == "crash" and crashed.returncode < 0, \
            f"{case.case_id} no longer crashes llama.cpp: " + describe([crashed])


# -- corrupted adapter files ---------------------------------------------------------------------------

def test_good_adapters_pass_the_child_probe(files, worker):
    outcomes = worker.run([lora_case("a", files.base, files.a), lora_case("b", files.base, files.b)])
    assert [o.status for o in outcomes] == ["ok", "ok"], describe(outcomes)


def test_truncated_and_header_mutated_adapters_never_crash(files, worker):
    data = files.a.read_bytes()
    cases = [lora_case(f"[:{cut}]", files.base, files.a, truncate=cut)
             for cut in sorted({0, 4, 8, 16, 24, header_size(data) - 1, header_size(data), len(data) // 2,
                                len(data) - 1})]
    for field in field_map(data):
        for value in INTERESTING[::3]:
            raw = (value % (1 << 8 * field.width)).to_bytes(field.width, "little")
            cases.append(lora_case(f"{field.kind}:{field.label}={value}", files.base, files.a, [(field.offset, raw)]))
    outcomes = worker.run(cases)
    assert len(outcomes) == len(cases) >= 200
    assert_all_clean(outcomes)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(header_only=st.booleans(), mutations=st.lists(
    st.one_of(st.tuples(st.just("flip"), st.integers(0, 10 ** 9), st.integers(1, 255)),
              st.tuples(st.just("field"), st.integers(0, 10 ** 9),
                        st.one_of(st.sampled_from(INTERESTING), st.integers(0, 2 ** 64 - 1))),
              st.tuples(st.just("nudge"), st.integers(0, 10 ** 9), st.integers(-64, 64))),
    min_size=1, max_size=4))
def test_mutated_adapters_never_crash(files, worker, header_only, mutations):
    original = files.a.read_bytes()
    mutant = apply_mutations(original, mutations, header_only)
    patches = [(offset, mutant[offset:offset + 1]) for offset in range(len(mutant))
               if mutant[offset] != original[offset]]
    outcome = worker.run_one(lora_case(f"{mutations}", files.base, files.a, patches))
    assert outcome.is_clean(), describe([outcome])


# -- the other entry points ------------------------------------------------------------------------------

def test_async_llm_and_the_one_shot_helpers_take_adapters(files):
    import asyncio

    from cyllama_cffi import AsyncLLM, complete

    with make_llm(files.merged(scale_a=1.0)) as merged, make_llm(files.base) as base:
        expected, plain = greedy(merged), greedy(base)
    assert complete(PROMPT, files.base, temperature=0.0, max_tokens=8, n_threads=1, lora=files.a).text == expected

    async def main() -> None:
        async with AsyncLLM(files.base, temperature=0.0, max_tokens=8, n_threads=1, lora={files.a: 1.0}) as llm:
            assert (await llm(PROMPT)).text == expected
            await llm.set_lora(None)
            assert (await llm(PROMPT)).text == plain
            with pytest.raises(InvalidGGUFError, match="not a LoRA adapter"):
                await llm.set_lora(files.base)
            assert (await llm(PROMPT)).text == plain
        with pytest.raises(ValueError, match="finite"):
            AsyncLLM(files.base, lora={files.a: float("nan")})

    asyncio.run(main())
