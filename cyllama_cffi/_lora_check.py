"""Check a LoRA adapter file against its base model in Python, before llama.cpp reads it.

``llama_adapter_lora_init`` refuses many bad adapters cleanly (it returns NULL and says why
only in its log), but some take the process down. Each abort rule below mirrors one place of
the pinned llama.cpp source (``src/llama-adapter.cpp``, ``src/llama-graph.cpp``):

* ``general.type``, ``general.architecture`` or ``adapter.type`` present with a type other
  than string, ``adapter.lora.alpha`` with a type other than float32: ``gguf_get_val_str`` /
  ``gguf_get_val_f32`` ``GGML_ASSERT`` the type.
* a ``lora_a``/``lora_b`` pair with more dimensions than its base tensor: llama.cpp compares
  only the first two, and ``ggml_mul_mat`` asserts at the first decode.
* a ``token_embd.weight`` pair whose ranks differ (``lora_a``'s first dimension against
  ``lora_b``'s): not compared at load, ``ggml_mul_mat`` asserts at the first decode.

Tensor types need no rule of their own: the structural check already refuses the types the
CPU backend cannot compute with.

The rules llama.cpp itself enforces cleanly (not an adapter, another architecture, a tensor
the model lacks, a shape of another model) are checked here too, so that the exception says
what is wrong instead of pointing at the log. A non-finite ``adapter.lora.alpha`` is refused
as well: llama.cpp would turn every logit into NaN.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, Mapping, NamedTuple, Optional, Tuple, Union

from ._gguf_check import inspect_gguf
from .errors import InvalidGGUFError

_STRING, _FLOAT32 = 8, 6
_SUFFIXES = (".lora_a", ".lora_b")


class LoraFileInfo(NamedTuple):
    """What the check learned: the adapter's alpha (0.0 when absent) and its tensor pairs."""

    alpha: float
    n_pairs: int


def check_lora_path(path: Union[str, "os.PathLike[str]"], arch: str,
                    model_tensors: Optional[Mapping[str, Tuple[int, ...]]]) -> Tuple[Path, LoraFileInfo]:
    """Raise unless ``path`` is a LoRA adapter llama.cpp can load for the model described.

    ``arch`` is the model's ``general.architecture``; ``model_tensors`` maps each model tensor
    name to its ggml dims (None: unknown, e.g. a split model, only the adapter's own shapes
    are then checked). Missing or unreadable files raise the matching ``OSError``; everything
    else ``InvalidGGUFError`` (a ``ValueError``) naming the problem.
    """
    resolved = Path(os.fspath(path)).expanduser()
    if not resolved.exists():
        raise FileNotFoundError(f"LoRA adapter file not found: {resolved}")
    if resolved.is_dir():
        raise IsADirectoryError(f"LoRA adapter path is a directory, not a GGUF file: {resolved}")
    if not os.access(resolved, os.R_OK):
        raise PermissionError(f"LoRA adapter file is not readable: {resolved}")
    info = inspect_gguf(resolved, semantics=False)

    def fail(what: str) -> InvalidGGUFError:
        return InvalidGGUFError(f"{resolved}: {what}")

    def string(key: str) -> str:
        entry = info.metadata.get(key)
        if entry is None:
            return ""  # llama.cpp reads a missing key as ""
        if entry[0] != _STRING:
            raise fail(f"{key} must be a string (llama.cpp aborts on any other type)")
        return entry[1].split(b"\0", 1)[0].decode("utf-8", "replace")  # read as a C string

    general_type = string("general.type")
    if general_type != "adapter":
        raise fail(f"not a LoRA adapter: general.type is {general_type!r}, not 'adapter'"
                   + (" (this looks like a model file)" if general_type in ("", "model") else ""))
    adapter_arch = string("general.architecture")
    adapter_type = string("adapter.type")
    if adapter_type != "lora":
        raise fail(f"not a LoRA adapter: adapter.type is {adapter_type!r}, not 'lora'")
    alpha = 0.0
    entry = info.metadata.get("adapter.lora.alpha")
    if entry is not None:
        if entry[0] != _FLOAT32:
            raise fail("adapter.lora.alpha must be a float32 (llama.cpp aborts on any other type)")
        alpha = float(entry[1])  # type: ignore[arg-type]
        if not math.isfinite(alpha):
            raise fail(f"adapter.lora.alpha is {alpha}; it must be finite")
    if adapter_arch != arch:
        raise fail(f"the adapter is for architecture {adapter_arch!r}, the model is {arch!r}")

    pairs: Dict[str, Dict[str, Tuple[str, Tuple[int, ...], int]]] = {}
    for tensor in info.tensors:
        name = tensor.name.split("\0", 1)[0]
        for suffix in _SUFFIXES:
            if name.endswith(suffix):
                # llama.cpp removes every occurrence of the suffix, not only the last one
                pairs.setdefault(name.replace(suffix, ""), {})[suffix] = (name, tensor.dims, tensor.ggml_type)
                break
        else:
            if not name.endswith("_norm.weight"):  # llama.cpp skips norm vectors
                raise fail(f"tensor {name!r} is not a LoRA tensor (its name must end in .lora_a or .lora_b)")
    for base, pair in pairs.items():
        _check_pair(base, pair, model_tensors, fail)
    return resolved, LoraFileInfo(alpha, len(pairs))


def _dims4(dims: Tuple[int, ...]) -> Tuple[int, ...]:
    return tuple(dims) + (1,) * (4 - len(dims))


def _check_pair(base: str, pair: Dict[str, Tuple[str, Tuple[int, ...], int]],
                model_tensors: Optional[Mapping[str, Tuple[int, ...]]], fail) -> None:
    if len(pair) != 2:
        missing = ".lora_b" if ".lora_a" in pair else ".lora_a"
        raise fail(f"tensor {base + missing!r} is missing (a LoRA tensor needs both lora_a and lora_b)")
    for name, dims, _ in pair.values():
        if 0 in dims:
            raise fail(f"tensor {name!r} has an empty dimension {tuple(dims)}")
    a = _dims4(pair[".lora_a"][1])
    b = _dims4(pair[".lora_b"][1])
    model = None
    if model_tensors is not None:
        if base not in model_tensors:
            raise fail(f"the adapter changes tensor {base!r}, which the model does not have "
                       "(an adapter for another model?)")
        model = _dims4(model_tensors[base])
    shape_error = fail(f"the shapes of {base!r}'s lora_a {a[:2]} and lora_b {b[:2]} do not fit the model's "
                       f"{model[:2] if model else '?'} (an adapter for another model?)")
    if base.endswith("token_embd.weight"):
        # lora_a is indexed by token (get_rows), lora_b multiplies its rows: ranks a.ne[0] == b.ne[0]
        if model is not None and (model[0] != b[1] or model[1] != a[1]):
            raise shape_error
        if a[0] != b[0]:
            raise fail(f"{base!r}: lora_a's rank {a[0]} and lora_b's rank {b[0]} differ")
        if a[2:] != (1, 1) or b[2:] != (1, 1):
            raise fail(f"{base!r}: embedding LoRA tensors must be 2-dimensional")
        return
    if model is not None and (model[0] != a[0] or model[1] != b[1]):
        raise shape_error
    if a[1] != b[0]:
        raise fail(f"{base!r}: lora_a's rank {a[1]} and lora_b's rank {b[0]} differ (lora_a not transposed?)")
    outer = model[2:] if model is not None else (1, 1)
    if a[2:] != outer or b[2:] != outer:
        raise fail(f"{base!r}: lora_a {a} and lora_b {b} must have the model tensor's dimensions "
                   f"beyond the first two {outer}")
