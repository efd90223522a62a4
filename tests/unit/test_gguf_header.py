"""The GGUF checks that run before llama.cpp opens a file, for files that never reach the
tensor type table (that one lives in ggml: files with tensors are checked in the model tests).

Every file here is refused for one stated reason, at the field that is wrong; the one valid
file (no tensors) goes through the metadata rules too, which are pure Python.
"""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyllama_cffi._gguf_check import MAX_NAME, check_gguf, check_model_path
from cyllama_cffi.errors import InvalidGGUFError

from .gguf_bytes import (ARRAY, BOOL, FLOAT32, INT32, STRING, UINT32, UINT64, gguf, header, key_value, spm_tokens,
                         string, tensor_info)

ARCH = ("general.architecture", STRING, "llama")


def write(tmp_path, data: bytes, name: str = "m.gguf"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def refused(tmp_path, data: bytes) -> str:
    """The message of the InvalidGGUFError the file gets (which is also a ValueError)."""
    path = write(tmp_path, data)
    with pytest.raises(ValueError) as raised:
        check_gguf(path)
    assert type(raised.value) is InvalidGGUFError
    message = str(raised.value)
    assert message.startswith(f"{path}: ")
    return message[len(f"{path}: "):]


def test_a_small_valid_file_passes_and_is_summarised(tmp_path):
    data = gguf([ARCH, ("llama.block_count", UINT32, 2), ("general.name", STRING, "tiny")])
    assert check_gguf(write(tmp_path, data)) == {"version": 3, "n_tensors": 0, "n_kv": 3, "alignment": 32}
    assert check_gguf(str(write(tmp_path, gguf([ARCH], version=2)))) == \
        {"version": 2, "n_tensors": 0, "n_kv": 1, "alignment": 32}


@pytest.mark.parametrize("size", [0, 1, 4, 23])
def test_a_file_too_short_for_a_header(tmp_path, size):
    data = gguf([ARCH])[:size]
    assert refused(tmp_path, data) == f"not a GGUF file ({size} bytes, too short for a GGUF header)"


def test_wrong_magic(tmp_path):
    assert refused(tmp_path, b"GGML" + bytes(40)) == "not a GGUF file (magic b'GGML', expected b'GGUF')"
    assert refused(tmp_path, b"this is not a model at all") == \
        "not a GGUF file (magic b'this', expected b'GGUF')"


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFFFFFF])
def test_unsupported_versions(tmp_path, version):
    data = gguf([ARCH], version=version)
    assert refused(tmp_path, data) == f"unsupported GGUF version {version} (at byte 8 of {len(data)})"


def test_counts_larger_than_the_file_could_hold(tmp_path):
    size = len(gguf([ARCH]))
    assert refused(tmp_path, gguf([ARCH], n_kv=2**40)) == \
        f"counts too large for the file: 0 tensors, {2**40} keys (at byte 24 of {size})"
    assert refused(tmp_path, gguf([ARCH], n_tensors=3)) == \
        f"counts too large for the file: 3 tensors, 1 keys (at byte 24 of {size})"


def test_every_strict_prefix_of_a_valid_file_is_refused(tmp_path):
    """Truncated anywhere: always InvalidGGUFError, never struct.error or IndexError."""
    data = gguf([("a", UINT32, 2), ("s", ARRAY, (FLOAT32, [0.5])), ("t", ARRAY, (STRING, ["a", "bc"])),
                 ("n", STRING, "x")])
    check_gguf(write(tmp_path, data))
    for size in range(len(data)):
        message = refused(tmp_path, data[:size])
        assert re.match(r"not a GGUF file|truncated: |counts too large|array \S+ claims \d+ \w+, more than the file",
                        message), (size, message)


def test_a_key_longer_than_the_file(tmp_path):
    data = header(0, 1) + (1000).to_bytes(8, "little") + b"general"
    assert refused(tmp_path, data) == "truncated: metadata key needs 1000 bytes (at byte 32 of 39)"


def test_a_key_that_is_not_utf8(tmp_path):
    assert "metadata key b'gen\\xff' is not UTF-8" in refused(tmp_path, gguf([(b"gen\xff", UINT32, 1)]))


def test_a_duplicate_key(tmp_path):
    message = refused(tmp_path, gguf([ARCH, ("general.name", STRING, "a"), ("general.name", STRING, "b")]))
    assert message.startswith("duplicate metadata key general.name (at byte ")


@pytest.mark.parametrize("value_type", [13, 255, 2**32 - 1])
def test_an_unknown_value_type(tmp_path, value_type):
    data = gguf([string("general.x") + value_type.to_bytes(4, "little") + bytes(8)])
    assert refused(tmp_path, data).startswith(f"key general.x has invalid value type {value_type} ")


def test_arrays_are_checked_against_the_file(tmp_path):
    nested = key_value("a.nested", ARRAY, (UINT32, [])).replace(  # element type ARRAY instead of UINT32
        UINT32.to_bytes(4, "little") + bytes(8), ARRAY.to_bytes(4, "little") + bytes(8), 1)
    assert refused(tmp_path, gguf([nested])).startswith("array a.nested has invalid element type 9 ")
    huge = string("a.big") + ARRAY.to_bytes(4, "little") + UINT32.to_bytes(4, "little") + (2**60).to_bytes(8, "little")
    assert refused(tmp_path, gguf([huge])).startswith(f"array a.big claims {2**60} elements, more than the file holds")
    strings = string("a.s") + ARRAY.to_bytes(4, "little") + STRING.to_bytes(4, "little") + (2**40).to_bytes(8, "little")
    assert refused(tmp_path, gguf([strings])).startswith(f"array a.s claims {2**40} strings, more than the file holds")
    short = key_value("a.t", ARRAY, (STRING, ["abc", "defgh"]))[:-2]
    assert refused(tmp_path, gguf([short])).startswith("truncated: string in a.t needs 5 bytes ")
    odd = string("a.o") + ARRAY.to_bytes(4, "little") + (77).to_bytes(4, "little") + (1).to_bytes(8, "little")
    assert refused(tmp_path, gguf([odd])).startswith("array a.o has invalid element type 77 ")


@pytest.mark.parametrize("entry, shown", [
    (("general.alignment", UINT32, 0), "0"),
    (("general.alignment", UINT32, 48), "48"),
    (("general.alignment", UINT64, 64), "64"),
    (("general.alignment", STRING, "32"), "b'32'"),
])
def test_general_alignment_must_be_a_power_of_two_uint32(tmp_path, entry, shown):
    assert refused(tmp_path, gguf([entry])).startswith(f"general.alignment must be a power-of-two uint32, got {shown} ")


def test_a_custom_alignment_is_reported(tmp_path):
    assert check_gguf(write(tmp_path, gguf([("general.alignment", UINT32, 64)])))["alignment"] == 64


# -- tensor descriptors: every rule that fires before the tensor's type is looked up -------------

@pytest.mark.parametrize("tensor, reason", [
    (tensor_info("t" * MAX_NAME, [32]), f"tensor name {'t' * MAX_NAME!r} is longer than {MAX_NAME - 1} bytes"),
    (tensor_info("w", []), "tensor w has 0 dimensions (1..4 allowed)"),
    (tensor_info("w", [1, 1, 1, 1, 1]), "tensor w has 5 dimensions (1..4 allowed)"),
    (tensor_info("w", [32, -1]), "tensor w has a negative dimension (32, -1)"),
    (tensor_info("w", [32], offset=8), "tensor w offset 8 is not aligned to 32"),
])
def test_bad_tensor_descriptors(tmp_path, tensor, reason):
    assert refused(tmp_path, gguf([ARCH], [tensor], data=bytes(64))).startswith(reason + " (at byte ")


def test_a_duplicate_tensor(tmp_path):
    tensors = [tensor_info("w", [32]), tensor_info("w", [32], offset=128)]
    assert refused(tmp_path, gguf([ARCH], tensors, data=bytes(256))).startswith("duplicate tensor w ")


def test_a_truncated_tensor_descriptor(tmp_path):
    data = gguf([ARCH], [tensor_info("w", [32])])[:-5]
    assert refused(tmp_path, data).startswith("truncated: offset of w needs 8 bytes ")


def test_no_room_for_tensor_data(tmp_path):
    data = gguf([ARCH], [tensor_info("w", [32])])
    assert len(data) % 32  # the data section would start after the end of the file
    assert refused(tmp_path, data).startswith("no room for tensor data after the header ")


def test_tensor_data_must_start_on_a_32_byte_boundary_whatever_the_alignment_says(tmp_path):
    def build(offset):
        return gguf([ARCH, ("general.alignment", UINT32, 16)], [tensor_info("w", [32], offset=offset)],
                    alignment=16, data=bytes(96))

    data_start = -(-len(build(0)[:-96]) // 16) * 16
    offset = 16 if data_start % 32 == 0 else 0  # aligned to 16, but not to 32, in the file
    message = refused(tmp_path, build(offset))
    assert message.startswith(f"tensor w data starts at file byte {data_start + offset}, not a multiple of 32 "
                              "(general.alignment 16 is too small)")


# -- metadata values that would make llama.cpp abort (files without tensors) ----------------------

def metadata_refusal(tmp_path, *entries) -> str:
    return refused(tmp_path, gguf([ARCH, *entries]))


@pytest.mark.parametrize("count", [0, 513, 2**32 - 1])
def test_block_count_out_of_range(tmp_path, count):
    assert metadata_refusal(tmp_path, ("llama.block_count", UINT32, count)) == \
        f"llama.block_count is {count}; llama.cpp aborts unless it is in 1..512"


def test_block_count_of_another_type_is_left_to_llama_cpp(tmp_path):
    check_gguf(write(tmp_path, gguf([ARCH, ("llama.block_count", INT32, 0)])))


def test_nextn_layers_above_block_count(tmp_path):
    assert metadata_refusal(tmp_path, ("llama.block_count", UINT32, 2), ("llama.nextn_predict_layers", UINT32, 3)) \
        == "llama.nextn_predict_layers (3) exceeds block_count (2); llama.cpp aborts"


def test_unknown_rope_scaling(tmp_path):
    assert metadata_refusal(tmp_path, ("llama.rope.scaling.type", STRING, "cubic")).startswith(
        "llama.rope.scaling.type is 'cubic'; llama.cpp aborts unless it is one of none, linear, yarn, longrope")
    check_gguf(write(tmp_path, gguf([ARCH, ("llama.rope.scaling.type", STRING, "yarn")])))


@pytest.mark.parametrize("epsilon", [-1e-5, math.nan, -math.inf, math.inf])
def test_a_norm_epsilon_must_be_finite_and_not_negative(tmp_path, epsilon):
    message = metadata_refusal(tmp_path, ("llama.attention.layer_norm_rms_epsilon", FLOAT32, epsilon))
    assert message.startswith("llama.attention.layer_norm_rms_epsilon is ")
    assert message.endswith("; ggml aborts unless a norm epsilon is finite and >= 0")


@pytest.mark.parametrize("entries, problem", [
    ([("llama.expert_count", UINT32, 2), ("llama.expert_used_count", UINT32, 3)],
     "expert_used_count 3 > expert_count 2"),
    ([("llama.expert_count", UINT32, 2000)], "expert_count 2000 > 1024"),
    ([("llama.expert_count", UINT32, 8), ("llama.expert_used_count", UINT32, 0)],
     "expert_used_count is 0 with experts present"),
    ([("llama.expert_used_count", UINT32, 1)], "expert_used_count 1 > expert_count 0"),
    ([("llama.expert_count", UINT32, 8), ("llama.expert_used_count", UINT32, 2),
      ("llama.expert_group_count", UINT32, 3), ("llama.expert_group_used_count", UINT32, 1)],
     "expert groups inconsistent (8 experts, 3 groups, 1 used)"),
])
def test_inconsistent_experts(tmp_path, entries, problem):
    assert metadata_refusal(tmp_path, *entries) == f"llama: {problem}; llama.cpp aborts"


def test_consistent_experts_pass(tmp_path):
    check_gguf(write(tmp_path, gguf([ARCH, ("llama.block_count", UINT32, 2), ("llama.expert_count", UINT32, 8),
                                     ("llama.expert_used_count", ARRAY, (UINT32, [2, 2]))])))


def vocab(model: str, tokens, *extra):
    return [ARCH, ("tokenizer.ggml.model", STRING, model), ("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)), *extra]


def test_a_complete_sentencepiece_vocabulary_passes(tmp_path):
    check_gguf(write(tmp_path, gguf(vocab("llama", spm_tokens()))))


@pytest.mark.parametrize("model", ["none", "no_vocab"])
def test_no_vocabulary(tmp_path, model):
    assert refused(tmp_path, gguf([ARCH, ("tokenizer.ggml.model", STRING, model)])).startswith(
        f"tokenizer.ggml.model is {model!r}: a model without a vocabulary cannot be used here")


def test_duplicate_tokens_as_llama_cpp_reads_them(tmp_path):
    """Token texts end at the first NUL, and an empty one stands for ``[EMPTY_<id>]``."""
    assert refused(tmp_path, gguf(vocab("llama", spm_tokens() + ["ab", "x", "ab"]))).startswith(
        "tokens 259 and 261 have the same text b'ab'; llama.cpp aborts on a vocabulary with duplicate tokens")
    assert refused(tmp_path, gguf(vocab("llama", spm_tokens() + ["ab", "ab\0cd"]))).startswith(
        "tokens 259 and 260 have the same text b'ab'")
    assert refused(tmp_path, gguf(vocab("llama", spm_tokens() + ["", "[EMPTY_259]"]))).startswith(
        "tokens 259 and 260 have the same text b'[EMPTY_259]'")


def test_a_sentencepiece_vocabulary_missing_a_byte(tmp_path):
    tokens = [token for token in spm_tokens() if token not in ("<0x41>", "<0xE2>")]
    assert refused(tmp_path, gguf(vocab("llama", tokens))).startswith(
        "SentencePiece vocabulary has no token for byte(s) [65, 226]")
    tokens.append("A")  # the raw byte stands in for <0x41>
    assert refused(tmp_path, gguf(vocab("llama", tokens))).startswith(
        "SentencePiece vocabulary has no token for byte(s) [226]")


def test_a_byte_token_in_a_wordpiece_vocabulary(tmp_path):
    tokens = [f"w{i}" for i in range(110)]
    types = [1] * 110
    types[5] = 6
    assert refused(tmp_path, gguf(vocab("bert", tokens, ("tokenizer.ggml.token_type", ARRAY, (INT32, types))))) \
        .startswith("token 5 is a BYTE token in a WordPiece vocabulary; llama.cpp aborts on it")


def test_special_tokens_that_tokenization_adds_must_exist(tmp_path):
    small = [f"t{i}" for i in range(5)]  # GPT-2's default BOS id is 11
    assert refused(tmp_path, gguf(vocab("gpt2", small))).startswith(
        "tokenization adds a BOS token but the vocabulary has none (bad or missing id); llama.cpp aborts on it")
    check_gguf(write(tmp_path, gguf(vocab("gpt2", small, ("tokenizer.ggml.bos_token_id", UINT32, 0)))))
    check_gguf(write(tmp_path, gguf(vocab("gpt2", small, ("tokenizer.ggml.add_bos_token", BOOL, False)))))
    assert refused(tmp_path, gguf(vocab("gpt2", small, ("tokenizer.ggml.bos_token_id", UINT32, 0),
                                        ("tokenizer.ggml.add_eos_token", BOOL, True)))).startswith(
        "tokenization adds a EOS token but the vocabulary has none")


def test_model_path_problems_are_the_usual_os_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model file not found"):
        check_model_path(tmp_path / "missing.gguf")
    with pytest.raises(IsADirectoryError, match="model path is a directory, not a GGUF file"):
        check_model_path(tmp_path)
    with pytest.raises(InvalidGGUFError, match="too short for a GGUF header"):
        check_model_path(write(tmp_path, b""))
    good = write(tmp_path, gguf([ARCH]))
    assert check_model_path(str(good)) == good


VALID = gguf([ARCH, ("llama.block_count", UINT32, 2), ("llama.rope.scaling.type", STRING, "none"),
              ("tokenizer.ggml.scores", ARRAY, (FLOAT32, [0.0, 1.0])), ("general.alignment", UINT32, 32)])


@settings(max_examples=150, deadline=None)
@given(st.integers(0, len(VALID) - 1), st.integers(0, 255))
def test_any_one_byte_change_is_accepted_or_refused_cleanly(tmp_path_factory, position, byte):
    """Never another exception (struct.error, UnicodeDecodeError, MemoryError...) and never a hang."""
    path = tmp_path_factory.mktemp("mutant") / "m.gguf"
    path.write_bytes(VALID[:position] + bytes([byte]) + VALID[position + 1:])
    try:
        summary = check_gguf(path)
    except InvalidGGUFError as error:
        assert re.match(re.escape(str(path)) + ": ", str(error))
    else:
        assert summary["n_tensors"] == 0 and summary["version"] in (2, 3)
