"""The type of the generated_json column (output.parse_json) from the job's JSON schema, and each text
parsed into it (null where a text is not a value the schema accepts whole).
"""

from __future__ import annotations

import json


def arrow_type(schema: dict):
    """The Arrow type of the JSON values a schema accepts, for output.parse_json: an object is a struct of its
    properties, an array a list of its items, a string, integer, number or boolean itself, an enum or a
    const the type of its values, and `anyOf`/`oneOf`/a list of types one type and null (as pydantic
    writes an Optional). References to the schema's own `$defs` are followed. ValueError names the part
    that has no one type (or would nest without end)."""
    import pyarrow as pa

    definitions = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    simple = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}

    def typed(node: dict, where: str, followed: tuple) -> pa.DataType:
        if "$ref" in node:
            ref = node["$ref"]
            name = ref.rsplit("/", 1)[-1]
            if not ref.startswith(("#/$defs/", "#/definitions/")) or name not in definitions:
                raise ValueError(f"{where}: $ref {ref!r} is not one of the schema's own $defs")
            if name in followed:
                raise ValueError(f"{where}: {ref} holds itself, and a column cannot nest without end")
            return typed(definitions[name], where, (*followed, name))
        options = node.get("anyOf", node.get("oneOf"))
        if options is not None:
            kept = [o for o in options if o.get("type") != "null"]
            if len(kept) != 1:
                raise ValueError(f"{where}: a choice of {len(kept)} types has no one column type")
            return typed(kept[0], where, followed)
        if "enum" in node or "const" in node:
            kinds = {type(v) for v in node.get("enum", [node.get("const")]) if v is not None}
            kind = {frozenset({str}): "string", frozenset({bool}): "boolean", frozenset({int}): "integer",
                    frozenset({float}): "number", frozenset({int, float}): "number"}.get(frozenset(kinds))
            if kind is None:
                raise ValueError(f"{where}: an enum of {sorted(k.__name__ for k in kinds)} has no one column type")
            return simple[kind]
        kind = node.get("type", "object" if "properties" in node else None)
        if isinstance(kind, list):
            kept = [k for k in kind if k != "null"]
            kind = kept[0] if len(kept) == 1 else f"one of {kept}"
        if kind == "object":
            if not node.get("properties"):
                raise ValueError(f"{where}: an object without properties has no columns to type")
            return pa.struct([pa.field(k, typed(v, f"{where}.{k}", followed)) for k, v in node["properties"].items()])
        if kind == "array":
            return pa.list_(typed(node.get("items", {}), f"{where}[]", followed))
        if kind not in simple:
            raise ValueError(f"{where}: {'no type' if kind is None else f'type {kind}'} has no one column type")
        return simple[kind]

    return typed(schema, "json_schema", ())


def parsed_column(texts, type_):
    """The texts parsed as JSON, as an Arrow array of `type_` (arrow_type's): null for a text that is not
    JSON (one cut at the token limit) or whose value does not fit the type (an integer over 64 bits)."""
    import pyarrow as pa

    values = []
    for text in texts:
        try:
            values.append(None if text is None else json.loads(text))
        except ValueError:
            values.append(None)
    try:
        return pa.array(values, type_)
    except (pa.ArrowException, OverflowError):  # some value does not fit: find it, row by row
        return pa.array([value if _fits(value, type_) else None for value in values], type_)


def _fits(value, type_) -> bool:
    import pyarrow as pa

    try:
        pa.array([value], type_)
        return True
    except (pa.ArrowException, OverflowError):
        return False
