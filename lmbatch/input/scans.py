"""Whole-column scans of the input, a row group at a time (a scan holds one row group): the plan
looks for repeated ids and for long partition values before any model loads.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lmbatch.errors import JobError
from lmbatch.input.discovery import hive_partitions
from lmbatch.input.files import InputFile
from lmbatch.storage import in_threads, resolve_filesystem, with_scheme


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
