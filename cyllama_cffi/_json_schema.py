"""JSON schema -> GBNF: a grammar whose sentences are JSON documents valid under the schema.

Pure Python (no compiled module), so it runs anywhere the package imports, PyPy included.

What is enforced exactly: types (and type lists), ``properties``/``required`` (required keys
always present, optional ones may be left out, keys in the order ``properties`` lists them),
``additionalProperties`` (absent or ``false``: no other keys; ``true`` or a schema: other keys
allowed, after the listed ones), ``items``/``minItems``/``maxItems``, ``enum``, ``const``,
``minLength``/``maxLength``, ``pattern`` (a regex subset, anchored), ``format`` (date, time,
date-time, uuid, email), integer ``minimum``/``maximum`` (and the exclusive forms) through digit
ranges, ``$ref`` into ``$defs``/``definitions`` (recursion allowed), ``anyOf``/``oneOf`` (as a
choice; ``oneOf``'s exclusivity is not checked). Annotations (title, description, default...)
are ignored. Any other keyword raises ``ValueError`` naming it.

Documented approximations: a bounded ``number`` is a whole number in range or a decimal whose
every continuation stays in range (``ValueError`` when the range holds no whole number); counts above llama.cpp's repetition limit (2000)
are unbounded; a pattern's character classes leave out ``"``, ``\\`` and control characters
(they would need JSON escapes). Whitespace between tokens is at most one space or newline and
a short indent, so output always ends.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from ._regex_gbnf import class_char, literal, pattern_to_gbnf
from .grammar import MAX_REPETITION  # llama.cpp's repetition limit

__all__ = ["json_schema_to_gbnf", "UNSUPPORTED"]

_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                "readOnly", "writeOnly", "$defs", "definitions", "discriminator", "nullable"}
_KNOWN = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum",
          "const", "pattern", "format", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum",
          "exclusiveMaximum", "$ref", "anyOf", "oneOf"} | _ANNOTATIONS
UNSUPPORTED = ("allOf", "not", "if", "then", "else", "patternProperties", "propertyNames", "dependentRequired",
               "dependentSchemas", "dependencies", "uniqueItems", "contains", "minContains", "maxContains",
               "prefixItems", "additionalItems", "unevaluatedProperties", "unevaluatedItems", "multipleOf",
               "minProperties", "maxProperties", "contentEncoding", "contentMediaType", "$anchor",
               "$dynamicRef", "$recursiveRef")

_PRIMITIVES = {
    "ws": '| " " | "\\n" [ \\t]{0,12}',
    "boolean": '"true" | "false"',
    "null": '"null"',
    "digits": "[0-9]{1,16}",
    "uint": "[0] | [1-9] [0-9]{0,15}",
    "integer": '"-"? uint',
    "number": '"-"? uint ("." digits)? ([eE] [-+]? digits)?',
    "char": '[^"\\\\\\x00-\\x1F\\x7F] | "\\\\" (["\\\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    "string": '"\\"" char* "\\""',
    "value": "object | array | string | number | boolean | null",
    "object": '"{" ws ( string ":" ws value ws ( "," ws string ":" ws value ws )* )? "}"',
    "array": '"[" ws ( value ws ( "," ws value ws )* )? "]"',
    "hex": "[0-9a-fA-F]",
    "date": '[0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [12] [0-9] | "3" [01] )',
    "time": '( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{1,6} )? '
            '( "Z" | [+-] ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )',
}
# Which primitives each one uses, so only what is needed is written out.
_USES = {"integer": ["uint"], "number": ["uint", "digits"], "string": ["char"],
         "value": ["object", "array", "string", "number", "boolean", "null"],
         "object": ["ws", "string", "value"], "array": ["ws", "value"]}
_FORMATS = {
    "date": ("date",),
    "time": ("time",),
    "date-time": ("date", "time"),
    "uuid": ("hex",),
    "email": (),
}
_FORMAT_BODIES = {
    "date": "date",
    "time": "time",
    "date-time": 'date "T" time',
    "uuid": 'hex{8} "-" hex{4} "-" hex{4} "-" hex{4} "-" hex{12}',
    "email": '[a-zA-Z0-9._%+-]{1,64} "@" [a-zA-Z0-9-]{1,63} ( "." [a-zA-Z0-9-]{1,63} ){1,4}',
}


def json_schema_to_gbnf(schema: Any) -> str:
    """GBNF text (start rule ``root``) for ``schema``; ``ValueError`` names what it cannot express."""
    if not isinstance(schema, (Mapping, bool)):
        raise TypeError(f"a JSON schema must be a dict (or a bool), got {type(schema).__name__}")
    converter = _Converter(schema)
    expression = converter.visit(schema, "root", "#")
    if expression != "root":  # not already the body of a rule named root
        converter.rules["root"] = expression
    return converter.render()


class _Converter:
    def __init__(self, root: Any) -> None:
        self.root_schema = root
        self.rules: Dict[str, str] = {}
        self.primitives: Set[str] = set()
        self.refs: Dict[str, str] = {}  # "$ref" -> rule name

    # -- output
    def render(self) -> str:
        needed = set()
        todo = list(self.primitives)
        while todo:
            name = todo.pop()
            if name not in needed:
                needed.add(name)
                todo.extend(_USES.get(name, ()))
        lines = [f"root ::= {self.rules['root']}"]
        lines += [f"{name} ::= {body}" for name, body in self.rules.items() if name != "root"]
        lines += [f"{name} ::= {_PRIMITIVES[name]}" for name in sorted(needed)]
        return "\n".join(lines) + "\n"

    def use(self, primitive: str) -> str:
        self.primitives.add(primitive)
        return primitive

    def add_rule(self, base: str, body: str) -> str:
        """A named rule for ``body`` (reused if the same body exists), its name unique."""
        for name, existing in self.rules.items():
            if existing == body and name != "root" and name.startswith(base):
                return name
        name = base
        n = 1
        while name in self.rules or name in _PRIMITIVES:
            n += 1
            name = f"{base}-{n}"
        self.rules[name] = body
        return name

    # -- schemas
    def visit(self, schema: Any, name: str, where: str) -> str:
        """The GBNF expression for ``schema`` (``where`` is its JSON pointer, for messages)."""
        if schema is True or (isinstance(schema, Mapping) and not (set(schema) - _ANNOTATIONS)):
            return self.use("value")
        if schema is False:
            raise ValueError(f"JSON schema at {where} is false: no value is valid")
        if not isinstance(schema, Mapping):
            raise ValueError(f"JSON schema at {where} must be an object or a bool, got {type(schema).__name__}")
        bad = [key for key in schema if key not in _KNOWN]
        if bad:
            kind = "unsupported" if bad[0] in UNSUPPORTED else "unknown"
            raise ValueError(f"JSON schema keyword {bad[0]!r} at {where} is {kind} by the grammar converter")
        if "$ref" in schema:
            others = set(schema) - _ANNOTATIONS - {"$ref"}
            if others:
                raise ValueError(f"JSON schema at {where}: keywords beside $ref are not supported ({sorted(others)[0]!r})")
            return self.ref(schema["$ref"], where)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                options = schema[key]
                if not isinstance(options, list) or not options:
                    raise ValueError(f"JSON schema {key} at {where} must be a non-empty list")
                rest = {k: v for k, v in schema.items() if k != key and k not in _ANNOTATIONS}
                if rest:
                    # {"type": "object", "anyOf": [...]}: each option gets the shared keywords
                    options = [dict(rest, **option) if isinstance(option, Mapping) else option for option in options]
                parts = [self.visit(option, f"{name}-{i}", f"{where}/{key}/{i}") for i, option in enumerate(options)]
                return self.add_rule(name, " | ".join(parts)) if len(parts) > 1 else parts[0]
        if "const" in schema:
            return literal(_dump(schema["const"]))
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise ValueError(f"JSON schema enum at {where} must be a non-empty list")
            return "( " + " | ".join(literal(_dump(v)) for v in values) + " )"
        kind = schema.get("type")
        if isinstance(kind, list):
            if not kind:
                raise ValueError(f"JSON schema type at {where} is an empty list")
            parts = [self.visit(dict(schema, type=t), f"{name}-{t}", where) for t in kind]
            return self.add_rule(name, " | ".join(parts)) if len(parts) > 1 else parts[0]
        if kind is None:
            kind = _guess_type(schema)
            if kind is None:
                return self.use("value")
        method = getattr(self, "visit_" + str(kind), None)
        if not isinstance(kind, str) or method is None:
            raise ValueError(f"JSON schema type {kind!r} at {where} is unknown")
        return method(schema, name, where)

    def ref(self, ref: Any, where: str) -> str:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise ValueError(f"JSON schema $ref {ref!r} at {where}: only references into this document (#...) are supported")
        if ref in self.refs:
            return self.refs[ref]
        target = self.root_schema
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, Mapping) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise ValueError(f"JSON schema $ref {ref!r} at {where} points to nothing")
        base = _rule_name(ref.rsplit("/", 1)[-1] or "root-ref")
        name = base
        n = 1
        while name in self.rules or name in _PRIMITIVES or name == "root":
            n += 1
            name = f"{base}-{n}"
        self.refs[ref] = name
        self.rules[name] = ""  # reserved: a recursive reference finds the name while the body is built
        self.rules[name] = self.visit(target, name, ref)
        return name

    def visit_null(self, schema: Mapping, name: str, where: str) -> str:
        return self.use("null")

    def visit_boolean(self, schema: Mapping, name: str, where: str) -> str:
        return self.use("boolean")

    def visit_integer(self, schema: Mapping, name: str, where: str) -> str:
        low, high = _bounds(schema, where, integer=True)
        if low is None and high is None:
            return self.use("integer")
        return self.add_rule(name, _int_range(low, high, where))

    def visit_number(self, schema: Mapping, name: str, where: str) -> str:
        low, high = _bounds(schema, where, integer=False)
        if low is None and high is None:
            return self.use("number")
        return self.add_rule(name, _number_range(low, high, where))

    def visit_string(self, schema: Mapping, name: str, where: str) -> str:
        fmt = schema.get("format")
        pattern = schema.get("pattern")
        low, high = _length(schema, "minLength", "maxLength", where)
        if pattern is not None:
            if not isinstance(pattern, str):
                raise ValueError(f"JSON schema pattern at {where} must be a string")
            if "minLength" in schema or "maxLength" in schema or fmt is not None:
                raise ValueError(f"JSON schema at {where}: pattern together with format/minLength/maxLength "
                                 "is not supported")
            return self.add_rule(name, '"\\"" ' + pattern_to_gbnf(pattern, where) + ' "\\""')
        if fmt is not None:
            if fmt not in _FORMATS:
                raise ValueError(f"JSON schema format {fmt!r} at {where} is unsupported "
                                 f"(supported: {', '.join(sorted(_FORMATS))})")
            if "minLength" in schema or "maxLength" in schema:
                raise ValueError(f"JSON schema at {where}: format together with minLength/maxLength is not supported")
            for primitive in _FORMATS[fmt]:
                self.use(primitive)
            return self.add_rule(_rule_name(fmt) + "-string", '"\\"" ' + _FORMAT_BODIES[fmt] + ' "\\""')
        if low == 0 and high is None:
            return self.use("string")
        self.use("char")
        return self.add_rule(name, '"\\"" ' + _repeat("char", low, high) + ' "\\""')

    def visit_array(self, schema: Mapping, name: str, where: str) -> str:
        items = schema.get("items", True)
        if isinstance(items, list):
            raise ValueError(f"JSON schema items at {where} is a list (tuple validation): unsupported")
        low, high = _length(schema, "minItems", "maxItems", where)
        item = self.visit(items, f"{name}-item", f"{where}/items")
        ws = self.use("ws")
        if high == 0:
            return f'"[" {ws} "]"'
        item_rule = self.add_rule(f"{name}-item", f"{item} {ws}")
        more = self.add_rule(f"{name}-next", f'"," {ws} {item_rule}')
        tail = _repeat(more, max(low - 1, 0), None if high is None else high - 1)
        body = f"{item_rule} {tail}".strip()
        if low == 0:
            body = f"( {body} )?"
        return self.add_rule(name, f'"[" {ws} {body} "]"')

    def visit_object(self, schema: Mapping, name: str, where: str) -> str:
        properties = schema.get("properties", {})
        if not isinstance(properties, Mapping):
            raise ValueError(f"JSON schema properties at {where} must be an object")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(key, str) for key in required):
            raise ValueError(f"JSON schema required at {where} must be a list of strings")
        missing = [key for key in required if key not in properties]
        extra_schema = schema.get("additionalProperties", False if properties else True)
        if missing and extra_schema is False:
            raise ValueError(f"JSON schema at {where}: required property {missing[0]!r} is not in properties "
                             "and additionalProperties is false")
        ws = self.use("ws")
        pairs: List[Tuple[str, str, bool]] = []  # (key, rule, required)
        for key, sub in properties.items():
            value = self.visit(sub, f"{name}-{_rule_name(key)}", f"{where}/properties/{key}")
            pair = self.add_rule(f"{name}-{_rule_name(key)}-kv", f'{literal(_dump(key))} ":" {ws} {value} {ws}')
            pairs.append((key, pair, key in required))
        for key in missing:  # required keys described only by additionalProperties
            value = self.visit(extra_schema, f"{name}-{_rule_name(key)}", f"{where}/additionalProperties")
            pair = self.add_rule(f"{name}-{_rule_name(key)}-kv", f'{literal(_dump(key))} ":" {ws} {value} {ws}')
            pairs.append((key, pair, True))
        extra = None
        if extra_schema is not False:
            value = self.visit(extra_schema, f"{name}-extra-value", f"{where}/additionalProperties")
            key_rule = self.add_rule(f"{name}-extra-key", _key_not_in([key for key, _, _ in pairs], self))
            extra = self.add_rule(f"{name}-extra-kv", f'{key_rule} ":" {ws} {value} {ws}')
        body = self.object_body(pairs, extra, name)
        return self.add_rule(name, f'"{{" {ws} {body} "}}"')

    def object_body(self, pairs: List[Tuple[str, str, bool]], extra: Optional[str], name: str) -> str:
        """Required pairs in order, optional ones each perhaps left out, then any extra pairs."""
        ws = self.use("ws")
        req = [rule for _, rule, is_req in pairs if is_req]
        opt = [rule for _, rule, is_req in pairs if not is_req]
        if extra is not None:
            opt_tail_extra = self.add_rule(f"{name}-extras", f'( "," {ws} {extra} )*')
        if req:
            parts = [req[0]] + [f'"," {ws} {rule}' for rule in req[1:]]
            parts += [f'( "," {ws} {rule} )?' for rule in opt]
            if extra is not None:
                parts.append(opt_tail_extra)
            return " ".join(parts)
        # No required keys: the first key present can be any optional one, or an extra one.
        starts = []
        for i, rule in enumerate(opt):
            rest = " ".join(f'( "," {ws} {later} )?' for later in opt[i + 1:])
            if extra is not None:
                rest = (rest + " " + opt_tail_extra).strip()
            starts.append(f"{rule} {rest}".strip())
        if extra is not None:
            starts.append(f"{extra} {opt_tail_extra}")
        if not starts:
            return ""
        return "( " + " | ".join(starts) + " )?"


def _guess_type(schema: Mapping) -> Optional[str]:
    """The type a schema without "type" implies by its keywords, e.g. properties -> object."""
    for kind, keys in (("object", ("properties", "additionalProperties", "required")),
                       ("array", ("items", "minItems", "maxItems")),
                       ("string", ("pattern", "format", "minLength", "maxLength")),
                       ("number", ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"))):
        if any(key in schema for key in keys):
            return kind
    return None


def _rule_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9-]+", "-", str(text)).strip("-")
    return name or "x"


def _dump(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError as error:
        raise ValueError(f"JSON schema constant {value!r} is not JSON: {error}") from None


def _repeat(item: str, low: int, high: Optional[int]) -> str:
    """``item`` (a rule name) low to high times; above llama.cpp's limit the maximum is dropped."""
    if high is not None and high > MAX_REPETITION:
        high = None
    if low > MAX_REPETITION:
        raise ValueError(f"a minimum count of {low} is above the grammar's repetition limit of {MAX_REPETITION}")
    if high is None:
        return f"{item}{{{low},}}" if low else f"{item}*"
    if low == high:
        return f"{item}{{{low}}}" if low else ""
    return f"{item}{{{low},{high}}}"


def _length(schema: Mapping, low_key: str, high_key: str, where: str) -> Tuple[int, Optional[int]]:
    low = schema.get(low_key, 0)
    high = schema.get(high_key)
    for key, value in ((low_key, low), (high_key, high)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"JSON schema {key} at {where} must be an int >= 0, got {value!r}")
    if high is not None and high < low:
        raise ValueError(f"JSON schema at {where}: {high_key} {high} is below {low_key} {low}")
    return low, high


def _bounds(schema: Mapping, where: str, integer: bool) -> Tuple[Optional[int], Optional[int]]:
    """The whole numbers allowed: [low, high], either end open (None)."""
    def number(key: str) -> Optional[float]:
        value = schema.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"JSON schema {key} at {where} must be a finite number, got {value!r}")
        return value

    low = high = None
    if number("minimum") is not None:
        low = math.ceil(schema["minimum"])
    if number("exclusiveMinimum") is not None:
        value = schema["exclusiveMinimum"]
        strict = math.floor(value) + 1
        low = strict if low is None else max(low, strict)
    if number("maximum") is not None:
        high = math.floor(schema["maximum"])
    if number("exclusiveMaximum") is not None:
        value = schema["exclusiveMaximum"]
        strict = math.ceil(value) - 1
        high = strict if high is None else min(high, strict)
    if low is not None and high is not None and low > high:
        what = "integer" if integer else "whole number (bounded numbers are generated as whole numbers)"
        raise ValueError(f"JSON schema at {where}: no {what} lies within its minimum/maximum")
    limit = 10 ** 15
    for value in (low, high):
        if value is not None and abs(value) >= limit:
            raise ValueError(f"JSON schema bound {value} at {where} is too large for the grammar (|bound| < 10**15)")
    return low, high


# -- integer ranges as digit rules -------------------------------------------------------------

def _int_range(low: Optional[int], high: Optional[int], where: str) -> str:
    """GBNF for the decimal integers in [low, high] (None: unbounded), no leading zeros, "-0" never."""
    parts: List[str] = []
    if low is None or low < 0:  # the negative side: "-" then magnitudes in [max(1, -high), -low]
        top = None if low is None else -low
        bottom = 1 if high is None or high >= 0 else -high
        parts += ['"-" ' + p for p in _naturals(bottom, top)]
    if high is None or high >= 0:
        parts += _naturals(max(low, 0) if low is not None else 0, high)
    if not parts:
        raise ValueError(f"JSON schema at {where}: empty integer range")
    return " | ".join(f"( {p} )" if " " in p else p for p in parts)


def _number_range(low: Optional[int], high: Optional[int], where: str) -> str:
    """GBNF for numbers in [low, high]: the whole numbers, and decimals whose every fraction fits.

    ``n.ddd`` lies in [n, n+1), so it is offered for n >= 0 with low <= n and n + 1 <= high;
    ``-n.ddd`` lies in (-(n+1), -n], so for n >= 1 with low <= -(n+1) and -n <= high; and
    ``-0.ddd`` when low <= -1 and high >= 0. (``low``/``high`` are already the whole-number
    bounds inside the schema's, so every number written is within the schema's bounds; decimals
    just below an integer upper bound are left out.) No exponents.
    """
    fraction = '"." [0-9]{1,15}'
    parts = [_int_range(low, high, where)]
    top = None if high is None else high - 1
    bottom = 0 if low is None else max(low, 0)
    if top is None or bottom <= top:
        parts += [f"( {p} ) {fraction}" for p in _naturals(bottom, top)]
    negative_top = None if low is None else -low - 1
    negative_bottom = 1 if high is None else max(1, -high)
    if low is None or low < 0:
        if negative_top is None or negative_bottom <= negative_top:
            parts += [f'"-" ( {p} ) {fraction}' for p in _naturals(negative_bottom, negative_top)]
        if (low is None or low <= -1) and (high is None or high >= 0):
            parts.append(f'"-0" {fraction}')
    return " | ".join(f"( {p} )" for p in parts)


def _naturals(low: int, high: Optional[int]) -> List[str]:
    """Alternatives matching the decimal numbers in [low, high], high None meaning no limit (16 digits)."""
    out: List[str] = []
    if high is None:
        digits = len(str(low))
        out += _naturals(low, 10 ** digits - 1)
        if digits < 16:
            out.append(f"[1-9] [0-9]{{{digits},15}}")
        return out
    if low > high:
        return out
    # Split into ranges of equal digit counts.
    while low <= high:
        width = len(str(low))
        top = min(high, 10 ** width - 1)
        out += _same_width(str(low), str(top))
        low = top + 1
    return out


def _same_width(low: str, high: str) -> List[str]:
    """Alternatives for numbers from ``low`` to ``high``, written with the same number of digits."""
    if low == high:
        return [literal(low)]
    if len(low) == 1:
        return [_digit(low, high)]
    if low[0] == high[0]:
        inner = _wrap(_same_width(low[1:], high[1:]))
        return [f"{literal(low[0])} " + (inner[0] if len(inner) == 1 else "( " + " | ".join(inner) + " )")]
    out: List[str] = []
    rest = len(low) - 1
    low_full = low[1:] == "0" * rest
    high_full = high[1:] == "9" * rest
    first = int(low[0])
    last = int(high[0])
    if not low_full:
        out += [f"{literal(low[0])} {p}" for p in _wrap(_same_width(low[1:], "9" * rest))]
        first += 1
    tail_high = None
    if not high_full:
        tail_high = [f"{literal(high[0])} {p}" for p in _wrap(_same_width("0" * rest, high[1:]))]
        last -= 1
    if first <= last:
        out.append(f"{_digit(str(first), str(last))} [0-9]{{{rest}}}")
    if tail_high:
        out += tail_high
    return out


def _wrap(parts: List[str]) -> List[str]:
    return [f"( {p} )" if " " in p else p for p in parts]


def _digit(low: str, high: str) -> str:
    return f"[{low}]" if low == high else f"[{low}-{high}]"


def _key_not_in(keys: Sequence[str], converter: _Converter) -> str:
    """A JSON string that is none of ``keys`` (so an extra key never repeats a listed one)."""
    char = converter.use("char")
    if not keys:
        return converter.use("string")
    # A trie of the keys: at each node, a string leaves it by a character no key continues with,
    # or ends at a node that is not the end of a key, or goes on along the trie.
    trie: Dict[str, Any] = {}
    for key in keys:
        node = trie
        for c in key:
            node = node.setdefault(c, {})
        node[""] = {}

    def alternatives(node: Dict[str, Any]) -> str:
        options = []
        children = [c for c in node if c]
        excluded = "".join(class_char(c) for c in children)
        options.append(f'[^"\\\\\\x00-\\x1F\\x7F{excluded}] {char}* "\\""' if excluded else f'{char}+ "\\""')
        if "" not in node:
            options.append('"\\""')
        for c in children:
            options.append(f"{literal(c)} ( {alternatives(node[c])} )")
        return " | ".join(options)

    return '"\\"" ( ' + alternatives(trie) + " )"
