"""Hypothesis strategies for JSON schemas the grammar converter supports (shared with tests/test_grammar.py).

Small on purpose: the model tests generate a document for each, within a bounded token count.
"""

from __future__ import annotations

from hypothesis import strategies as st

NAMES = st.sampled_from(["id", "name", "city", "count", "tags", "ok", "when", "note", "x", "y"])
PATTERNS = ["^[A-Z]{2}-[0-9]{3}$", "^[a-z]+$", "^(yes|no)$", "^\\d{1,3}(\\.\\d)?$", "^#[0-9a-f]{6}$"]


def _integer():
    @st.composite
    def build(draw):
        schema = {"type": "integer"}
        low = draw(st.none() | st.integers(-1000, 1000))
        if low is not None:
            schema["minimum"] = low
        high = draw(st.none() | st.integers(low if low is not None else -1000, 1000))
        if high is not None:
            schema["maximum"] = high
        return schema
    return build()


def leaves():
    return st.one_of(
        st.just({"type": "string"}),
        st.integers(0, 12).map(lambda n: {"type": "string", "maxLength": n}),
        st.integers(1, 4).map(lambda n: {"type": "string", "minLength": n, "maxLength": n + 8}),
        _integer(),
        st.just({"type": "number"}),
        st.tuples(st.integers(-50, 50), st.integers(0, 100)).map(
            lambda bounds: {"type": "number", "minimum": bounds[0], "maximum": bounds[0] + bounds[1]}),
        st.just({"type": "boolean"}),
        st.just({"type": "null"}),
        st.lists(st.text("abc xyz", min_size=1, max_size=6) | st.integers(-5, 5), min_size=1, max_size=4,
                 unique=True).map(lambda values: {"enum": values}),
        st.sampled_from(["a", 1, True, None]).map(lambda v: {"const": v}),
        st.sampled_from(["date", "uuid", "time", "date-time", "email"]).map(lambda f: {"type": "string", "format": f}),
        st.sampled_from(PATTERNS).map(lambda p: {"type": "string", "pattern": p}),
        st.just({"type": ["string", "null"]}),
    )


def _object(children):
    @st.composite
    def build(draw):
        names = draw(st.lists(NAMES, min_size=1, max_size=3, unique=True))
        properties = {name: draw(children) for name in names}
        required = [name for name in names if draw(st.booleans())]
        schema = {"type": "object", "properties": properties, "required": required}
        schema["additionalProperties"] = False
        return schema
    return build()


def _array(children):
    @st.composite
    def build(draw):
        low = draw(st.integers(0, 2))
        return {"type": "array", "items": draw(children), "minItems": low, "maxItems": low + draw(st.integers(0, 2))}
    return build()


def schemas():
    """Schemas up to three levels deep: objects, arrays and anyOf over the leaves."""
    return st.recursive(
        leaves(),
        lambda children: st.one_of(_object(children), _array(children),
                                   st.lists(children, min_size=2, max_size=2).map(lambda options: {"anyOf": options})),
        max_leaves=5,
    )
