"""JSON schemas as the grammar reads them: an object's unlisted properties are closed.

JSON Schema lets an object that lists its `properties` and says nothing about others carry any
others. Generated under a grammar, that freedom is where a model runs on: after the listed
properties it may invent one more, and another, each a free string, until `max_tokens`.
xgrammar's default (its strict mode) and llama.cpp's schema converter generate only the listed
properties; so does ember: an object schema with `properties` and no `additionalProperties`,
`patternProperties` or `unevaluatedProperties` gets `additionalProperties: false`, and an
array with `prefixItems` and no `items` gets `items: false`. Every document generated this way
is still valid against the schema as written. A schema that wants more says so
(`additionalProperties: true` or a schema); a schema without `properties` (`{"type":
"object"}`, JSON mode) is left open.

Branches of `allOf` (and objects beside a `$ref`) are left as they are: their properties are
merged with the other branches', and closing each would forbid the others' properties.
"""

from __future__ import annotations

from typing import Any

_OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")
# Keywords whose value is one subschema, a list of them, or a name -> subschema map.
_ONE = ("additionalProperties", "items", "not", "if", "then", "else", "contains",
        "unevaluatedProperties", "unevaluatedItems", "additionalItems")
_MANY = ("anyOf", "oneOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def closed_schema(schema: Any) -> Any:
    """A copy of `schema` with unlisted properties (and items) closed; the input is unchanged."""
    return _close(schema, merged=False)


def _close(schema: Any, merged: bool) -> Any:
    if not isinstance(schema, dict):
        return schema  # true / false, or not a schema: the engine reports it
    out = dict(schema)
    for key in _ONE:
        if key in out:
            value = out[key]
            out[key] = ([_close(s, False) for s in value] if isinstance(value, list)
                        else _close(value, False))  # `items` as a list: older drafts' tuples
    for key in _MANY:
        if isinstance(out.get(key), list):
            out[key] = [_close(s, False) for s in out[key]]
    for key in _MAP:
        if isinstance(out.get(key), dict):
            out[key] = {name: _close(s, False) for name, s in out[key].items()}
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [_close(s, True) for s in out["allOf"]]
    merged = merged or "allOf" in out or "$ref" in out
    if not merged:
        if isinstance(out.get("properties"), dict) and not any(k in out for k in _OPEN_KEYS):
            out["additionalProperties"] = False
        if isinstance(out.get("prefixItems"), list) and "items" not in out \
                and "unevaluatedItems" not in out:
            out["items"] = False
    return out
