"""The JSON schema -> GBNF converter and the GBNF checker, without a model.

What the generated grammar lets a model write is proven end to end in tests/test_grammar.py;
here: the GBNF each schema feature becomes, the exact digit ranges of bounded integers (checked
number by number through a regex made from the rule), the errors that name what is not
supported, and that any schema from a generator converts to a grammar our checker accepts.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cyllama_cffi._json_schema import UNSUPPORTED, _bounds, _int_range, _number_range, json_schema_to_gbnf
from cyllama_cffi.grammar import Grammar

from .schema_strategies import schemas


def rules_of(schema) -> dict:
    text = json_schema_to_gbnf(schema)
    Grammar.from_string(text)  # every converted grammar passes the checker
    return dict(line.split(" ::= ", 1) for line in text.strip().splitlines())


def test_required_and_optional_properties_keep_their_order():
    rules = rules_of({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "boolean"}},
                      "required": ["a"]})
    assert rules["root"] == '"{" ws root-a-kv ( "," ws root-b-kv )? "}"'
    assert rules["root-a-kv"] == '"\\"a\\"" ":" ws string ws'
    assert rules["root-b-kv"] == '"\\"b\\"" ":" ws boolean ws'
    assert rules["ws"] == '| " " | "\\n" [ \\t]{0,12}'  # bounded whitespace: output always ends


def test_all_optional_properties_any_may_come_first():
    rules = rules_of({"type": "object", "properties": {"a": {"type": "null"}, "b": {"type": "null"}}})
    assert rules["root"] == '"{" ws ( root-a-kv ( "," ws root-b-kv )? | root-b-kv )? "}"'


def test_additional_properties_schema_keys_exclude_the_listed_ones():
    rules = rules_of({"type": "object", "properties": {"ab": {"type": "boolean"}},
                      "additionalProperties": {"type": "integer"}})
    assert rules["root-extra-kv"] == 'root-extra-key ":" ws integer ws'
    key = rules["root-extra-key"]
    assert key.startswith('"\\"" (') and '"a" (' in key and '"b" ( char+ "\\"" )' in key
    assert rules["root-extras"] == '( "," ws root-extra-kv )*'


def test_additional_properties_true_allows_any_value_and_false_none():
    assert "value" in rules_of({"type": "object", "properties": {"a": {"type": "null"}},
                                "additionalProperties": True})["root-extra-kv"]
    rules = rules_of({"type": "object", "properties": {"a": {"type": "null"}}, "required": ["a"],
                      "additionalProperties": False})
    assert rules["root"] == '"{" ws root-a-kv "}"'
    assert rules_of({"type": "object"})["root"].startswith('"{" ws (')  # no properties: any object


def test_arrays_with_item_counts():
    rules = rules_of({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4})
    assert rules["root"] == '"[" ws root-item root-next{1,3} "]"'
    assert rules["root-next"] == '"," ws root-item'
    assert rules_of({"type": "array", "items": {"type": "null"}})["root"] == '"[" ws ( root-item root-next* )? "]"'
    assert rules_of({"type": "array", "maxItems": 0})["root"] == '"[" ws "]"'


def test_enum_const_and_type_lists():
    assert rules_of({"enum": ["a", 1, None, True]})["root"] == '( "\\"a\\"" | "1" | "null" | "true" )'
    assert rules_of({"const": {"k": [1, "x"]}})["root"] == '"{\\"k\\":[1,\\"x\\"]}"'
    assert rules_of({"type": ["string", "null"]})["root"] == "string | null"


def test_string_lengths_formats_and_patterns():
    assert rules_of({"type": "string", "minLength": 1, "maxLength": 5})["root"] == '"\\"" char{1,5} "\\""'
    assert rules_of({"type": "string", "format": "date"})["date-string"] == '"\\"" date "\\""'
    assert "hex{8}" in rules_of({"type": "string", "format": "uuid"})["uuid-string"]
    assert '"T"' in rules_of({"type": "string", "format": "date-time"})["date-time-string"]
    assert '"@"' in rules_of({"type": "string", "format": "email"})["email-string"]
    assert rules_of({"type": "string", "pattern": "^[A-Z]{2}-\\d{3}$"})["root"] == \
        '"\\"" ( [A-Z]{2,2} "-" [0-9]{3,3} ) "\\""'
    # A literal quote in a pattern is written escaped inside the JSON string.
    assert rules_of({"type": "string", "pattern": 'a"b'})["root"] == '"\\"" ( "a" "\\\\\\"" "b" ) "\\""'
    assert rules_of({"type": "string", "pattern": "(?:ab|c)+x?"})["root"] == '"\\"" ( ( "a" "b" | "c" )+ "x"? ) "\\""'


def test_refs_defs_definitions_and_recursion():
    rules = rules_of({"$defs": {"Node": {"type": "object", "properties": {
        "next": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]}}, "required": ["next"]}},
        "$ref": "#/$defs/Node"})
    assert rules["root"] == "Node"
    assert "Node | null" in rules.values()
    assert rules_of({"definitions": {"X": {"type": "integer"}}, "type": "array",
                     "items": {"$ref": "#/definitions/X"}})["X"] == "integer"


def test_any_of_and_one_of_are_choices():
    assert rules_of({"anyOf": [{"type": "integer"}, {"type": "string"}]})["root"] == "integer | string"
    assert rules_of({"oneOf": [{"type": "boolean"}, {"type": "null"}]})["root"] == "boolean | null"


def test_empty_schema_is_any_value():
    assert rules_of({})["root"] == "value"
    assert rules_of(True)["root"] == "value"


def gbnf_alternatives_to_regex(gbnf: str) -> str:
    """The subset the integer ranges use (literals, classes, {n,m}, groups, |) as a Python regex."""
    out = re.sub(r'"([^"]*)"', lambda m: re.escape(m.group(1)), gbnf)
    return out.replace("( ", "(?:").replace(" )", ")").replace(" ", "")


@pytest.mark.parametrize("low, high", [(0, 0), (-5, 5), (-37, 1234), (1, 9), (10, 99), (7, 1000), (-1000, -7),
                                       (-99, -10), (95, 105), (123, 4567), (None, 20), (-20, None), (0, None),
                                       (None, -3), (5, None), (990, 1010)])
def test_integer_ranges_are_exact(low, high):
    pattern = re.compile(gbnf_alternatives_to_regex(_int_range(low, high, "#")))
    window_low = (low if low is not None else (high if high is not None else 0)) - 150
    window_high = (high if high is not None else (low if low is not None else 0)) + 150
    for n in range(window_low, window_high + 1):
        inside = (low is None or n >= low) and (high is None or n <= high)
        assert bool(pattern.fullmatch(str(n))) == inside, (low, high, n)
    assert not pattern.fullmatch("-0") and not pattern.fullmatch("007")


def test_integer_bounds_become_ranges_and_exclusive_bounds_shift_by_one():
    assert rules_of({"type": "integer", "minimum": 1, "maximum": 3})["root"] == "[1-3]"
    assert rules_of({"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 4})["root"] == "[1-3]"
    with pytest.raises(ValueError, match="no whole number"):
        json_schema_to_gbnf({"type": "number", "minimum": 0.1, "maximum": 0.2})


@pytest.mark.parametrize("schema", [{"minimum": -2, "maximum": 3}, {"minimum": 0.5, "maximum": 3.5},
                                    {"exclusiveMinimum": -1.5, "exclusiveMaximum": 2}, {"minimum": 0},
                                    {"maximum": -1}, {"minimum": -10, "maximum": 10}, {"minimum": 97, "maximum": 104}])
def test_bounded_numbers_never_leave_their_bounds(schema):
    """Every number the rule allows is within bounds; every whole number within them is allowed."""
    low, high = _bounds(schema, "#", integer=False)
    pattern = re.compile(gbnf_alternatives_to_regex(_number_range(low, high, "#")))
    written = [f"{sign}{whole}{fraction}" for sign in ("", "-") for whole in range(0, 130)
               for fraction in ("", ".0", ".25", ".5", ".999", ".000001")]
    def inside(value: float) -> bool:
        return ((schema.get("minimum") is None or value >= schema["minimum"])
                and (schema.get("maximum") is None or value <= schema["maximum"])
                and (schema.get("exclusiveMinimum") is None or value > schema["exclusiveMinimum"])
                and (schema.get("exclusiveMaximum") is None or value < schema["exclusiveMaximum"]))
    allowed = [text for text in written if pattern.fullmatch(text)]
    assert allowed and all(inside(float(text)) for text in allowed), [t for t in allowed if not inside(float(t))][:5]
    assert all(pattern.fullmatch(str(n)) for n in range(-130, 131) if inside(n))
    assert any("." in text for text in allowed)  # decimals too, not only whole numbers


@pytest.mark.parametrize("keyword", UNSUPPORTED)
def test_unsupported_keywords_are_named(keyword):
    with pytest.raises(ValueError, match=f"keyword '{re.escape(keyword)}' at #/properties/a is unsupported"):
        json_schema_to_gbnf({"type": "object", "properties": {"a": {"type": "string", keyword: 1}}})


@pytest.mark.parametrize("schema, message", [
    ({"type": "strin"}, "type 'strin' at # is unknown"),
    ({"typo": "string"}, "keyword 'typo' at # is unknown"),
    ({"type": "string", "format": "ipv4"}, "format 'ipv4' at # is unsupported"),
    ({"type": "string", "pattern": "(?=a)b"}, "lookaround"),
    ({"type": "string", "pattern": "(a)\\1"}, "escape \\\\1"),
    ({"type": "string", "pattern": "a\\bc"}, "escape \\\\b"),
    ({"type": "string", "pattern": "a++"}, "possessive"),
    ({"type": "string", "pattern": "(ab"}, "unbalanced"),
    ({"$ref": "#/$defs/missing"}, "points to nothing"),
    ({"$ref": "http://example.com/s.json"}, "only references into this document"),
    ({"type": "array", "items": [{"type": "string"}]}, "tuple validation"),
    ({"type": "array", "minItems": 3, "maxItems": 2}, "maxItems 2 is below minItems 3"),
    ({"type": "string", "minLength": 2001}, "repetition limit"),
    ({"type": "integer", "minimum": 10 ** 20}, "too large"),
    ({"anyOf": []}, "non-empty list"),
    (False, "no value is valid"),
])
def test_schemas_it_cannot_express_raise_value_errors_saying_why(schema, message):
    with pytest.raises(ValueError, match=message):
        json_schema_to_gbnf(schema)


def test_a_schema_must_be_a_dict():
    with pytest.raises(TypeError, match="must be a dict"):
        json_schema_to_gbnf('{"type": "string"}')


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schemas())
def test_generated_schemas_convert_to_grammars_the_checker_accepts(schema):
    grammar = Grammar.from_json_schema(schema)
    assert grammar.root == "root" and grammar.gbnf.startswith("root ::= ")


# -- GBNF checking (the cases where llama.cpp would crash, hang or say nothing useful) -------

@pytest.mark.parametrize("gbnf, message", [
    ("", "it is empty"),
    ("   # only a comment\n", "it is empty"),
    ('root ::= "a" | (', "unbalanced parentheses"),
    ('root ::= "a" )', "expected a newline"),
    ("root ::= [a-z", "unterminated character class"),
    ('root ::= "abc', "unterminated string literal"),
    ("root ::= undefined-rule", "rule 'undefined-rule' is used but never defined"),
    ('other ::= "a"', "there is no root rule 'root'"),
    ('root ::= root "a"', "rule 'root' is left-recursive"),
    ('root ::= a\na ::= b "x"\nb ::= | root', "left-recursive"),
    ('root ::= "a"{2001}', "exceeds llama.cpp's limit of 2000"),
    ('root ::= ("a" "b"?){1001}', "above llama.cpp's limit"),
    ('root ::= "a"{3,2}', "maximum below its minimum"),
    ('root ::= "a"{99999999999999999999999}', "exceeds llama.cpp's limit"),
    ('root ::= "\\q"', "unknown escape"),
    ('root ::= "\\x4"', "hex digits"),
    ('root ::= "a"\x00| "b"', "NUL character"),
    ("root ::= " + "(" * 5000 + '"a"' + ")" * 5000, "nested more than 200 deep"),
    ("root ::= *", "expected an item before the repetition"),
])
def test_bad_gbnf_raises_value_errors_saying_why(gbnf, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Grammar.from_string(gbnf)


def test_a_left_recursion_check_that_would_take_exponential_time_is_refused():
    # llama.cpp's check visits r1 twice per visit of r0, and so on: 2**40 visits.
    rules = [f"r{i} ::= r{i + 1} | r{i + 1}" for i in range(40)] + ['r40 ::= "a"']
    with pytest.raises(ValueError, match="too deeply or too often"):
        Grammar.from_string("\n".join(rules), root="r0")


def test_a_rule_chain_deeper_than_the_c_stack_allows_is_refused():
    rules = [f"r{i} ::= r{i + 1}" for i in range(20000)] + ['r20000 ::= "a"']
    with pytest.raises(ValueError, match="too deeply or too often"):
        Grammar.from_string("\n".join(rules), root="r0")


def test_good_grammars_are_kept_as_written():
    text = 'root ::= answer\nanswer ::= "yes" | "no" # a comment\n'
    grammar = Grammar.from_string(text)
    assert grammar.gbnf == text and str(grammar) == text and grammar.root == "root"
    assert grammar == Grammar(text) and hash(grammar) == hash(Grammar(text))
    assert Grammar.from_string('start ::= [0-9]+ "."?', root="start").root == "start"
    assert "Grammar root='root'" in repr(grammar)


def test_type_errors():
    with pytest.raises(TypeError, match="GBNF text"):
        Grammar(b'root ::= "a"')  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="root rule name"):
        Grammar('root ::= "a"', root=None)  # type: ignore[arg-type]


def test_token_ids_outside_the_vocabulary_are_refused_when_the_vocabulary_is_known():
    grammar = Grammar.from_string("root ::= <[5]> <[70000]>")
    grammar.check_tokens(100000)
    with pytest.raises(ValueError, match="token id 70000, outside the vocabulary"):
        grammar.check_tokens(49152)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet='root:=|()[]"ab-*+?{}0123456789\\ \n#^.<>!', max_size=40))
def test_random_text_either_parses_or_raises_a_value_error_about_the_grammar(text):
    try:
        Grammar.from_string(text)
    except ValueError as error:
        assert str(error).startswith("invalid GBNF grammar: ")


def test_what_pydantic_writes_converts():
    """The keywords pydantic's model_json_schema() emits for common field types are all supported."""
    pydantic = pytest.importorskip("pydantic", reason="pydantic is an optional dependency")
    import datetime
    import enum
    import uuid
    from typing import Dict, List, Literal, Optional

    class Color(enum.Enum):
        RED = "red"
        BLUE = "blue"

    class Address(pydantic.BaseModel):
        city: str = pydantic.Field(min_length=1, max_length=40)
        zip: str = pydantic.Field(pattern=r"^[0-9]{5}$")

    class Order(pydantic.BaseModel):
        id: uuid.UUID
        placed: datetime.datetime
        day: datetime.date
        color: Color
        kind: Literal["retail", "wholesale"]
        note: Optional[str] = None
        quantity: int = pydantic.Field(ge=1, le=999)
        price: float = pydantic.Field(gt=0, lt=10000)
        tags: List[str] = pydantic.Field(default_factory=list, max_length=5)
        counts: Dict[str, int] = {}
        ship_to: Address
        bill_to: Optional[Address] = None

    rules = rules_of(Order.model_json_schema())
    assert rules["root"].startswith('"{" ws root-id-kv')
    assert "Address" in rules and "Color" in rules
    assert rules["Color"] == '( "\\"red\\"" | "\\"blue\\"" )'
