"""The pure parts of the huge-page support: reading /proc and /sys text, and range arithmetic.

``cyllama_cffi._huge_pages`` takes ``lib`` from ``._ffi`` at import, which loads the compiled
module. Here a private copy of it is executed with a stand-in ``cyllama_cffi._ffi`` in
``sys.modules`` for the length of that import only (the real one, if loaded, is put back), and
the stand-in's ``lib`` records the madvise calls :class:`HugePageAdvisor` makes.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cyllama_cffi

MODULE_PATH = Path(cyllama_cffi.__file__).resolve().parent / "_huge_pages.py"
MiB = 1 << 20


class FakeLib:
    def __init__(self, result: int = 0) -> None:
        self.result = result
        self.calls = []

    def cyl_advise_huge_pages(self, address: int, length: int) -> int:
        self.calls.append((address, length))
        return self.result


def load_without_native():
    fake_ffi = types.ModuleType("cyllama_cffi._ffi")
    fake_ffi.ffi, fake_ffi.lib = None, FakeLib()
    missing = object()
    saved = sys.modules.get("cyllama_cffi._ffi", missing)
    sys.modules["cyllama_cffi._ffi"] = fake_ffi
    try:
        spec = importlib.util.spec_from_file_location("cyllama_cffi._huge_pages", MODULE_PATH)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # not registered in sys.modules: the real one stays untouched
    finally:
        if saved is missing:
            del sys.modules["cyllama_cffi._ffi"]
        else:
            sys.modules["cyllama_cffi._ffi"] = saved
    return module


hp = load_without_native()
HUGE = hp.HUGE_PAGE

MAPS = """\
55d0c6a00000-55d0c6a2b000 r--p 00000000 fe:00 1234    /usr/bin/python3.11
55d0c8000000-55d0c9400000 rw-p 00000000 00:00 0       [heap]
7f0000000000-7f0006000000 rw-p 00000000 00:00 0
7f0006000000-7f0006200000 r--p 00000000 00:00 0
7f0007000000-7f0007200000 ---p 00000000 00:00 0
7f0008000000-7f0008200000 rw-s 00000000 00:01 42      /dev/zero (deleted)
7f000a000000-7f000a400000 rw-p 00000000 fe:00 99      /srv/models/tiny model.gguf
7f000c000000-7f000c200000 rwxp 00000000 00:00 0
7ffd1a000000-7ffd1a021000 rw-p 00000000 00:00 0       [stack]
7ffd1b000000-7ffd1b002000 r-xp 00000000 00:00 0       [vdso]
garbage line
"""


def test_the_copy_is_the_real_module_and_the_stand_in_is_gone():
    assert hp.__file__ == str(MODULE_PATH) and hp.HUGE_PAGE == 2 * MiB
    assert hp.ADVISABLE_MODES == ("always", "madvise")
    assert isinstance(hp.lib, FakeLib)
    assert not isinstance(getattr(sys.modules.get("cyllama_cffi._ffi"), "lib", None), FakeLib)


def test_anonymous_ranges_keeps_private_writable_anonymous_memory_and_the_heap():
    assert hp.anonymous_ranges(MAPS) == [(0x55d0c8000000, 0x55d0c9400000), (0x7f0000000000, 0x7f0006000000),
                                         (0x7f000c000000, 0x7f000c200000)]
    assert hp.anonymous_ranges("") == []


def covered(ranges):
    return {address for start, end in ranges for address in range(start, end)}


small_ranges = st.lists(st.tuples(st.integers(0, 60), st.integers(1, 20)).map(lambda r: (r[0], r[0] + r[1])),
                        max_size=6)


@settings(max_examples=100, deadline=None)
@given(small_ranges, small_ranges)
def test_new_ranges_is_exactly_what_after_adds_to_before(before, after):
    result = hp.new_ranges(before, after)
    assert covered(result) == covered(after) - covered(before)
    assert all(start < end for start, end in result)
    assert all(a[1] < b[0] for a, b in zip(result, result[1:]))  # sorted, disjoint, not even touching


def test_new_ranges_examples():
    assert hp.new_ranges([(0, 100)], [(0, 250)]) == [(100, 250)]  # a grown mapping: its new part
    assert hp.new_ranges([(100, 200)], [(0, 300)]) == [(0, 100), (200, 300)]
    assert hp.new_ranges([], [(5, 10), (0, 6)]) == [(0, 10)]  # overlapping "after" ranges merge
    assert hp.new_ranges([(0, 10)], [(0, 10)]) == []


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 64 * HUGE), st.integers(0, 64 * HUGE))
def test_huge_page_interior_is_the_whole_huge_pages_inside(start, length):
    end = start + length
    interior = hp.huge_page_interior(start, end)
    pages = [p for p in range(0, end + HUGE, HUGE) if p >= start and p + HUGE <= end]
    if not pages:
        assert interior is None
    else:
        assert interior == (pages[0], pages[-1] + HUGE)


def test_huge_page_interior_examples():
    assert hp.huge_page_interior(1, 3 * HUGE - 1) == (HUGE, 2 * HUGE)
    assert hp.huge_page_interior(0, 2 * HUGE) == (0, 2 * HUGE)
    assert hp.huge_page_interior(1, 2 * HUGE - 1) is None
    assert hp.huge_page_interior(HUGE, HUGE) is None


@pytest.mark.parametrize("text, mode", [
    ("always [madvise] never\n", "madvise"), ("[always] madvise never\n", "always"),
    ("always madvise [never]\n", "never"), ("always madvise never\n", None), ("", None),
])
def test_thp_mode_reads_the_bracketed_setting(tmp_path, text, mode):
    enabled = tmp_path / "enabled"
    enabled.write_text(text)
    assert hp.thp_mode(enabled) == mode


def test_thp_mode_without_the_file(tmp_path):
    assert hp.thp_mode(tmp_path / "missing") is None
    assert hp.thp_mode(tmp_path) is None  # a directory: unreadable as text


@pytest.mark.parametrize("text, available", [
    ("MemTotal:       24000000 kB\nMemFree: 5 kB\nMemAvailable:   1000 kB\n", 1000 * 1024),
    ("MemAvailable: 0 kB\n", 0),
    ("MemTotal: 1 kB\n", None),
    ("MemAvailable: lots kB\n", None),
    ("MemAvailable:\n", None),
])
def test_mem_available_reads_meminfo(tmp_path, text, available):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(text)
    assert hp.mem_available(meminfo) == available


def test_mem_available_without_the_file(tmp_path):
    assert hp.mem_available(tmp_path / "missing") is None


def maps_line(start: int, end: int, name: str = "") -> str:
    return f"{start:x}-{end:x} rw-p 00000000 00:00 0 {name}\n"


def advisor_with(monkeypatch, before: str, after: str, result: int = 0):
    lib = FakeLib(result)
    monkeypatch.setattr(hp, "lib", lib)
    texts = iter([before, after])
    monkeypatch.setattr(hp, "_read_maps", lambda: next(texts))
    return hp.HugePageAdvisor(), lib


def test_the_advisor_advises_whole_huge_pages_of_new_memory_once(monkeypatch):
    old = maps_line(0x100000000, 0x100400000)
    weights = maps_line(0x200001000, 0x200001000 + 7 * HUGE)  # unaligned start: 6 whole huge pages inside
    tiny = maps_line(0x300000000, 0x300000000 + HUGE - 4096)  # no whole huge page
    advisor, lib = advisor_with(monkeypatch, old, old + weights + tiny)
    assert advisor.advised_bytes == 0
    assert advisor.advise() == 6 * HUGE == advisor.advised_bytes
    assert lib.calls == [(0x200200000, 6 * HUGE)]
    assert advisor.advise() == 6 * HUGE and len(lib.calls) == 1  # once only


def test_the_advisor_counts_only_what_madvise_accepted(monkeypatch):
    advisor, lib = advisor_with(monkeypatch, "", maps_line(0, 4 * HUGE), result=-1)
    assert advisor.advise() == 0 and lib.calls == [(0, 4 * HUGE)]


def test_the_advisor_leaves_grown_memory_s_old_part_alone(monkeypatch):
    advisor, lib = advisor_with(monkeypatch, maps_line(0, 2 * HUGE, "[heap]"), maps_line(0, 6 * HUGE, "[heap]"))
    assert advisor.advise() == 4 * HUGE and lib.calls == [(2 * HUGE, 4 * HUGE)]


def test_the_advisor_without_proc_does_nothing(monkeypatch):
    lib = FakeLib()
    monkeypatch.setattr(hp, "lib", lib)

    def no_proc():
        raise FileNotFoundError("/proc/self/maps")

    monkeypatch.setattr(hp, "_read_maps", no_proc)
    advisor = hp.HugePageAdvisor()
    assert advisor.advise() == 0 and lib.calls == []


@pytest.mark.parametrize("platform, mode, expected", [
    ("linux", "madvise", True), ("linux", "always", True), ("linux", "never", False), ("linux", None, False),
    ("darwin", "madvise", False),
])
def test_supported_needs_linux_and_an_advisable_thp_mode(monkeypatch, platform, mode, expected):
    monkeypatch.setattr(hp, "thp_mode", lambda: mode)
    monkeypatch.setattr(hp, "sys", types.SimpleNamespace(platform=platform))
    assert hp.supported() is expected
