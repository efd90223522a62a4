"""The forms of ``lora=`` (``LLM``, ``set_lora``): parsed and checked before any file is opened."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from cyllama_cffi._lora import parse_lora


def test_every_form_gives_path_scale_pairs_in_order(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    assert parse_lora(None) == [] and parse_lora([]) == [] and parse_lora({}) == []
    assert parse_lora(str(a)) == [(a, 1.0)]
    assert parse_lora(a) == [(a, 1.0)]
    assert parse_lora((a, 0.5)) == [(a, 0.5)]  # one pair alone
    assert parse_lora({a: 0.5, str(b): -2}) == [(a, 0.5), (b, -2.0)]
    assert parse_lora([a, (b, 3)]) == [(a, 1.0), (b, 3.0)]
    assert parse_lora([[a, 0.25]]) == [(a, 0.25)]
    assert parse_lora((a, b)) == [(a, 1.0), (b, 1.0)]  # two paths, not a pair
    assert all(isinstance(scale, float) for _, scale in parse_lora({a: 2}))


def test_home_is_expanded():
    assert parse_lora("~/x.gguf") == [(Path("~/x.gguf").expanduser(), 1.0)]


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
def test_non_finite_scales_are_refused(scale):
    with pytest.raises(ValueError, match="must be finite"):
        parse_lora({"a.gguf": scale})


@pytest.mark.parametrize("spec, words", [
    ({"a.gguf": True}, "must be a number"),
    ({"a.gguf": "1"}, "must be a number"),
    ({"a.gguf": None}, "must be a number"),
    ([3], "a path or a \\(path, scale\\) pair"),
    ([("a.gguf", 1.0, 2.0)], "a path or a \\(path, scale\\) pair"),
    ({3: 1.0}, "str or os.PathLike"),
    (3.5, "lora must be"),
    (b"a.gguf", "lora must be"),
])
def test_other_types_are_refused(spec, words):
    with pytest.raises(TypeError, match=words):
        parse_lora(spec)


def test_the_same_file_twice_is_refused(tmp_path):
    target = tmp_path / "a.gguf"
    target.write_bytes(b"")
    (tmp_path / "link.gguf").symlink_to(target)
    with pytest.raises(ValueError, match="listed twice"):
        parse_lora([(target, 1.0), (tmp_path / "link.gguf", 0.5)])
