"""Mutate the tiny GGUF models by the thousand and load each mutant in a crash-proof child.

    python bench/fuzz_gguf.py --cases 5000 --seed 1 --mode mix

Why: tests/test_robustness.py runs a few hundred Hypothesis examples per CI
run; finding a new class of crash needs far more. This is the explorer that
found the rules of cyllama_cffi/gguf_semantics.py: it prints a tally and every
mutant that crashed or hung the child, with the mutation, so a crash can be
turned into a rule and a regression case. Exit code 1 if any crashed.

Modes: ``flip`` (a byte anywhere), ``flip_header`` (a byte of the header),
``field`` (a header integer set to a boundary value), ``value`` (a 4/8-byte
metadata value), ``string`` (bytes inside key/value/token strings),
``types`` / ``dims`` / ``offsets`` (those fields only), ``truncate``,
``multi`` (several at once), ``mix`` (any of them).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from crashproof import Worker, mutant_case  # noqa: E402
from tiny_gguf import Field, TinySpec, field_map, header_size, write_tiny_llama  # noqa: E402

INTERESTING = [0, 1, 2, 3, 4, 7, 8, 9, 12, 13, 16, 31, 32, 63, 64, 255, 256, 511, 512, 513, 1023, 1024,
               1025, 4096, 65535, 65536, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1]
MODES = ("flip", "flip_header", "field", "value", "string", "types", "dims", "offsets", "truncate", "multi")


class Mutator:
    """Builds one mutant (a list of byte patches, or a truncation) and describes it."""

    def __init__(self, data: bytes, rng: random.Random) -> None:
        self.data, self.rng = data, rng
        self.fields = field_map(data)
        self.header_end = header_size(data)
        self.patches: Dict[int, int] = {}
        self.truncate: Optional[int] = None
        self.notes: List[str] = []

    def set_field(self, field: Field, value: int) -> None:
        value %= 1 << 8 * field.width
        for index, byte in enumerate(value.to_bytes(field.width, "little")):
            self.patches[field.offset + index] = byte
        self.notes.append(f"{field.kind}:{field.label}@{field.offset}={value}")

    def field_of(self, kinds, values=None) -> None:
        field = self.rng.choice([f for f in self.fields if kinds is None or f.kind in kinds])
        if values is None and self.rng.random() < 0.3:
            old = int.from_bytes(self.data[field.offset:field.offset + field.width], "little")
            self.set_field(field, old + self.rng.choice((-16, -2, -1, 1, 2, 16)))
        else:
            self.set_field(field, self.rng.choice(values or INTERESTING + [self.rng.getrandbits(8 * field.width)]))

    def flip(self, limit: int) -> None:
        offset, mask = self.rng.randrange(limit), self.rng.randrange(1, 256)
        self.patches[offset] = self.patches.get(offset, self.data[offset]) ^ mask
        self.notes.append(f"flip@{offset}^{mask}")

    def string(self) -> None:
        field = self.rng.choice([f for f in self.fields if f.kind in ("string_len", "key_len", "name_len")])
        length = int.from_bytes(self.data[field.offset:field.offset + 8], "little")
        if length:
            start = field.offset + 8
            for _ in range(self.rng.randint(1, 2)):
                offset = start + self.rng.randrange(length)
                self.patches[offset] = self.rng.choice((self.rng.randrange(256), 0, 0x20, 0x3C, 0x3E,
                                                        self.data[start + self.rng.randrange(length)]))
            self.notes.append(f"string:{field.label}@{field.offset}")

    def apply(self, mode: str) -> None:
        actions: Dict[str, Callable[[], None]] = {
            "flip": lambda: self.flip(len(self.data)),
            "flip_header": lambda: self.flip(self.header_end + 64),
            "field": lambda: self.field_of(None),
            "value": lambda: self.field_of(("value",)),
            "string": self.string,
            "types": lambda: self.field_of(("tensor_type", "value_type", "array_type"), list(range(45))),
            "dims": lambda: self.field_of(("dim", "n_dims")),
            "offsets": lambda: self.field_of(("tensor_offset", "alignment")),
            "truncate": self._truncate,
            "multi": self._multi,
        }
        actions[mode]()

    def _truncate(self) -> None:
        self.truncate = self.rng.randrange(len(self.data))
        self.notes.append(f"truncate@{self.truncate}")

    def _multi(self) -> None:
        for _ in range(self.rng.randint(2, 6)):
            self.apply(self.rng.choice(("field", "flip_header", "string", "value")))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mode", choices=MODES + ("mix",), default="mix")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as folder:
        bases = [write_tiny_llama(Path(folder) / "llama.gguf"),
                 write_tiny_llama(Path(folder) / "gpt2.gguf", TinySpec(tokenizer="gpt2")),
                 write_tiny_llama(Path(folder) / "aligned.gguf", TinySpec(alignment=64))]
        data = {path: path.read_bytes() for path in bases}
        cases, notes = [], {}
        for index in range(args.cases):
            base = rng.choice(bases)
            mutator = Mutator(data[base], rng)
            mutator.apply(args.mode if args.mode != "mix" else rng.choice(MODES))
            case_id = str(index)
            notes[case_id] = f"{base.name} {' '.join(mutator.notes)}"
            cases.append(mutant_case(case_id, base, [(o, bytes([b])) for o, b in sorted(mutator.patches.items())],
                                     mutator.truncate))
        started = time.monotonic()
        with Worker(timeout=60) as worker:
            outcomes = worker.run(cases)
    tally = Counter((o.status, o.error) for o in outcomes)
    print(f"{len(outcomes)} mutants ({args.mode}, seed {args.seed}) in {time.monotonic() - started:.1f} s: "
          + ", ".join(f"{status}{'/' + error if error else ''} {count}" for (status, error), count in tally.most_common()))
    bad = [o for o in outcomes if not o.is_clean()]
    for outcome in bad:
        print(f"  {outcome.status} rc={outcome.returncode} {outcome.error} {notes[outcome.case_id]}")
        print("    " + outcome.stderr[-800:].replace("\n", "\n    "))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
