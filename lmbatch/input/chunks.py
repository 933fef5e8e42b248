"""Chunks, the unit of work: a row range of the input taken as one sequence of files (so many small
files share a chunk and a huge file is cut into several), read, generated and committed together.
Cut the input into chunks, and read a chunk's rows back, each file checked to be as planned."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lmbatch.errors import JobError
from lmbatch.input.files import InputFile
from lmbatch.input.scans import read_columns
from lmbatch.storage import resolve_filesystem, with_scheme


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one input file."""
    file: str
    file_index: int
    start: int
    stop: int
    file_size: int
    """The file's size when the job was planned (see `_check_unchanged`)."""


@dataclass(frozen=True)
class Chunk:
    id: str
    """Stable name, e.g. `00003-000002048`: file index and row where the chunk begins; names the output part."""
    start: int
    stop: int
    """Rows [start, stop) of the whole input (files in order)."""
    pieces: tuple[Piece, ...]
    """The file row ranges that make up the chunk, in order."""

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    @classmethod
    def from_dict(cls, d: dict) -> "Chunk":
        """Inverse of dataclasses.asdict (chunks travel to Ray tasks as plain rows)."""
        return cls(d["id"], d["start"], d["stop"], tuple(Piece(**p) for p in d["pieces"]))


def plan_chunks(files: list[InputFile], chunk_rows: int) -> list[Chunk]:
    """Cut the input, files taken in order, into chunks of chunk_rows rows (the last may be shorter).

    Small files are packed together and large ones split, so chunks (and output parts) have an even
    size whatever the file layout; ids are stable for given files and chunk_rows.
    """
    chunks, pieces, chunk_start, position = [], [], 0, 0
    for index, f in enumerate(files):
        row = 0
        while row < f.num_rows:
            take = min(f.num_rows - row, chunk_start + chunk_rows - position)
            pieces.append(Piece(f.path, index, row, row + take, f.size))
            row, position = row + take, position + take
            if position - chunk_start == chunk_rows:
                chunks.append(_chunk(chunk_start, position, pieces))
                pieces, chunk_start = [], position
    if pieces:
        chunks.append(_chunk(chunk_start, position, pieces))
    return chunks


def _chunk(start: int, stop: int, pieces: list[Piece]) -> Chunk:
    first = pieces[0]
    return Chunk(f"{first.file_index:05d}-{first.start:09d}", start, stop, tuple(pieces))


def choose_chunk_rows(total_rows: int, configured: int, num_replicas: int) -> int:
    """Rows per chunk: at most `configured`, cut so every replica gets the same number of chunks.

    Small inputs give each replica two chunks, not more: a chunk is also the window the planner
    buckets, and smaller windows make narrower micro-batches, so more decode steps for the same
    rows (for the benchmark's workload a 625-row window plans 4.7x the decode steps of one
    5,000-row pool; 1,250 rows 2.8x). A number of chunks that is a multiple of the replicas keeps
    one replica from finishing the job alone.
    """
    chunks = max(2 * num_replicas, -(-total_rows // configured))
    chunks = -(-chunks // num_replicas) * num_replicas
    return max(1, -(-total_rows // chunks))


def read_chunk(uri: str, chunk: Chunk, columns: list[str], schema: Optional[pa.Schema] = None) -> pa.Table:
    """Read a chunk's rows, only the given columns, typed as in `schema` (the input's, merged over
    its files: a column all null in one file has the others' type in every part)."""
    tables = [_read_piece(uri, p, tuple(columns)) for p in chunk.pieces]
    if schema is not None:
        tables = [t.cast(pa.schema([schema.field(c) for c in columns])) for t in tables]
    return pa.concat_tables(tables)


def _read_piece(uri: str, piece: Piece, columns: tuple) -> pa.Table:
    """Rows [start, stop) of one file: only the row groups that hold them are read."""
    _check_unchanged(uri, piece)
    meta = _open_parquet(uri, piece.file).metadata
    groups, first_row, offset = [], None, 0
    for g in range(meta.num_row_groups):
        rows = meta.row_group(g).num_rows
        if offset < piece.stop and offset + rows > piece.start:
            groups.append(g)
            first_row = offset if first_row is None else first_row
        offset += rows
    table = _read_row_groups(uri, piece.file, tuple(groups), columns)
    return table.slice(piece.start - first_row, piece.stop - piece.start)


def _check_unchanged(uri: str, piece: Piece) -> None:
    """Refuse a file rewritten since the job was planned (a producer replacing its table while the
    job runs): its rows would not be those planned, and the output would mix two versions of the
    input. Checked at every read, as a worker keeps files open from chunk to chunk."""
    size = _filesystem(uri).get_file_info(piece.file).size
    if size != piece.file_size:
        now = "it is gone" if size is None else f"{size:,} now"
        raise JobError(f"input file {with_scheme(uri, piece.file)} changed while the job ran "
                       f"({piece.file_size:,} bytes when planned, {now}): the job stops rather than mix two "
                       "versions of the input in one output; once the input is settled, run it again into a new "
                       "output.path (or with output.mode=overwrite)")


@functools.lru_cache(maxsize=4)
def _filesystem(uri: str) -> pafs.FileSystem:
    return resolve_filesystem(uri)[0]


@functools.lru_cache(maxsize=8)
def _open_parquet(uri: str, path: str) -> pq.ParquetFile:
    return pq.ParquetFile(_filesystem(uri).open_input_file(path))


# Consecutive chunks of one large row group often come to the same worker: keep the last read.
@functools.lru_cache(maxsize=1)
def _read_row_groups(uri: str, path: str, groups: tuple, columns: tuple) -> pa.Table:
    return read_columns(_open_parquet(uri, path), uri, path, groups, columns)
