"""Which files an input.path names: a file, a directory searched recursively or a glob (as a shell
matches one), hidden and unfinished writes left out, and the Hive partitions (`key=value` directories)
above each file.
"""

from __future__ import annotations

import fnmatch
import functools
import urllib.parse
from typing import Optional

import pyarrow.fs as pafs

from lmbatch.errors import JobError
from lmbatch.storage import HIVE_NULL, resolve_filesystem


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
    try:
        info = fs.get_file_info(path)
    except OSError as e:  # a wrong endpoint, no permission, or a store that stayed down through the retries
        raise JobError(f"cannot read input.path {uri}: {e}") from None
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
