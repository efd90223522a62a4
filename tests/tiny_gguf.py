"""Tiny GGUF models that llama.cpp really loads and decodes with, written by the ``gguf`` package.

Why: robustness tests mutate a model file thousands of times and load each
mutant; with the 98 MB default model that is far too slow, and a file that is
not a real model would only exercise the header parser. The model written
here is a genuine ``llama``-architecture network (F32, 2 layers, n_embd 32,
random weights) with a SentencePiece-style (``tokenizer.ggml.model = "llama"``)
vocabulary of 3 special tokens, all 256 byte tokens (so any text tokenizes)
and a few dozen word pieces: about 170 KB, loaded and decoded in milliseconds.
``TinySpec(tokenizer="gpt2")`` writes a byte-level BPE vocabulary instead (the
default model's kind: 256 byte symbols, a dozen merges), since the two
tokenizers take different paths through llama.cpp.

Only ``gguf.GGUFWriter`` APIs present in both gguf 0.18 (PyPy 3.9) and 0.19
are used. ``field_map`` walks a written file and returns the byte position of
every header field (counts, lengths, types, dims, offsets, the alignment), so
tests can mutate exactly the fields the GGUF parser trusts.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

ARCH = "llama"
# Word pieces after the 3 specials and 256 bytes; "\u2581" is SentencePiece's space marker.
_WORDS = ["\u2581", "\u2581the", "\u2581a", "\u2581cat", "\u2581dog", "\u2581sat", "\u2581on", "\u2581mat",
          "\u2581hello", "\u2581world", "\u2581once", "\u2581upon", "\u2581time", "\u2581capital", "\u2581of",
          "\u2581is", "\u2581France", "\u2581Paris", "th", "he", "in", "er", "an", "re", "on", "at", "en",
          "nd", "ti", "es", "or", "te", "of", "ed", "is", "it", "al", "ar", "st", "to", "nt", "ng"]
_WORDS += [chr(c) for c in range(ord("a"), ord("z") + 1)]

# GGUF token types (llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6


class TinySpec(NamedTuple):
    """Shape of a tiny model; the defaults load and decode in milliseconds."""

    n_embd: int = 32
    n_layer: int = 2
    n_head: int = 2
    n_head_kv: int = 2
    n_ff: int = 64
    n_ctx_train: int = 256
    seed: int = 1234
    std: float = 0.3  # large enough that greedy output varies with the prompt
    alignment: Optional[int] = None  # None: no general.alignment key (GGUF's default, 32)
    tokenizer: str = "llama"  # or "gpt2"
    # Chat models: control tokens appended to the vocabulary (the markers a template writes)
    # and the one of them that is the EOS (llama tokenizer only), and the template itself.
    specials: Tuple[str, ...] = ()
    eos: Optional[str] = None  # None: "</s>"
    chat_template: Optional[str] = None  # tokenizer.chat_template


def vocabulary() -> List[str]:
    """Token texts: <unk>, <s>, </s>, <0x00>..<0xFF>, then the word pieces."""
    return ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + _WORDS


def _byte_symbols() -> List[str]:
    """GPT-2's byte-level alphabet: each byte as one printable code point."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    shifted = 0
    symbols = {}
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + shifted)
            shifted += 1
    return [symbols[byte] for byte in range(256)]


_BPE_MERGES = ["Ġ t", "h e", "Ġt he", "Ġ c", "a t", "Ġc at", "Ġ s", "Ġs at",
               "Ġ o", "Ġo n", "Ġ m", "Ġm at", "i n", "e r", "a n"]


def bpe_vocabulary() -> List[str]:
    """<|endoftext|>, the 256 byte symbols, then one token per merge result."""
    merged = [merge.replace(" ", "") for merge in _BPE_MERGES]
    return ["<|endoftext|>"] + _byte_symbols() + merged


def _add_vocabulary(writer, spec: TinySpec) -> int:
    """Write the tokenizer keys; return the vocabulary size."""
    if spec.tokenizer == "gpt2":
        if spec.specials or spec.eos is not None:
            raise ValueError("specials and eos are written for the llama tokenizer only")
        tokens = bpe_vocabulary()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types([_CONTROL] + [_NORMAL] * (len(tokens) - 1))
        writer.add_token_merges(_BPE_MERGES)
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(0)
        writer.add_add_bos_token(True)
        return len(tokens)
    if spec.tokenizer != "llama":
        raise ValueError(f"tokenizer must be 'llama' or 'gpt2', got {spec.tokenizer!r}")
    specials = list(spec.specials)
    tokens = vocabulary() + specials
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0, 0.0, 0.0] + [-1000.0] * 256 + [-float(i) for i in range(len(_WORDS))]
                            + [0.0] * len(specials))
    writer.add_token_types([_UNKNOWN, _CONTROL, _CONTROL] + [_BYTE] * 256 + [_NORMAL] * len(_WORDS)
                           + [_CONTROL] * len(specials))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2 if spec.eos is None else tokens.index(spec.eos))
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    return len(tokens)


def write_tiny_llama(path: Union[str, Path], spec: Optional[TinySpec] = None,
                     extra: Optional[Callable[[Any], None]] = None,
                     deltas: Optional[Mapping[str, np.ndarray]] = None) -> Path:
    """Write a loadable, decodable tiny llama model to ``path`` and return the path.

    ``extra(writer)`` may add metadata keys (``writer.add_uint32(key, value)``...).
    ``deltas`` are added to the named weights (numpy shapes): a LoRA adapter merged in.
    """
    spec = spec or TinySpec()
    import gguf  # imported here so importing this module never needs gguf

    path = Path(path)
    head_dim = spec.n_embd // spec.n_head

    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_name("tiny-llama-test")
    writer.add_context_length(spec.n_ctx_train)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(0)  # ALL_F32
    n_vocab = _add_vocabulary(writer, spec)
    writer.add_vocab_size(n_vocab)
    if spec.chat_template is not None:
        writer.add_string("tokenizer.chat_template", spec.chat_template)
    if extra is not None:
        extra(writer)
    if spec.alignment is not None:
        writer.add_custom_alignment(spec.alignment)

    rng = np.random.default_rng(spec.seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * spec.std).astype(np.float32)

    def add(name: str, array: np.ndarray) -> None:
        if deltas and name in deltas:
            array = (array.astype(np.float64) + deltas[name]).astype(np.float32)
        writer.add_tensor(name, array)

    # numpy shapes are (rows, cols) = ggml's (ne1, ne0) reversed
    for name, shape in tiny_tensor_shapes(spec, n_vocab).items():
        add(name, np.ones(shape, dtype=np.float32) if name.endswith("norm.weight") else weight(*shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_tensor_shapes(spec: TinySpec, n_vocab: int) -> Dict[str, Tuple[int, ...]]:
    """The tiny model's tensors in file order, with their numpy shapes ((ne1, ne0) for a matrix)."""
    kv_dim = spec.n_embd // spec.n_head * spec.n_head_kv
    shapes: Dict[str, Tuple[int, ...]] = {"token_embd.weight": (n_vocab, spec.n_embd),
                                          "output_norm.weight": (spec.n_embd,),
                                          "output.weight": (n_vocab, spec.n_embd)}
    for layer in range(spec.n_layer):
        prefix = f"blk.{layer}."
        shapes.update({prefix + "attn_norm.weight": (spec.n_embd,),
                       prefix + "attn_q.weight": (spec.n_embd, spec.n_embd),
                       prefix + "attn_k.weight": (kv_dim, spec.n_embd),
                       prefix + "attn_v.weight": (kv_dim, spec.n_embd),
                       prefix + "attn_output.weight": (spec.n_embd, spec.n_embd),
                       prefix + "ffn_norm.weight": (spec.n_embd,),
                       prefix + "ffn_gate.weight": (spec.n_ff, spec.n_embd),
                       prefix + "ffn_up.weight": (spec.n_ff, spec.n_embd),
                       prefix + "ffn_down.weight": (spec.n_embd, spec.n_ff)})
    return shapes


# -- LoRA adapters -------------------------------------------------------------------------

class LoraPair(NamedTuple):
    """One adapted tensor, in numpy shapes as ``convert_lora_to_gguf.py`` writes them.

    For a matrix W of numpy shape (n_out, n_in): ``a`` is (rank, n_in), ``b`` is (n_out, rank),
    and the adapter adds ``scale * alpha / rank * b @ a`` to W. For ``token_embd.weight``
    ((n_vocab, n_embd)) llama.cpp wants them the other way round: ``a`` is (n_vocab, rank),
    ``b`` is (n_embd, rank), and the delta is ``a @ b.T``.
    """

    a: np.ndarray
    b: np.ndarray

    def delta(self, name: str, factor: float) -> np.ndarray:
        """What the adapter adds to the weight ``name``, with ``factor = scale * alpha / rank``."""
        if name.endswith("token_embd.weight"):
            return factor * (self.a.astype(np.float64) @ self.b.astype(np.float64).T)
        return factor * (self.b.astype(np.float64) @ self.a.astype(np.float64))


def random_lora(targets: Sequence[str], rank: int = 2, seed: int = 7, std: float = 0.3,
                spec: Optional[TinySpec] = None) -> Dict[str, LoraPair]:
    """Random LoRA pairs of ``rank`` for the named weights of the tiny model."""
    spec = spec or TinySpec()
    shapes = tiny_tensor_shapes(spec, len(vocabulary()) + len(spec.specials))
    rng = np.random.default_rng(seed)
    pairs = {}
    for name in targets:
        n_out, n_in = shapes[name]
        if name.endswith("token_embd.weight"):
            a, b = rng.standard_normal((n_out, rank)), rng.standard_normal((n_in, rank))
        else:
            a, b = rng.standard_normal((rank, n_in)), rng.standard_normal((n_out, rank))
        pairs[name] = LoraPair((a * std).astype(np.float32), (b * std).astype(np.float32))
    return pairs


def write_tiny_lora(path: Union[str, Path], pairs: Mapping[str, LoraPair], alpha: Optional[float] = None,
                    arch: str = ARCH, extra: Optional[Callable[[Any], None]] = None,
                    general_type: Optional[str] = "adapter", adapter_type: str = "lora") -> Path:
    """Write a LoRA adapter GGUF laid out as llama.cpp's ``convert_lora_to_gguf.py`` does.

    ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha`` (left
    out when None), tensors ``<name>.lora_a`` / ``<name>.lora_b``. ``extra(writer)`` may add
    keys or tensors; ``general_type=None`` leaves that key to it.
    """
    import gguf

    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch)
    if general_type is not None:
        writer.add_string("general.type", general_type)
    writer.add_string("adapter.type", adapter_type)
    if alpha is not None:
        writer.add_float32("adapter.lora.alpha", alpha)
    if extra is not None:
        extra(writer)
    for name, pair in pairs.items():
        writer.add_tensor(name + ".lora_a", pair.a)
        writer.add_tensor(name + ".lora_b", pair.b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def merged_deltas(adapters: Sequence[Tuple[Mapping[str, LoraPair], float, float]]) -> Dict[str, np.ndarray]:
    """The summed weight deltas of ``(pairs, alpha, scale)`` adapters, for ``write_tiny_llama(deltas=)``.

    llama.cpp scales by ``scale * alpha / rank``, or by ``scale`` alone when alpha is 0.
    """
    total: Dict[str, np.ndarray] = {}
    for pairs, alpha, scale in adapters:
        for name, pair in pairs.items():
            rank = pair.b.shape[1]
            factor = scale * alpha / rank if alpha else scale
            total[name] = total.get(name, 0) + pair.delta(name, factor)
    return total


# -- where the header fields are ---------------------------------------------------------

class Field(NamedTuple):
    """One fixed-width integer field of a GGUF header: where it is and what it means."""

    offset: int
    width: int  # bytes: 4 or 8
    kind: str   # n_tensors, n_kv, key_len, value_type, array_type, array_len, string_len,
                # name_len, n_dims, dim, tensor_type, tensor_offset, alignment, value
    label: str  # human-readable: which key or tensor


_SCALAR_WIDTH = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def field_map(data: bytes) -> List[Field]:
    """Every integer field of a well-formed GGUF header, in file order.

    Scalar metadata values of 4 or 8 bytes are included as kind ``value``
    (e.g. ``llama.block_count``): llama.cpp trusts some of them as much as
    the structural fields.
    """
    fields: List[Field] = []
    pos = 24
    fields += [Field(8, 8, "n_tensors", "header"), Field(16, 8, "n_kv", "header")]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)

    def string(kind: str, label: str) -> bytes:
        nonlocal pos
        (length,) = struct.unpack_from("<Q", data, pos)
        fields.append(Field(pos, 8, kind, label))
        pos += 8
        value = data[pos:pos + length]
        pos += length
        return value

    for _ in range(n_kv):
        key = string("key_len", "key").decode()
        (value_type,) = struct.unpack_from("<I", data, pos)
        fields.append(Field(pos, 4, "value_type", key))
        pos += 4
        if value_type == 8:
            string("string_len", key)
        elif value_type == 9:
            (element_type, count) = struct.unpack_from("<IQ", data, pos)
            fields.append(Field(pos, 4, "array_type", key))
            fields.append(Field(pos + 4, 8, "array_len", key))
            pos += 12
            if element_type == 8:
                for index in range(count):
                    string("string_len", f"{key}[{index}]")
            else:
                pos += count * _SCALAR_WIDTH[element_type]
        else:
            width = _SCALAR_WIDTH[value_type]
            if width >= 4:
                fields.append(Field(pos, width, "alignment" if key == "general.alignment" else "value", key))
            pos += width
    for _ in range(n_tensors):
        name = string("name_len", "tensor").decode()
        (n_dims,) = struct.unpack_from("<I", data, pos)
        fields.append(Field(pos, 4, "n_dims", name))
        pos += 4
        for axis in range(n_dims):
            fields.append(Field(pos, 8, "dim", f"{name}[{axis}]"))
            pos += 8
        fields.append(Field(pos, 4, "tensor_type", name))
        fields.append(Field(pos + 4, 8, "tensor_offset", name))
        pos += 12
    return fields


def header_size(data: bytes) -> int:
    """Bytes before the (aligned) tensor data section starts, unaligned."""
    last = field_map(data)[-1]
    return last.offset + last.width


if __name__ == "__main__":  # pragma: no cover - manual use: python tests/tiny_gguf.py out.gguf
    import sys

    target = write_tiny_llama(sys.argv[1] if len(sys.argv) > 1 else "tiny.gguf")
    print(target, target.stat().st_size, "bytes")
