"""Input side: find the Parquet files, validate them up front, and scan whole columns of them.

Everything here runs before any model loads, from Parquet footers (and the id and prompt columns
the plan scans), so a bad job (missing path, corrupt file, missing column) stops with one readable
`JobError`. Cutting the input into chunks and reading a chunk back: `lmbatch.input.chunks`.
"""

from __future__ import annotations

import fnmatch
import functools
import urllib.parse
from dataclasses import dataclass, replace
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from lmbatch.errors import JobError
from lmbatch.storage import HIVE_NULL, in_threads, resolve_filesystem, with_scheme


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


def _is_data_file(relative_path: str) -> bool:
    """A Parquet file, not hidden and not below a hidden directory: `_temporary/` (a Spark write
    in progress or abandoned), `.hidden/`, `_delta_log/` hold no rows of the table."""
    parts = relative_path.strip("/").split("/")
    return not any(map(_hidden, parts)) and parts[-1].endswith((".parquet", ".parq", ".pq"))


def _hidden(name: str) -> bool:
    """Not data, as Spark, Hive and pyarrow see it: `_SUCCESS`, `_temporary/`, `.crc` files."""
    return name.startswith(("_", "."))


def _glob_base(path: str) -> Optional[str]:
    """The directory a glob pattern starts below (None: not a glob)."""
    if not any(c in path for c in "*?["):
        return None
    return path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0] or "/"


def _glob_match(pattern: list[str], parts: list[str]) -> bool:
    """Whether a path's segments match a glob's, as a shell would: `*`, `?` and `[...]` within one
    segment, `**` across any number. A name starting with `_` or `.` (an unfinished Spark write's
    `_temporary/`, checksum files) is matched only by a pattern segment that starts the same way."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_glob_match(rest, parts[i:]) for i in range(len(parts) + 1)
                   if not any(map(_hidden, parts[:i])))
    return (bool(parts) and not (_hidden(parts[0]) and not head.startswith(parts[0][0]))
            and fnmatch.fnmatchcase(parts[0], head) and _glob_match(rest, parts[1:]))


def hive_partitions(uri: str, path: str) -> dict[str, Optional[str]]:
    """`key=value` directories between the input root (a directory or a glob's base) and a file.

    Spark and Hive write a table partitioned by a column as `column=value/part-*.parquet`, leaving
    the column out of the files: reading it back from the paths keeps it in the output.
    """
    directories = path[len(_input_root(uri)):].strip("/").split("/")[:-1]
    pairs = (d.partition("=") for d in directories if "=" in d)
    return {k: None if v == HIVE_NULL else urllib.parse.unquote(v) for k, _, v in pairs}


@functools.lru_cache(maxsize=8)
def _input_root(uri: str) -> str:
    path = resolve_filesystem(uri)[1]
    return _glob_base(path) or path


def discover_files(uri: str) -> tuple[pafs.FileSystem, list[pafs.FileInfo]]:
    """The Parquet files named by a file, a directory (searched recursively) or a glob."""
    fs, path = resolve_filesystem(uri)
    base = _glob_base(path)
    if base is not None:
        infos = _list(fs, base, uri)
        pattern = path.split("/")
        found = [i for i in infos if i.is_file and _glob_match(pattern, i.path.split("/"))]
        if not found:
            raise JobError(f"input.path {uri} matches no files")
        return fs, found
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise JobError(f"input.path {uri} does not exist")
    if info.type == pafs.FileType.File:
        return fs, [info]
    infos = _list(fs, path, uri)
    found = [i for i in infos if i.is_file and _is_data_file(i.path[len(path):])]
    if not found:
        if any(i.is_file for i in infos):
            raise JobError(f"input.path {uri} holds no Parquet files (*.parquet)")
        raise JobError(f"input.path {uri} is an empty directory")
    return fs, found


def _list(fs: pafs.FileSystem, base: str, uri: str) -> list[pafs.FileInfo]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except (FileNotFoundError, OSError) as e:
        raise JobError(f"cannot list input.path {uri}: {e}") from None
    return sorted(infos, key=lambda i: i.path)


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


def read_columns(parquet: pq.ParquetFile, uri: str, path: str, groups: tuple, columns: tuple) -> pa.Table:
    """The given columns of some row groups; a column the file lacks is one of its Hive partitions."""
    stored = [c for c in columns if c in parquet.schema_arrow.names]
    try:
        table = parquet.read_row_groups(list(groups), columns=stored)
    except (OSError, pa.ArrowException) as e:  # the footer was read when planning: the data is bad
        detail = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()).rstrip(".")
        raise JobError(f"input file {with_scheme(uri, path)} cannot be read (row groups {', '.join(map(str, groups))}, "
                       f"columns {', '.join(stored)}): {detail} (a corrupt file? replace or remove it)") from None
    partitions = hive_partitions(uri, path)
    for c in columns:
        if c not in stored:
            table = table.append_column(c, pa.array([partitions[c]] * table.num_rows, pa.string()))
    return table.select(list(columns))


def _row_groups_of(fs: pafs.FileSystem, uri: str, path: str, column: str) -> Iterator[pa.ChunkedArray]:
    """One column of a file, a row group at a time: a scan of the whole input holds one row group."""
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        for g in range(parquet.metadata.num_row_groups):
            yield read_columns(parquet, uri, path, (g,), (column,))[column]


def long_strings(uri: str, files: list[InputFile], column: str, min_bytes: int) -> list[str]:
    """The distinct values of a string column at least `min_bytes` long in UTF-8, over the input's
    rows (a file's `num_rows`, which a limit may cut)."""
    fs, _ = resolve_filesystem(uri)

    def of_file(f: InputFile) -> set[str]:
        found, offset = set(), 0
        for values in _row_groups_of(fs, uri, f.path, column):
            if offset >= f.num_rows:
                break
            values = values.slice(0, f.num_rows - offset).cast(pa.large_string())
            offset += len(values)
            found.update(values.filter(pc.greater_equal(pc.binary_length(values), min_bytes)).to_pylist())
        return found
    return sorted(set().union(*in_threads(of_file, files)))


def find_duplicate_ids(uri: str, files: list[InputFile], id_column: str) -> list[int]:
    """Rows whose id appeared earlier in the input, as sorted positions in the whole input.

    Streams the id column one row group at a time and keeps a 64-bit hash and a position per
    row (16 bytes; 160 MB for 10M rows), released when the check ends. Null ids are skipped.
    """
    fs, _ = resolve_filesystem(uri)
    hashes, positions, offset = [], [], 0
    for file_hashes, present, rows in in_threads(lambda f: _id_hashes(fs, uri, f.path, id_column), files):
        hashes.append(file_hashes)
        positions.append(present + offset)
        offset += rows
    flat = np.concatenate(hashes)
    where = np.concatenate(positions)
    order = np.argsort(flat, kind="stable")  # stable: an id's first occurrence sorts first
    repeats = np.zeros(len(flat), dtype=bool)
    repeats[1:] = flat[order[1:]] == flat[order[:-1]]
    return np.sort(where[order[repeats]]).tolist()


def _id_hashes(fs: pafs.FileSystem, uri: str, path: str, id_column: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(hashes of a file's non-null ids, their row positions, the file's rows), a row group at a time."""
    hashes, positions, offset = [np.empty(0, np.int64)], [np.empty(0, np.int64)], 0  # a file may have no rows
    for ids in _row_groups_of(fs, uri, path, id_column):
        hashes.append(_id_keys(ids.drop_null()))
        positions.append(np.flatnonzero(ids.is_valid().to_numpy(zero_copy_only=False)) + offset)
        offset += len(ids)
    return np.concatenate(hashes), np.concatenate(positions), offset


def _id_keys(ids: pa.ChunkedArray) -> np.ndarray:
    """A 64-bit key per id, the same for equal ids. Integers are their own key: Python's hash() gives
    -1 and -2 (or 1 and 2**61) one value, which made distinct ids count as repeats. Other ids are
    hashed as text where Arrow can cast them (the same trap for -1.0 and -2.0), else as Python values."""
    if pa.types.is_integer(ids.type):
        return ids.to_numpy().astype(np.int64)  # uint64 above 2**63 wraps: still one key per value
    key = hash
    if not (pa.types.is_binary(ids.type) or pa.types.is_large_binary(ids.type)):
        try:
            ids = ids.cast(pa.string())
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid):  # structs, lists: not hashable as they come
            key = lambda v: hash(repr(v))  # noqa: E731
    return np.fromiter((key(v) for v in ids.to_pylist()), dtype=np.int64, count=len(ids))


