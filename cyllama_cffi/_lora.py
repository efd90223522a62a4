"""The ``lora=`` argument of ``LLM`` and ``LLM.set_lora``: what forms it takes, checked up front.

Pure Python (no compiled module): the forms are checked before any file is opened, so a bad
argument changes nothing.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any, List, Mapping, Sequence, Tuple, Union

LoraPath = Union[str, "os.PathLike[str]"]
# a path (scale 1.0); {path: scale}; [path or (path, scale), ...]; None: no adapter
LoraSpec = Union[None, LoraPath, Mapping[LoraPath, float], Sequence[Union[LoraPath, Tuple[LoraPath, float]]]]


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def _scale(value: Any, path: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"the scale of LoRA adapter {os.fspath(path)!r} must be a number, "
                        f"got {type(value).__name__}")
    scale = float(value)
    if not math.isfinite(scale):
        raise ValueError(f"the scale of LoRA adapter {os.fspath(path)!r} must be finite, got {value!r}")
    return scale


def parse_lora(spec: LoraSpec) -> List[Tuple[Path, float]]:
    """``spec`` as a list of ``(path, scale)``; ``TypeError``/``ValueError`` for anything else.

    A 2-tuple ``(path, number)`` alone is one adapter with its scale. The same file twice is
    refused: llama.cpp applies an adapter once, so its scales would not add up.
    """
    if spec is None:
        return []
    if _is_path(spec):
        entries: List[Tuple[Any, Any]] = [(spec, 1.0)]
    elif isinstance(spec, Mapping):
        entries = list(spec.items())
    elif isinstance(spec, tuple) and len(spec) == 2 and _is_path(spec[0]) and not _is_path(spec[1]):
        entries = [spec]
    elif isinstance(spec, (list, tuple)):
        entries = []
        for item in spec:
            if _is_path(item):
                entries.append((item, 1.0))
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                entries.append((item[0], item[1]))
            else:
                raise TypeError(f"each LoRA adapter must be a path or a (path, scale) pair, got {item!r}")
    else:
        raise TypeError("lora must be a path, a {path: scale} mapping or a list of paths or (path, scale) "
                        f"pairs, got {type(spec).__name__}")
    result: List[Tuple[Path, float]] = []
    seen = set()
    for path, scale in entries:
        if not _is_path(path):
            raise TypeError(f"a LoRA adapter path must be a str or os.PathLike, got {type(path).__name__}")
        resolved = Path(os.fspath(path)).expanduser()
        key = os.path.realpath(resolved)
        if key in seen:
            raise ValueError(f"LoRA adapter {str(resolved)!r} is listed twice; give it one scale")
        seen.add(key)
        result.append((resolved, _scale(scale, path)))
    return result
