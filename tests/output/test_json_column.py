"""The generated_json column (output.parse_json): typed from the job's JSON schema, each text parsed into
it, or null.
"""


import pytest

from helpers.config import compose
from lmbatch.config import ConfigError
from lmbatch.output.json_column import arrow_type, parsed_column
from lmbatch.plan.job import plan_job, to_job_config


def test_a_schema_types_the_generated_json_column(tmp_path):
    """As pydantic writes a model's schema: $defs, Optional fields as anyOf with null, enums, lists."""
    import pyarrow as pa

    schema = {"$defs": {"Item": {"type": "object", "properties": {"name": {"type": "string"},
                                                                   "qty": {"type": "integer"}}}},
              "type": "object", "properties": {
                  "urgent": {"type": "boolean"}, "team": {"enum": ["billing", "tech"]},
                  "score": {"anyOf": [{"type": "number"}, {"type": "null"}]}, "note": {"type": ["string", "null"]},
                  "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}}, "level": {"const": 3}}}
    item = pa.struct([("name", pa.string()), ("qty", pa.int64())])
    assert arrow_type(schema) == pa.struct([("urgent", pa.bool_()), ("team", pa.string()), ("score", pa.float64()),
                                            ("note", pa.string()), ("items", pa.list_(item)), ("level", pa.int64())])
    assert arrow_type({"type": "integer"}) == pa.int64()
    for bad, says in [({"type": "object"}, "json_schema: an object without properties"),
                      ({"properties": {"a": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}},
                       r"json_schema.a: a choice of 2 types"),
                      ({"properties": {"a": {"enum": ["x", 1]}}}, r"json_schema.a: an enum of \['int', 'str'\]"),
                      ({"$defs": {"N": {"properties": {"next": {"$ref": "#/$defs/N"}}}}, "$ref": "#/$defs/N"},
                       "json_schema.next: #/\\$defs/N holds itself"),
                      ({"type": "array"}, r"json_schema\[\]: no type")]:
        with pytest.raises(ValueError, match=says):
            arrow_type(bad)
    with pytest.raises(ConfigError, match="output.parse_json needs generation.json_schema"):
        to_job_config(compose("output.parse_json=true", "output.path=out"))
    with pytest.raises(ConfigError, match="output.parse_json cannot type the generated_json column: json_schema: an "
                                          "object without properties"):
        plan_job(to_job_config(compose("output.parse_json=true", f"output.path={tmp_path}",
                                       "generation.json_schema={type: object}")))


def test_texts_parse_to_the_column_type_or_null():
    import pyarrow as pa

    type_ = pa.struct([("label", pa.string()), ("n", pa.int64())])
    texts = ['{"label": "yes", "n": 3}', '{"label": "no", "n": 4', None, '{"label": "no", "n": 99999999999999999999}',
             "true", '{"label": "no"}']
    assert parsed_column(texts, type_).to_pylist() == [
        {"label": "yes", "n": 3}, None, None, None, None, {"label": "no", "n": None}]  # cut, error, too big, other
