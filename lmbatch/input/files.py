"""The input's files checked up front, from their Parquet footers: columns present and of the right kind,
one schema over all files (`inspect_inputs`).

Everything here runs before any model loads, so a bad job (missing path, corrupt file, missing column)
stops with one readable `JobError`. Finding the files: `discovery`; scanning a column: `scans`; cutting
the rows into chunks and reading a chunk back: `chunks`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lmbatch.errors import JobError
from lmbatch.input.discovery import discover_files, hive_partitions
from lmbatch.storage import in_threads, with_scheme


@dataclass(frozen=True)
class InputFile:
    path: str
    """Path inside its filesystem (no scheme)."""
    num_rows: int
    size: int


@dataclass
class InputPlan:
    uri: str
    files: list[InputFile]
    schema: pa.Schema
    """The files' columns, then the Hive partition columns."""
    partition_columns: tuple[str, ...] = ()
    """Keys of `key=value` directories above the files (Spark's partitioned tables): string columns."""

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    def head(self, rows: Optional[int]) -> InputPlan:
        """The plan for the first `rows` rows only, files in order (all of them when None). The last
        file kept may be cut short: its `num_rows` then counts only the rows taken."""
        if rows is None:
            return self
        files = []
        for f in self.files:
            if rows <= 0:
                break
            files.append(replace(f, num_rows=min(f.num_rows, rows)))
            rows -= f.num_rows
        return replace(self, files=files)


def is_text(t: pa.DataType) -> bool:
    """Any Arrow string type; dictionary-encoded too (a pandas `category` column)."""
    if pa.types.is_dictionary(t):
        return is_text(t.value_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _is_number(t: pa.DataType) -> bool:
    # floats too where whole numbers are wanted: pandas writes an integer column with nulls as float64
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


COLUMN_KINDS = {
    "string": (is_text, "strings"),
    "messages": (_is_list, "lists of {role, content} messages"),
    "integer": (_is_number, "whole numbers"),
    "number": (_is_number, "numbers"),
    "boolean": (pa.types.is_boolean, "booleans"),
    "strings": (lambda t: is_text(t) or (_is_list(t) and is_text(t.value_type)), "strings or lists of strings"),
}
"""Kinds of column `inspect_inputs` checks: (whether a type holds it, what to call it)."""


def inspect_inputs(uri: str, required: dict[str, str]) -> InputPlan:
    """Read every footer; check the required columns exist with the right kind of type.

    `required` maps column name -> a kind of COLUMN_KINDS, or "any". Files must agree on
    the type of every column that is read, so that output parts share one schema, and on
    their Hive partition keys (`key=value` directories), which become string columns.
    """
    fs, infos = discover_files(uri)
    files, schema, partition_keys = [], None, None
    for info, meta in zip(infos, in_threads(functools.partial(_read_footer, fs), [i.path for i in infos])):
        name = with_scheme(uri, info.path)
        if isinstance(meta, Exception):  # any footer failure means the file is unusable
            raise JobError(f"input file {name} is not a readable Parquet file: {meta}") from None
        file_schema = meta.schema.to_arrow_schema()
        keys = [k for k in hive_partitions(uri, info.path) if k not in file_schema.names]
        if partition_keys is None:
            partition_keys = keys
        elif keys != partition_keys:
            raise JobError(f"input file {name} lies under Hive partition directories {keys or 'none'}, but earlier "
                           f"files under {partition_keys or 'none'}; point input.path at one table")
        file_schema = pa.schema([*file_schema, *(pa.field(k, pa.string()) for k in keys)])
        if repeated := sorted({c for c in file_schema.names if file_schema.names.count(c) > 1}):
            # pyarrow writes such a file, but no column of it can be read by name
            raise JobError(f"input file {name} has more than one column named {', '.join(map(repr, repeated))}: "
                           "rewrite it with distinct column names")
        for column, kind in required.items():
            if column not in file_schema.names:
                raise JobError(f"input file {name} has no column {column!r} "
                               f"(columns: {', '.join(file_schema.names)})")
            col_type = file_schema.field(column).type
            if pa.types.is_null(col_type):  # all null in this file: its rows become error rows
                continue
            holds, what = COLUMN_KINDS.get(kind, (None, None))
            if holds is not None and not holds(col_type):
                raise JobError(f"column {column!r} in {name} must hold {what}, found {col_type}")
        merged, differences = _merge_schemas(file_schema if schema is None else schema, file_schema)
        if merged is None:
            raise JobError(f"input file {name} does not match the files before it: {differences}")
        schema = merged
        files.append(InputFile(path=info.path, num_rows=meta.num_rows, size=info.size))
    return InputPlan(uri=uri, files=files, schema=schema, partition_columns=tuple(partition_keys))


def _read_footer(fs: pafs.FileSystem, path: str):
    """A file's Parquet metadata, or the exception that makes it unusable (raised in input order)."""
    try:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata
    except Exception as e:  # noqa: BLE001 - whatever the reason, the file cannot be read
        return e


def _merge_schemas(a: pa.Schema, b: pa.Schema) -> tuple[Optional[pa.Schema], str]:
    """One schema for two files' columns (in a's order: columns are read by name), or None and
    what differs: a column one file lacks, or types no one type holds without loss. (A file with two
    columns of one name is refused before, by `inspect_inputs`.)"""
    missing, extra = [n for n in a.names if n not in b.names], [n for n in b.names if n not in a.names]
    fields, clashes = [], []
    for x in a:
        if x.name in b.names:
            common = _common_type(x.type, b.field(x.name).type)
            if common is None:
                clashes.append(f"its column {x.name!r} is {b.field(x.name).type}, theirs {x.type}")
            else:
                fields.append(pa.field(x.name, common))
    differences = ([f"it lacks column(s) {', '.join(map(repr, missing))}"] if missing else []) + \
        ([f"it has column(s) {', '.join(map(repr, extra))} they lack"] if extra else []) + clashes
    return (None, "; ".join(differences)) if differences else (pa.schema(fields), "")


def _common_type(x: pa.DataType, y: pa.DataType) -> Optional[pa.DataType]:
    """One type that holds, without loss, the values of a column typed `x` in some files and `y` in
    others, or None. Writers differ on these: pandas writes a column of Nones as type null, pyarrow
    and pandas write strings as string where polars writes large_string, a pandas category is a
    dictionary, Spark's IntegerType is int32 where pandas writes int64."""
    if x == y or pa.types.is_null(y):
        return x
    if pa.types.is_null(x):
        return y
    if pa.types.is_dictionary(x) or pa.types.is_dictionary(y):
        return _common_type(x.value_type if pa.types.is_dictionary(x) else x,
                            y.value_type if pa.types.is_dictionary(y) else y)
    if is_text(x) and is_text(y):
        return pa.large_string()
    if pa.types.is_integer(x) and pa.types.is_integer(y) and \
            pa.types.is_signed_integer(x) == pa.types.is_signed_integer(y):
        return x if x.bit_width >= y.bit_width else y
    return None


