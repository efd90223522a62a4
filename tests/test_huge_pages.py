"""The weights on transparent huge pages (``use_mmap=False``), end to end in fresh processes.

The pure helpers (maps parsing, range arithmetic, kernel files) are tested in tests/unit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cyllama_cffi import LLM, LlamaModel
from cyllama_cffi import _huge_pages as huge_pages
from cyllama_cffi._huge_pages import HUGE_PAGE, thp_mode

THP_REASON = "this kernel gives no transparent huge pages to advised memory (transparent_hugepage/enabled is never or absent)"

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
    elif how == "LLM-private":
        model = LLM(sys.argv[1], use_mmap=False).model
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


def test_llm_maps_the_file_by_default(model_path):
    loaded = load_in_child(model_path, "LLM")
    assert loaded["use_mmap"] is True and loaded["advised"] == 0  # llama.cpp's mmap


def test_llm_with_use_mmap_false_puts_the_weights_on_huge_pages(model_path):
    """Fails without the advice: in THP's madvise mode a private copy gets no huge page."""
    size = os.path.getsize(model_path)
    loaded = load_in_child(model_path, "LLM-private")
    assert loaded["use_mmap"] is False
    if not huge_pages.supported():
        assert loaded["advised"] == 0
        pytest.skip(THP_REASON)
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
