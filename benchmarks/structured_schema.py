"""The ~10-field JSON schema of the structured-output benchmarks (an enum, a list of
strings, a nested object, numbers, a boolean), and one document valid against it."""

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "joined": {"type": "string", "format": "date"},
        "notes": {"type": "string", "maxLength": 200},
    },
    "required": ["name", "age", "email", "role", "score", "active", "tags", "address",
                 "joined", "notes"],
    "additionalProperties": False,
}

EXAMPLE_DOCUMENT = {
    "name": "Ada Lovelace", "age": 36, "email": "ada@example.com", "role": "admin",
    "score": 97.5, "active": True, "tags": ["math", "engines", "poetry"],
    "address": {"street": "12 St James's Square", "city": "London", "zip": "12345"},
    "joined": "1843-07-10", "notes": "Wrote the first published program.",
}
