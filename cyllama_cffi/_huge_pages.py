"""Weights on transparent huge pages: a private copy of the weights that decodes faster.

A token's decode reads every weight once. In 4 KiB pages the default model's ~100 MB are
~25,000 pages, far more than the CPU's TLB holds, so every token pays page walks; in 2 MiB
pages they are ~50. Linux backs *anonymous* memory that was marked with
``madvise(MADV_HUGEPAGE)`` with such pages (THP in its common ``madvise`` mode), but not a
read-only mapping of a regular file (llama.cpp's default ``mmap`` load; only kernels built with
``CONFIG_READ_ONLY_THP_FOR_FS`` have any way to). Loading without mmap puts the weights
in anonymous memory that ggml allocates itself, with no hook for advice. So :class:`HugePageAdvisor`
snapshots the process's anonymous mappings before the load and compares them at llama.cpp's first
progress callback, which comes after the weight buffers are allocated and before the first
tensor is read: what is new then is the weights' memory, advised before a page of it is touched.
Measured on a 2-core CPU: 2-7 % less time per decoded token than the same weights through
mmap, for a slower load and private memory (docs/performance.md). ``use_mmap=False`` opts in.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

from ._ffi import lib
from ._logging import get_logger

HUGE_PAGE = 2 << 20  # x86-64's and arm64's (4 KiB granule) transparent huge page size
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
MEMINFO = Path("/proc/meminfo")
MAPS = Path("/proc/self/maps")
ADVISABLE_MODES = ("always", "madvise")  # THP settings under which advised memory gets huge pages

Range = Tuple[int, int]


def thp_mode(enabled_file: Path = THP_ENABLED) -> Optional[str]:
    """The kernel's THP setting (``always``, ``madvise`` or ``never``); None without THP."""
    try:
        text = enabled_file.read_text()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def mem_available(meminfo_file: Path = MEMINFO) -> Optional[int]:
    """Bytes the kernel can give out without swapping (``MemAvailable``); None if unknown."""
    try:
        for line in meminfo_file.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def anonymous_ranges(maps_text: str) -> List[Range]:
    """Address ranges of private, writable, anonymous mappings in ``/proc/<pid>/maps`` text."""
    ranges = []
    for line in maps_text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
            continue
        name = fields[5].strip() if len(fields) == 6 else ""
        perms = fields[1]
        if name not in ("", "[heap]") or "w" not in perms or not perms.endswith("p"):
            continue
        start, end = (int(bound, 16) for bound in fields[0].split("-"))
        ranges.append((start, end))
    return ranges


def new_ranges(before: Iterable[Range], after: Iterable[Range]) -> List[Range]:
    """The parts of ``after``'s ranges not covered by any of ``before``'s (sorted, disjoint).

    A mapping that grew (the heap, or a new mapping the kernel merged with its neighbour) counts
    only with its new part: nothing that existed before is advised.
    """
    old = sorted(before)
    result: List[Range] = []
    for start, end in _union(after):
        cursor = start
        for old_start, old_end in old:
            if old_end <= cursor or old_start >= end:
                continue
            if old_start > cursor:
                result.append((cursor, old_start))
            cursor = max(cursor, old_end)
            if cursor >= end:
                break
        if cursor < end:
            result.append((cursor, end))
    return result


def _union(ranges: Iterable[Range]) -> List[Range]:
    merged: List[Range] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def huge_page_interior(start: int, end: int) -> Optional[Range]:
    """The whole huge pages inside ``[start, end)``; None if there is none."""
    first = (start + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
    last = end & ~(HUGE_PAGE - 1)
    return (first, last) if last > first else None


def _read_maps() -> str:
    return MAPS.read_text()


class HugePageAdvisor:
    """Advise the anonymous memory mapped between construction and the first :meth:`advise` call.

    ``advised_bytes`` is how much was advised (0 if nothing whole-huge-page-sized was new, or
    where there is no such advice).
    """

    def __init__(self) -> None:
        self.advised_bytes = 0
        self._done = False
        try:
            self._before: Optional[List[Range]] = anonymous_ranges(_read_maps())
        except OSError:  # no /proc: nothing to compare with
            self._before = None

    def advise(self) -> int:
        """Advise what is new since construction (once; later calls do nothing)."""
        if self._done or self._before is None:
            return self.advised_bytes
        self._done = True
        try:
            after = anonymous_ranges(_read_maps())
        except OSError:
            return 0
        for start, end in new_ranges(self._before, after):
            interior = huge_page_interior(start, end)
            if interior is None:
                continue
            length = interior[1] - interior[0]
            if lib.cyl_advise_huge_pages(interior[0], length) == 0:
                self.advised_bytes += length
            else:  # e.g. a kernel without THP; the load goes on in small pages
                get_logger().debug("madvise(MADV_HUGEPAGE) failed for %d bytes", length)
        return self.advised_bytes


def supported() -> bool:
    """Whether this process can put advised memory on huge pages at all."""
    return sys.platform.startswith("linux") and thp_mode() in ADVISABLE_MODES
