"""``Grammar``: a GBNF grammar checked before llama.cpp sees it, for structured output.

``Grammar.from_string(gbnf)`` takes GBNF text (llama.cpp's grammar format);
``Grammar.from_json_schema(schema)`` converts a JSON schema (see :mod:`._json_schema`). Either
raises ``ValueError`` naming the problem for a grammar llama.cpp could not use.

Why our own parse, before llama.cpp's: llama.cpp's parser reports its errors only on stderr,
and some grammars it accepts end the process or never return. Its parser and its
left-recursion check are recursive, so nesting thousands of groups deep overflows the C stack;
the left-recursion check visits a rule once per path to it, so a chain of rules with two
alternatives each takes exponential time; a NUL character cuts the text short where C reads
it. This module parses the text the way llama.cpp does (same syntax, same rewriting of
repetitions, same left-recursion rule), refuses those cases with a clear message, and then, when the compiled
module is already loaded, lets llama.cpp parse it once as the final word (otherwise llama.cpp's
parse happens when a generation builds its sampler, with the same ``ValueError``).
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

__all__ = ["Grammar", "MAX_NESTING", "MAX_REPETITION"]

MAX_REPETITION = 2000      # llama.cpp's MAX_REPETITION_THRESHOLD: larger counts are refused or unbounded
MAX_NESTING = 200          # groups inside groups: one C stack frame pair a level in llama.cpp's parser
MAX_LEFT_DEPTH = 5000      # rule references followed at the start of a rule, one C frame each
MAX_LEFT_VISITS = 200_000  # work of llama.cpp's left-recursion check (it revisits shared rules)

# Element kinds, as llama.cpp's llama_gretype.
END, ALT, REF, CHAR, CHAR_NOT, CHAR_RNG_UPPER, CHAR_ALT, CHAR_ANY, TOKEN, TOKEN_NOT = range(10)

_ESCAPES = {"t": 9, "r": 13, "n": 10, "\\": 92, '"': 34, "[": 91, "]": 93, "-": 45}
_HEX = {"x": 2, "u": 4, "U": 8}


class Grammar:
    """A checked GBNF grammar: ``gbnf`` (its text) and ``root`` (its start rule).

    Make one with :meth:`from_string` or :meth:`from_json_schema`; pass it (or GBNF text) as
    ``GenerationConfig(grammar=...)``. It holds no C object: each generation builds its own
    grammar sampler from the text.
    """

    __slots__ = ("gbnf", "root", "_token_ids")

    def __init__(self, gbnf: str, root: str = "root") -> None:
        if not isinstance(gbnf, str):
            raise TypeError(f"a grammar must be GBNF text (str), got {type(gbnf).__name__}")
        if not isinstance(root, str):
            raise TypeError(f"the root rule name must be a str, got {type(root).__name__}")
        parsed = _Parser(gbnf).parse()
        _check_rules(parsed, root)
        _check_with_llama_cpp(gbnf, root, parsed)
        self.gbnf = gbnf
        self.root = root
        self._token_ids = parsed.token_ids

    @classmethod
    def from_string(cls, gbnf: str, root: str = "root") -> "Grammar":
        """The grammar written in ``gbnf``, starting at rule ``root``; ``ValueError`` if it is unusable."""
        return cls(gbnf, root)

    @classmethod
    def from_json_schema(cls, schema: Union[Mapping[str, Any], bool]) -> "Grammar":
        """A grammar of the JSON documents valid under ``schema`` (a dict, as ``json.loads`` gives).

        Unsupported keywords raise ``ValueError`` naming them; docs/structured-output.md lists
        what is supported and how bounds are enforced.
        """
        from ._json_schema import json_schema_to_gbnf

        return cls(json_schema_to_gbnf(schema), "root")

    def check_tokens(self, n_vocab: int) -> None:
        """``ValueError`` if a ``<[id]>`` of the grammar is outside a vocabulary of ``n_vocab`` tokens."""
        bad = [token for token in self._token_ids if token >= n_vocab]
        if bad:
            raise ValueError(f"the grammar names token id {bad[0]}, outside the vocabulary [0, {n_vocab})")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Grammar):
            return (self.gbnf, self.root) == (other.gbnf, other.root)
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.gbnf, self.root))

    def __str__(self) -> str:
        return self.gbnf

    def __repr__(self) -> str:
        lines = self.gbnf.count("\n") + 1
        return f"<Grammar root={self.root!r}, {lines} line{'s' if lines != 1 else ''}>"


# -- parsing, as llama.cpp's llama_grammar_parser -------------------------------------------

class _Parsed:
    def __init__(self) -> None:
        self.symbol_ids: Dict[str, int] = {}
        self.rules: List[Optional[List[Tuple[int, int]]]] = []
        self.defined: Dict[str, int] = {}  # rules written in the text (not synthesized)
        self.token_ids: List[int] = []
        self.has_named_tokens = False


class _Parser:
    """A port of llama.cpp's recursive-descent GBNF parser, with a nesting limit."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.out = _Parsed()

    def error(self, message: str, pos: int) -> ValueError:
        line = self.text.count("\n", 0, pos) + 1
        column = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        excerpt = self.text[pos:pos + 20]
        at = f"at line {line}, column {column}" + (f" ({excerpt!r}...)" if excerpt else " (end of text)")
        return ValueError(f"invalid GBNF grammar: {message} {at}")

    def at(self, pos: int) -> str:
        return self.text[pos] if pos < len(self.text) else ""

    def parse(self) -> _Parsed:
        text = self.text
        if "\x00" in text:
            raise self.error("NUL character (C would read the grammar only up to it)", text.index("\x00"))
        pos = self.space(0, True)
        if pos >= len(text):
            raise ValueError("invalid GBNF grammar: it is empty (no rules)")
        while pos < len(text):
            pos = self.rule(pos)
        return self.out

    # -- lexical helpers
    def space(self, pos: int, newline_ok: bool) -> int:
        text = self.text
        while pos < len(text):
            c = text[pos]
            if c == "#":
                while pos < len(text) and text[pos] not in "\r\n":
                    pos += 1
            elif c in " \t" or (newline_ok and c in "\r\n"):
                pos += 1
            else:
                break
        return pos

    def name(self, pos: int) -> int:
        end = pos
        while end < len(self.text) and (self.text[end].isascii() and (self.text[end].isalnum() or self.text[end] == "-")):
            end += 1
        if end == pos:
            raise self.error("expected a rule name", pos)
        return end

    def integer(self, pos: int) -> int:
        end = pos
        while end < len(self.text) and "0" <= self.text[end] <= "9":
            end += 1
        if end == pos:
            raise self.error("expected an integer", pos)
        return end

    def char(self, pos: int) -> Tuple[int, int]:
        text = self.text
        if pos >= len(text):
            raise self.error("unexpected end of input", pos)
        if text[pos] == "\\":
            kind = self.at(pos + 1)
            if kind in _HEX:
                digits = text[pos + 2:pos + 2 + _HEX[kind]]
                if len(digits) != _HEX[kind] or any(c not in "0123456789abcdefABCDEF" for c in digits):
                    raise self.error(f"expected {_HEX[kind]} hex digits after \\{kind}", pos)
                return int(digits, 16), pos + 2 + _HEX[kind]
            if kind in _ESCAPES:
                return _ESCAPES[kind], pos + 2
            raise self.error("unknown escape", pos)
        return ord(text[pos]), pos + 1

    def symbol(self, name: str) -> int:
        ids = self.out.symbol_ids
        if name not in ids:
            ids[name] = len(ids)
        return ids[name]

    def new_symbol(self, base: str) -> int:
        ids = self.out.symbol_ids
        next_id = len(ids)
        ids[f"{base}_{next_id}"] = next_id
        return next_id

    def add_rule(self, rule_id: int, rule: List[Tuple[int, int]]) -> None:
        rules = self.out.rules
        while len(rules) <= rule_id:
            rules.append(None)
        rules[rule_id] = rule

    # -- grammar structure
    def rule(self, pos: int) -> int:
        end = self.name(pos)
        name = self.text[pos:end]
        rule_id = self.symbol(name)
        pos = self.space(end, False)
        if not self.text.startswith("::=", pos):
            raise self.error("expected ::=", pos)
        if name in self.out.defined:
            pass  # llama.cpp lets a later definition replace an earlier one
        self.out.defined[name] = pos
        pos = self.alternates(self.space(pos + 3, True), name, rule_id, False, 0)
        c = self.at(pos)
        if c == "\r":
            pos += 2 if self.at(pos + 1) == "\n" else 1
        elif c == "\n":
            pos += 1
        elif c:
            raise self.error("expected a newline or the end of the text", pos)
        return self.space(pos, True)

    def alternates(self, pos: int, name: str, rule_id: int, nested: bool, depth: int) -> int:
        if depth > MAX_NESTING:
            raise self.error(f"groups nested more than {MAX_NESTING} deep", pos)
        rule: List[Tuple[int, int]] = []
        pos = self.sequence(pos, name, rule, nested, depth)
        while self.at(pos) == "|":
            rule.append((ALT, 0))
            pos = self.sequence(self.space(pos + 1, True), name, rule, nested, depth)
        rule.append((END, 0))
        self.add_rule(rule_id, rule)
        return pos

    def sequence(self, pos: int, name: str, rule: List[Tuple[int, int]], nested: bool, depth: int) -> int:
        text = self.text
        last_start = len(rule)
        n_prev_rules = 1
        while pos < len(text):
            c = text[pos]
            if c == '"':
                pos += 1
                last_start, n_prev_rules = len(rule), 1
                while self.at(pos) != '"':
                    if pos >= len(text):
                        raise self.error("unterminated string literal", pos)
                    value, pos = self.char(pos)
                    rule.append((CHAR, value))
                pos = self.space(pos + 1, nested)
            elif c == "[":
                pos += 1
                start_type = CHAR
                if self.at(pos) == "^":
                    pos += 1
                    start_type = CHAR_NOT
                last_start, n_prev_rules = len(rule), 1
                while self.at(pos) != "]":
                    if pos >= len(text):
                        raise self.error("unterminated character class ('[' without ']')", pos)
                    value, pos = self.char(pos)
                    rule.append((CHAR_ALT if last_start < len(rule) else start_type, value))
                    if self.at(pos) == "-" and self.at(pos + 1) != "]":
                        if pos + 1 >= len(text):
                            raise self.error("unexpected end of input", pos)
                        upper, pos = self.char(pos + 1)
                        rule.append((CHAR_RNG_UPPER, upper))
                pos = self.space(pos + 1, nested)
            elif c in "<!":
                kind = TOKEN
                if c == "!":
                    kind = TOKEN_NOT
                    pos += 1
                value, pos = self.token(pos)
                last_start, n_prev_rules = len(rule), 1
                rule.append((kind, value))
                pos = self.space(pos, nested)
            elif c.isascii() and (c.isalnum() or c == "-"):
                end = self.name(pos)
                ref = self.symbol(text[pos:end])
                pos = self.space(end, nested)
                last_start, n_prev_rules = len(rule), 1
                rule.append((REF, ref))
            elif c == "(":
                pos = self.space(pos + 1, True)
                before = len(self.out.symbol_ids)
                sub = self.new_symbol(name)
                pos = self.alternates(pos, name, sub, True, depth + 1)
                n_prev_rules = max(1, len(self.out.symbol_ids) - before)
                last_start = len(rule)
                rule.append((REF, sub))
                if self.at(pos) != ")":
                    raise self.error("expected ')' (unbalanced parentheses)", pos)
                pos = self.space(pos + 1, nested)
            elif c == ".":
                last_start, n_prev_rules = len(rule), 1
                rule.append((CHAR_ANY, 0))
                pos = self.space(pos + 1, nested)
            elif c in "*+?":
                at = pos
                pos = self.space(pos + 1, nested)
                low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
                n_prev_rules = self.repeat(rule, last_start, low, high, n_prev_rules, name, at)
            elif c == "{":
                at = pos
                pos = self.space(pos + 1, nested)
                end = self.integer(pos)
                low = int(text[pos:end])
                pos = self.space(end, nested)
                high: Optional[int]
                if self.at(pos) == "}":
                    high = low
                    pos = self.space(pos + 1, nested)
                elif self.at(pos) == ",":
                    pos = self.space(pos + 1, nested)
                    high = None
                    if "0" <= self.at(pos) <= "9":
                        end = self.integer(pos)
                        high = int(text[pos:end])
                        pos = self.space(end, nested)
                    if self.at(pos) != "}":
                        raise self.error("expected '}'", pos)
                    pos = self.space(pos + 1, nested)
                else:
                    raise self.error("expected ',' or '}'", pos)
                if low > MAX_REPETITION:
                    raise self.error(f"a repetition of at least {low} exceeds llama.cpp's limit of "
                                     f"{MAX_REPETITION}", at)
                if high is not None and high < low:
                    raise self.error(f"a repetition {{{low},{high}}} has its maximum below its minimum", at)
                if high is not None and high > MAX_REPETITION:
                    high = None  # what llama.cpp does: no maximum
                n_prev_rules = self.repeat(rule, last_start, low, high, n_prev_rules, name, at)
            else:
                break
        return pos

    def token(self, pos: int) -> Tuple[int, int]:
        text = self.text
        if self.at(pos) != "<":
            raise self.error("expected '<'", pos)
        pos += 1
        if self.at(pos) == "[":
            end = self.integer(pos + 1)
            value = int(text[pos + 1:end])
            if value > 0xFFFFFFFF or self.at(end) != "]" or self.at(end + 1) != ">":
                raise self.error("expected a token id as <[id]>", pos)
            self.out.token_ids.append(value)
            return value, end + 2
        end = text.find(">", pos)
        if end < 0:
            raise self.error("expected '>'", pos)
        self.out.has_named_tokens = True  # tokenized by llama.cpp against the model's vocabulary
        return 0, end + 1

    def repeat(self, rule: List[Tuple[int, int]], last_start: int, low: int, high: Optional[int],
               n_prev_rules: int, name: str, at: int) -> int:
        """llama.cpp's rewrite of S{low,high} into copies of S and helper rules."""
        if last_start == len(rule):
            raise self.error("expected an item before the repetition operator", at)
        previous = rule[last_start:]
        total = high if high is not None and high > 0 else (low if low > 0 else 1)
        if n_prev_rules * total > MAX_REPETITION:
            raise self.error(f"this repetition would make {n_prev_rules * total} rules, above llama.cpp's limit "
                             f"of {MAX_REPETITION}; repeat a named rule instead of a group, or repeat fewer times", at)
        if low == 0:
            del rule[last_start:]
        else:
            for _ in range(low - 1):
                rule.extend(previous)
        n_opt = 1 if high is None else high - low
        last_rec = 0
        for i in range(n_opt):
            rec_id = self.new_symbol(name)
            rec = list(previous)
            if i > 0 or high is None:
                rec.append((REF, rec_id if high is None else last_rec))
            rec.extend([(ALT, 0), (END, 0)])
            self.add_rule(rec_id, rec)
            last_rec = rec_id
        if n_opt > 0:
            rule.append((REF, last_rec))
        return n_prev_rules * total


def _check_rules(parsed: _Parsed, root: str) -> None:
    """Undefined rules, a missing root, left recursion, and structures that blow up llama.cpp's check."""
    names = {rule_id: name for name, rule_id in parsed.symbol_ids.items()}
    rules = parsed.rules
    for rule_id in range(len(parsed.symbol_ids)):
        if rule_id >= len(rules) or rules[rule_id] is None:
            raise ValueError(f"invalid GBNF grammar: rule {names[rule_id]!r} is used but never defined")
    if root not in parsed.symbol_ids or root not in parsed.defined:
        raise ValueError(f"invalid GBNF grammar: there is no root rule {root!r}"
                         + (f" (rules: {', '.join(list(parsed.defined)[:8])})" if parsed.defined else ""))
    # Rules llama.cpp makes for groups and repetitions are named after their rule: "item_7".
    readable = {rule_id: (f"rule {name!r}" if name in parsed.defined or "_" not in name
                          else f"a group or repetition in rule {name.rsplit('_', 1)[0]!r}")
                for rule_id, name in names.items()}
    _check_left_recursion(rules, readable)  # type: ignore[arg-type]


def _check_left_recursion(rules: List[List[Tuple[int, int]]], names: Dict[int, str]) -> None:
    """llama.cpp's llama_grammar_detect_left_recursion, iterative, with its depth and work bounded.

    The same traversal as the C code (a rule "may be empty" only when one of its alternatives
    is empty; shared rules are revisited), so it refuses what llama.cpp refuses, and refuses
    grammars whose check would recurse deeper, or take longer, than is safe.
    """
    n = len(rules)
    visited = [False] * n
    in_progress = [False] * n
    may_be_empty = [False] * n
    visits = 0

    for start in range(n):
        if visited[start]:
            continue
        # Frames: [rule_id, next element index, recurse flag]
        stack: List[List[int]] = []

        def enter(rule_id: int) -> bool:
            nonlocal visits
            if in_progress[rule_id]:
                return True
            visits += 1
            if visits > MAX_LEFT_VISITS or len(stack) >= MAX_LEFT_DEPTH:
                raise ValueError("invalid GBNF grammar: its rules reference each other too deeply or too often for "
                                 "llama.cpp's left-recursion check (more than "
                                 f"{MAX_LEFT_DEPTH} levels or {MAX_LEFT_VISITS} visits); simplify it")
            in_progress[rule_id] = True
            rule = rules[rule_id]
            at_start = True
            for kind, _ in rule:
                if kind in (END, ALT):
                    if at_start:
                        may_be_empty[rule_id] = True
                        break
                    at_start = True
                else:
                    at_start = False
            stack.append([rule_id, 0, 1])
            return False

        if enter(start):
            raise _left_recursion(names, start)
        while stack:
            frame = stack[-1]
            rule_id, index, recurse = frame
            rule = rules[rule_id]
            if index >= len(rule):
                in_progress[rule_id] = False
                visited[rule_id] = True
                stack.pop()
                if stack:  # back in the caller, after its REF element
                    caller = stack[-1]
                    ref = rules[caller[0]][caller[1] - 1][1]
                    if not may_be_empty[ref]:
                        caller[2] = 0
                continue
            kind, value = rule[index]
            frame[1] = index + 1
            if kind == REF and recurse:
                if enter(value):
                    raise _left_recursion(names, value)
            elif kind in (END, ALT):
                frame[2] = 1
            else:
                frame[2] = 0


def _left_recursion(names: Dict[int, str], rule_id: int) -> ValueError:
    return ValueError(f"invalid GBNF grammar: {names.get(rule_id, rule_id)} is left-recursive (it can "
                      "reach itself before any character); llama.cpp does not support left recursion")


def _check_with_llama_cpp(gbnf: str, root: str, parsed: _Parsed) -> None:
    """Let llama.cpp parse the grammar once, without a vocabulary, if the compiled module is loaded.

    Not loaded, it is not loaded for this (a config with a grammar stays pure Python); grammars
    with ``<name>`` tokens need a vocabulary. Both are parsed when a sampler is made.
    """
    module = sys.modules.get("cyllama_cffi._ffi")
    if parsed.has_named_tokens or module is None:
        return
    ffi, lib = module.ffi, module.lib
    sampler = lib.llama_sampler_init_grammar(ffi.NULL, gbnf.encode("utf-8"), root.encode("utf-8"))
    if sampler == ffi.NULL:
        raise ValueError("invalid GBNF grammar: llama.cpp refused it (its reason is on the cyllama_cffi.llama log)")
    lib.llama_sampler_free(sampler)
