"""A regular expression (a subset) as GBNF, for JSON schema ``pattern``; and GBNF text escaping.

Pure Python, used by :mod:`._json_schema`. The GBNF matches the *contents* of a JSON string:
characters a JSON string must escape are written escaped when the pattern has them literally,
and left out of classes and ``.``.
"""

from __future__ import annotations

import re

from .grammar import MAX_REPETITION  # llama.cpp's repetition limit

__all__ = ["pattern_to_gbnf", "literal", "class_char"]



def pattern_to_gbnf(pattern: str, where: str) -> str:
    """GBNF for the JSON string contents that fully match ``pattern``; ``ValueError`` for what it cannot express."""
    return _Regex(pattern, where).to_gbnf()


def literal(text: str) -> str:
    """A GBNF string literal matching ``text`` exactly."""
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\x{ord(c):02X}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def class_char(c: str) -> str:
    """``c`` written inside a GBNF character class."""
    if c in "\\]-[^\"":
        return "\\" + c if c in "\\]-[\"" else "\\x5E"
    if ord(c) < 0x20 or ord(c) == 0x7F:
        return f"\\x{ord(c):02X}"
    return c


_CLASS_ESCAPES = {"d": [("0", "9")], "w": [("a", "z"), ("A", "Z"), ("0", "9"), ("_", "_")],
                  "s": [(" ", " "), ("\t", "\t"), ("\n", "\n"), ("\r", "\r")]}
_JSON_UNSAFE = '"\\'


class _Regex:
    """A recursive-descent translation of a pattern: literals, classes, groups, |, quantifiers, ^ $.

    The whole string must match (JSON schema patterns are unanchored, but a full match is a
    valid match). Lookarounds, backreferences, \\b and the like raise ``ValueError``. Characters
    a JSON string must escape are written escaped when they are literal, and left out of
    classes and ``.``.
    """

    def __init__(self, pattern: str, where: str) -> None:
        self.pattern = pattern
        self.where = where
        self.pos = 0
        self.depth = 0

    def fail(self, what: str) -> ValueError:
        return ValueError(f"JSON schema pattern {self.pattern!r} at {self.where}: {what} "
                          f"(at position {self.pos}) is not supported by the grammar converter")

    def to_gbnf(self) -> str:
        p = self.pattern
        if p.startswith("^"):
            self.pos = 1
        end = len(p)
        if p.endswith("$") and not p.endswith("\\$"):
            end -= 1
        self.end = end
        result = self.alternation()
        if self.pos != self.end:
            raise self.fail(f"unexpected {self.pattern[self.pos]!r}")
        return f"( {result} )"

    def peek(self) -> str:
        return self.pattern[self.pos] if self.pos < self.end else ""

    def alternation(self) -> str:
        options = [self.sequence()]
        while self.peek() == "|":
            self.pos += 1
            options.append(self.sequence())
        return " | ".join(o or '""' for o in options)

    def sequence(self) -> str:
        items = []
        while self.pos < self.end and self.peek() not in "|)":
            atom = self.atom()
            items.append(self.quantified(atom))
        return " ".join(i for i in items if i)

    def quantified(self, atom: str) -> str:
        c = self.peek()
        if c in ("*", "+", "?"):
            self.pos += 1
            if self.peek() in ("?", "+"):
                raise self.fail("a lazy or possessive quantifier")
            return f"{atom}{c}"
        if c == "{":
            match = re.match(r"\{(\d+)(,(\d*))?\}", self.pattern[self.pos:self.end])
            if not match:
                raise self.fail("a malformed {m,n}")
            self.pos += match.end()
            low = int(match.group(1))
            high = low if match.group(2) is None else (int(match.group(3)) if match.group(3) else None)
            if high is not None and high < low:
                raise self.fail("a {m,n} with n < m")
            if low > MAX_REPETITION:
                raise self.fail(f"a count above {MAX_REPETITION}")
            if high is not None and high > MAX_REPETITION:
                high = None
            return f"{atom}{{{low},{'' if high is None else high}}}"
        return atom

    def atom(self) -> str:
        p = self.pattern
        c = p[self.pos]
        if c == "(":
            self.pos += 1
            if p.startswith("?:", self.pos):
                self.pos += 2
            elif self.peek() == "?":
                raise self.fail("a lookaround or named/flagged group")
            self.depth += 1
            if self.depth > 50:
                raise self.fail("groups nested more than 50 deep")
            inner = self.alternation()
            self.depth -= 1
            if self.peek() != ")":
                raise self.fail("an unbalanced '('")
            self.pos += 1
            return f"( {inner or chr(34) * 2} )"
        if c == "[":
            return self.char_class()
        if c == ".":
            self.pos += 1
            return '[^"\\\\\\x00-\\x1F\\x7F]'
        if c == "\\":
            return self.escape(in_class=False)
        if c in "*+?{":
            raise self.fail(f"a quantifier {c!r} with nothing before it")
        if c in "^$":
            raise self.fail(f"an anchor {c!r} inside the pattern")
        if c == ")":
            raise self.fail("an unbalanced ')'")
        self.pos += 1
        return _json_char(c)

    def escape(self, in_class: bool) -> str:
        p = self.pattern
        if self.pos + 1 >= len(p):
            raise self.fail("a trailing backslash")
        c = p[self.pos + 1]
        self.pos += 2
        if c in _CLASS_ESCAPES:
            ranges = _CLASS_ESCAPES[c]
            body = "".join(_range_text(a, b) for a, b in ranges if a not in '"\\')
            return body if in_class else f"[{body}]"
        if c in "DWS":
            ranges = _CLASS_ESCAPES[c.lower()]
            body = "".join(_range_text(a, b) for a, b in ranges)
            if in_class:
                raise self.fail(f"\\{c} inside a class")
            return f'[^{body}"\\\\\\x00-\\x1F\\x7F]'
        simple = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v"}
        if c in simple:
            if in_class:
                raise self.fail(f"\\{c} inside a class")  # control characters need JSON escapes
            return _json_char(simple[c])
        if c == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", p[self.pos:self.pos + 4]):
            char = chr(int(p[self.pos:self.pos + 4], 16))
            self.pos += 4
            return class_char(char) if in_class else _json_char(char)
        if c.isalnum():
            raise self.fail(f"the escape \\{c}")
        return class_char(c) if in_class else _json_char(c)

    def char_class(self) -> str:
        p = self.pattern
        self.pos += 1
        negated = self.peek() == "^"
        if negated:
            self.pos += 1
        body = []
        first = True
        while True:
            if self.pos >= self.end:
                raise self.fail("an unterminated '['")
            c = p[self.pos]
            if c == "]" and not first:
                self.pos += 1
                break
            first = False
            if c == "\\":
                body.append(self.escape(in_class=True))
                continue
            if c == "[":
                raise self.fail("a nested '[' or POSIX class")
            self.pos += 1
            if self.peek() == "-" and self.pos + 1 < self.end and p[self.pos + 1] != "]":
                upper = p[self.pos + 1]
                if upper == "\\":
                    raise self.fail("an escaped range end")
                self.pos += 2
                if upper < c:
                    raise self.fail("a range out of order")
                body.append(_range_text(c, upper, drop_unsafe=not negated))
            else:
                if c in _JSON_UNSAFE or ord(c) < 0x20:
                    continue  # left out (a negated class excludes them anyway): it needs a JSON escape
                body.append(class_char(c))
        text = "".join(body)
        if negated:
            return f'[^{text}"\\\\\\x00-\\x1F\\x7F]'
        if not text:
            raise self.fail("a class of only characters JSON must escape")
        return f"[{text}]"


def _range_text(a: str, b: str, drop_unsafe: bool = True) -> str:
    """A class range from a to b, without control characters, quote or backslash when drop_unsafe."""
    if not drop_unsafe:
        return class_char(a) if a == b else f"{class_char(a)}-{class_char(b)}"
    pieces = []
    start = ord(a)
    end = ord(b)
    cut = sorted({0x22, 0x5C, 0x7F} | set(range(0x00, 0x20)))
    segment_start = start
    for point in range(start, end + 1):
        if point in cut:
            if segment_start < point:
                pieces.append((segment_start, point - 1))
            segment_start = point + 1
    if segment_start <= end:
        pieces.append((segment_start, end))
    return "".join(class_char(chr(x)) if x == y else f"{class_char(chr(x))}-{class_char(chr(y))}" for x, y in pieces)


def _json_char(c: str) -> str:
    """A literal character of the pattern, as it appears inside a JSON string."""
    if c == '"':
        return '"\\\\\\""'
    if c == "\\":
        return '"\\\\\\\\"'
    escapes = {"\n": "\\\\n", "\t": "\\\\t", "\r": "\\\\r", "\f": "\\\\f", "\b": "\\\\b"}
    if c in escapes:
        return f'"{escapes[c]}"'
    if ord(c) < 0x20 or ord(c) == 0x7F:
        return f'"\\\\u{ord(c):04x}"'
    return literal(c)
