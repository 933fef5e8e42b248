"""URIs and filesystems, shared by the input and the output: local paths, pyarrow's own filesystems
(s3://, gs://, hdfs://) and any scheme an installed fsspec implementation knows; many files at a time;
the local cache of built-in things.
"""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from lmbatch.errors import JobError
from lmbatch.retrying import with_retries


def absolute(path: str) -> str:
    """A URI as it is; a local path absolute (Ray's workers run elsewhere), `~` expanded: the shell
    leaves a `~` quoted for Hydra or read from a config file, and `output.path` made a directory `~`."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or URI; credentials and endpoint come from the environment.

    pyarrow's own filesystems first (local, s3, gs, hdfs, ...); any other scheme that an installed
    fsspec implementation knows (az:// with adlfs, ...) is wrapped for pyarrow. All but the local one
    retry transient faults (`lmbatch.retrying`).
    """
    if "://" not in uri:
        return pafs.LocalFileSystem(), absolute(uri)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        return with_retries(fs), path
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass  # not a scheme pyarrow knows: try fsspec
    except OSError as e:
        raise JobError(f"cannot open {uri}: {e}") from None
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:
        raise JobError(f"cannot open {uri}: neither pyarrow nor fsspec has a filesystem for it ({e})") from None
    return with_retries(pafs.PyFileSystem(pafs.FSSpecHandler(fs))), path


def with_scheme(uri: str, path: str) -> str:
    """Give a filesystem path back the scheme of the URI it came from (s3://bucket/x)."""
    return f"{uri.split('://', 1)[0]}://{path}" if "://" in uri else path


HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"  # how Spark and Hive name the directory of null values


# Work on many files (input footers and ids, the parts checked before _SUCCESS, a chunk's partition
# parts) runs this many files at a time: an object store takes tens of milliseconds per request,
# so 10,000 files one by one would take minutes.
CONCURRENT_FILES = 16


def in_threads(fn, items: list) -> Iterator:
    """fn over items, CONCURRENT_FILES at a time (I/O bound); results in the order of items."""
    with concurrent.futures.ThreadPoolExecutor(min(CONCURRENT_FILES, max(1, len(items)))) as pool:
        yield from pool.map(fn, items)


def is_inside(inner: str, outer: str) -> bool:
    """Whether path `inner` equals `outer` or lies below it (same scheme, normalised)."""
    a, b = inner.rstrip("/"), outer.rstrip("/")
    return a == b or a.startswith(b + "/")


def cache_dir() -> Path:
    return Path(os.environ.get("LMBATCH_CACHE", Path.home() / ".cache" / "lmbatch"))
