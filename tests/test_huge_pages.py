"""The weights on transparent huge pages: finding their memory, advising it, and the default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cyllama_cffi import GenerationConfig, LLM, LlamaModel
from cyllama_cffi import huge_pages
from cyllama_cffi.huge_pages import (HUGE_PAGE, anonymous_ranges, huge_page_interior, mem_available,
                                     new_ranges, private_weights_by_default, thp_mode)

THP_REASON = "this kernel gives no transparent huge pages to advised memory (transparent_hugepage/enabled is never or absent)"

MAPS = """\
55d0c6a00000-55d0c6a2b000 r--p 00000000 fe:00 1234    /usr/bin/python3.11
55d0c8000000-55d0c9400000 rw-p 00000000 00:00 0       [heap]
7f0000000000-7f0006000000 rw-p 00000000 00:00 0
7f0006000000-7f0006200000 r--p 00000000 00:00 0
7f0008000000-7f0008200000 rw-s 00000000 00:01 42      /dev/zero (deleted)
7f000a000000-7f000a400000 rw-p 00000000 fe:00 99      /root/model.gguf
7ffd1a000000-7ffd1a021000 rw-p 00000000 00:00 0       [stack]
"""


def test_anonymous_ranges_keeps_private_writable_anonymous_mappings_and_the_heap():
    assert anonymous_ranges(MAPS) == [(0x55d0c8000000, 0x55d0c9400000), (0x7f0000000000, 0x7f0006000000)]


def covered(ranges):
    return {address for start, end in ranges for address in range(start, end)}


small_ranges = st.lists(st.tuples(st.integers(0, 60), st.integers(1, 20)).map(lambda r: (r[0], r[0] + r[1])),
                        max_size=6)


@given(small_ranges, small_ranges)
def test_new_ranges_is_exactly_what_after_adds_to_before(before, after):
    result = new_ranges(before, after)
    assert covered(result) == covered(after) - covered(before)
    assert all(start < end for start, end in result)
    assert all(a[1] <= b[0] for a, b in zip(result, result[1:]))  # sorted and disjoint


def test_a_grown_mapping_counts_only_with_its_new_part():
    assert new_ranges([(0, 100)], [(0, 250)]) == [(100, 250)]
    assert new_ranges([(100, 200)], [(0, 300)]) == [(0, 100), (200, 300)]


def test_huge_page_interior_rounds_inwards():
    assert huge_page_interior(1, 3 * HUGE_PAGE - 1) == (HUGE_PAGE, 2 * HUGE_PAGE)
    assert huge_page_interior(0, 2 * HUGE_PAGE) == (0, 2 * HUGE_PAGE)
    assert huge_page_interior(1, 2 * HUGE_PAGE - 1) is None


def test_thp_mode_and_mem_available_read_the_kernel_files(tmp_path):
    enabled = tmp_path / "enabled"
    enabled.write_text("always [madvise] never\n")
    assert thp_mode(enabled) == "madvise"
    enabled.write_text("[never]\n")
    assert thp_mode(enabled) == "never"
    assert thp_mode(tmp_path / "missing") is None
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   1000 kB\n")
    assert mem_available(meminfo) == 1000 * 1024
    meminfo.write_text("MemTotal: 1 kB\n")
    assert mem_available(meminfo) is None


@pytest.mark.parametrize("mode, available, expected", [
    ("madvise", 1000, True), ("always", 1000, True), ("madvise", 399, False),
    ("never", 10**9, False), (None, 10**9, False), ("madvise", None, False),
])
def test_private_weights_only_with_huge_pages_and_room_for_the_copy(mode, available, expected):
    assert private_weights_by_default(200, mode, available) is expected


def test_use_mmap_is_validated():
    with pytest.raises(ValueError, match="use_mmap must be None or a bool"):
        GenerationConfig(use_mmap="no")


LOAD_CHILD = textwrap.dedent("""
    import json, sys
    from cyllama_cffi import LLM, LlamaModel

    def anon_huge():
        for line in open("/proc/self/smaps_rollup"):
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024

    before = anon_huge()
    how = sys.argv[2]
    if how == "LLM":
        model = LLM(sys.argv[1]).model
    else:
        model = LlamaModel(sys.argv[1], use_mmap=False, huge_pages=(how == "advised"))
    print(json.dumps({"use_mmap": model.use_mmap, "advised": model.huge_page_bytes,
                      "anon_huge_added": anon_huge() - before}))
""")


def load_in_child(model_path: Path, how: str) -> dict:
    """Load in a fresh process: no other test's memory comes or goes while the pages are counted."""
    done = subprocess.run([sys.executable, "-c", LOAD_CHILD, str(model_path), how],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_llm_by_default_puts_the_weights_on_huge_pages(model_path):
    """Fails without the advice: in THP's madvise mode a private copy gets no huge page."""
    size = os.path.getsize(model_path)
    loaded = load_in_child(model_path, "LLM")
    if not huge_pages.supported():
        assert loaded["use_mmap"] is True and loaded["advised"] == 0  # llama.cpp's mmap, as before
        pytest.skip(THP_REASON)
    assert loaded["use_mmap"] is False
    assert loaded["advised"] >= 0.8 * size
    assert loaded["anon_huge_added"] >= 0.8 * size  # the kernel really backed the weights with huge pages


def test_a_private_copy_without_advice_stays_on_small_pages(model_path):
    if thp_mode() != "madvise":
        pytest.skip("only THP's madvise mode tells advised memory from other memory; "
                    f"this kernel's mode is {thp_mode()!r}")
    loaded = load_in_child(model_path, "not advised")
    assert loaded["advised"] == 0
    assert loaded["anon_huge_added"] < HUGE_PAGE * 4
    assert load_in_child(model_path, "advised")["anon_huge_added"] >= 0.8 * os.path.getsize(model_path)


def test_mmap_when_asked_and_the_same_tokens_either_way(model_path):
    prompt = "Once upon a time, in a land far away,"
    texts = {}
    for use_mmap in (True, False):
        with LLM(model_path, use_mmap=use_mmap, temperature=0, max_tokens=24) as llm:
            assert llm.model.use_mmap is use_mmap
            if use_mmap:
                assert llm.model.huge_page_bytes == 0
            texts[use_mmap] = llm(prompt).text
    assert texts[True] == texts[False] and texts[True]


def test_low_level_model_keeps_llama_cpp_default_of_mmap(model_path):
    model = LlamaModel(model_path)
    try:
        assert model.use_mmap is True and model.huge_page_bytes == 0
    finally:
        model.close()
