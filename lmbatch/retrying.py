"""Storage requests that ride out an object store's bad moments: throttling (503 SlowDown, 429), dropped
or reset connections, timeouts and 5xx answers are retried with capped exponential backoff and jitter;
what is not transient (403, 404, NoSuchBucket, an endpoint that does not exist) fails at once, as it did.

Two layers retry, each what the other cannot:
  - the filesystem's own client, where it has one: pyarrow's AWS SDK retries each HTTP request of an
    s3:// filesystem (SDK_ATTEMPTS times, its standard strategy), with `storage.request_timeout_s`
    bounding each, so a request held unanswered is given up and sent again;
  - `RetryingHandler`, which wraps every filesystem but the local one (s3, gs, hdfs, fsspec's), retries a
    whole operation: a listing, a file's info, a delete, a read whose answer broke off halfway (the SDK
    does not retry a body that stops coming: it opens the object again and reads on from where it was),
    a write (the whole object, under its final name: an object store's PUT, or its multipart upload's
    completion, makes it appear whole or not at all, so a retried write never leaves two copies or half of
    one).
Retries are counted by kind in each process (`take_counts`), for the job's summary and _metrics.json.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import logging
import random
import re
import threading
import time
from typing import Callable, Optional, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a storage operation is tried (the job's `storage` config group)."""
    attempts: int = 8
    base_delay_s: float = 0.5
    max_delay_s: float = 20.0
    request_timeout_s: float = 30.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt `attempt` (1, 2, ...): capped exponential backoff, half of
        it random, so that replicas throttled together do not come back together."""
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


_policy = RetryPolicy()


def set_policy(policy: RetryPolicy) -> None:
    """Set the policy of the filesystems this process opens from now on (the driver, each replica and
    prepare task call it with the job's `storage` settings)."""
    global _policy
    _policy = policy


SDK_ATTEMPTS = 3
"""Attempts of each HTTP request by pyarrow's AWS SDK (its default), under RetryingHandler's attempts."""


# -- what is transient -----------------------------------------------------------------------------

PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)

TRANSIENT = (  # the kind a retry is counted under, and how the error says it
    ("throttled", re.compile(r"SLOW_DOWN|SlowDown|THROTTL|Throttl|TOO_MANY_REQUESTS|TooManyRequests|"
                             r"HTTP status 429|RequestLimitExceeded|reduce your request rate|rateLimitExceeded", re.I)),
    ("timeout", re.compile(r"curlCode: 28|Timeout was reached|timed out|REQUEST_TIMEOUT|RequestTimeout", re.I)),
    ("server error", re.compile(r"HTTP status 5\d\d|INTERNAL_FAILURE|InternalError|SERVICE_UNAVAILABLE|"
                                r"ServiceUnavailable|Service Unavailable|Bad Gateway")),
    # a network error, but an endpoint that does not resolve or listens to nobody (curl 6, 7): a wrong
    # endpoint fails at once rather than after minutes of retries
    ("connection", re.compile(r"NETWORK_CONNECTION during .* operation: (?!curlCode: [67],)|Connection reset|"
                              r"reset by peer|Broken pipe|Connection aborted|connection was closed|"
                              r"Server disconnected|IncompleteRead|ConnectionClosed|Empty reply", re.I)),
)


def transient_kind(error: BaseException) -> Optional[str]:
    """The kind of a transient storage error (counted under it and retried), or None: fail at once."""
    if isinstance(error, PERMANENT) or not isinstance(error, Exception):
        return None
    text = f"{type(error).__name__}: {error}"
    for kind, pattern in TRANSIENT:
        if pattern.search(text):
            return kind
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        return "connection"
    return None


# -- counts and deadlines ---------------------------------------------------------------------------

_counts: collections.Counter = collections.Counter()
_counts_lock = threading.Lock()


def take_counts() -> dict[str, int]:
    """The retries this process made since the last call, by kind (a replica's chunk summary carries them)."""
    with _counts_lock:
        taken = dict(_counts)
        _counts.clear()
    return taken


_local = threading.local()


class until:
    """`with until(deadline):` no retry on this thread waits past `deadline` (time.monotonic()): the
    lease's renewal must land before the lease would lapse, or be known to have failed by then."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def __enter__(self):
        self.outer, _local.deadline = getattr(_local, "deadline", None), self.deadline

    def __exit__(self, *exc):
        _local.deadline = self.outer


def retried(what: str, fn: Callable[[], T], policy: Optional[RetryPolicy] = None, done_if_missing: bool = False) -> T:
    """fn(), tried again on transient errors as `policy` says. `done_if_missing`: a FileNotFoundError
    after a failed attempt means that attempt did it (a delete whose answer was lost)."""
    policy = policy or _policy
    started, deadline = time.monotonic(), getattr(_local, "deadline", None)
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except FileNotFoundError:
            if done_if_missing and attempt > 1:
                return None
            raise
        except Exception as e:
            kind = transient_kind(e)
            if kind is None:
                raise
            wait = policy.delay(attempt)
            if attempt == policy.attempts or (deadline is not None and time.monotonic() + wait > deadline):
                raise OSError(f"{e} (given up after {attempt} attempts in {time.monotonic() - started:.0f} s; "
                              "storage.attempts sets how many)") from e
            with _counts_lock:
                _counts[kind] += 1
            log.debug("storage: %s failed (%s), trying again in %.1f s: %s", what, kind, wait, e)
            time.sleep(wait)
    raise AssertionError("unreachable")


# -- the filesystem ----------------------------------------------------------------------------------


def with_retries(fs: pafs.FileSystem, policy: Optional[RetryPolicy] = None) -> pafs.FileSystem:
    """`fs` with every operation retried on transient errors (the local filesystem as it is)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return fs
    return pafs.PyFileSystem(RetryingHandler(fs, policy or _policy))


def _tuned(fs: pafs.FileSystem, policy: RetryPolicy) -> pafs.FileSystem:
    """An s3:// filesystem rebuilt with the SDK's retries and the request timeout set (the settings its
    pickle carries, which is how it travels to Ray's workers, lack the retry strategy)."""
    if not isinstance(fs, pafs.S3FileSystem):
        return fs
    _, (settings,) = fs.__reduce__()
    return pafs.S3FileSystem(**{**settings, "retry_strategy": pafs.AwsStandardS3RetryStrategy(SDK_ATTEMPTS),
                                "request_timeout": policy.request_timeout_s,
                                "connect_timeout": policy.request_timeout_s})


class RetryingHandler(pafs.FileSystemHandler):
    """A pyarrow filesystem handler that retries each operation of the filesystem it wraps."""

    def __init__(self, fs: pafs.FileSystem, policy: RetryPolicy):
        self.fs, self.policy = _tuned(fs, policy), policy

    def __reduce__(self):
        return RetryingHandler, (self.fs, self.policy)

    def __eq__(self, other):
        return isinstance(other, RetryingHandler) and self.fs.equals(other.fs)

    def _retried(self, what: str, fn: Callable[[], T], done_if_missing: bool = False) -> T:
        return retried(what, fn, self.policy, done_if_missing)

    def get_type_name(self) -> str:
        return f"retrying+{self.fs.type_name}"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self._retried("get file info", lambda: self.fs.get_file_info(paths))

    def get_file_info_selector(self, selector):
        return self._retried("list", lambda: self.fs.get_file_info(selector))

    def create_dir(self, path, recursive):
        self._retried("create a directory", lambda: self.fs.create_dir(path, recursive=recursive))

    def delete_dir(self, path):
        self._retried("delete a directory", lambda: self.fs.delete_dir(path), done_if_missing=True)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._retried("delete a directory's contents",
                      lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self):
        self._retried("delete everything", lambda: self.fs.delete_dir_contents("/", accept_root_dir=True))

    def delete_file(self, path):
        self._retried("delete a file", lambda: self.fs.delete_file(path), done_if_missing=True)

    def move(self, src, dest):  # not idempotent on an object store (a copy, then a delete): tried once
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self._retried("copy a file", lambda: self.fs.copy_file(src, dest))

    def open_input_stream(self, path):
        return pa.PythonFile(_RetryingReader(self, path), mode="r")

    def open_input_file(self, path):
        return pa.PythonFile(_RetryingReader(self, path), mode="r")

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_WholeObjectWriter(self, path, metadata), mode="w")

    def open_append_stream(self, path, metadata):  # no object store appends; tried once
        return self.fs.open_append_stream(path, metadata=metadata)


class _RetryingReader:
    """A file open for reading, each read retried: one whose answer broke off opens the object again and
    reads on from the same position."""

    def __init__(self, handler: RetryingHandler, path: str):
        self.handler, self.path = handler, path
        self._file: Optional[pa.NativeFile] = None
        self._size: Optional[int] = None
        self._position = 0
        self.closed = False
        self._size_now()  # opened at once, so that a missing file fails at its open, as with the file it wraps

    def _attempt(self, what: str, fn: Callable[[pa.NativeFile], T]) -> T:
        def attempt() -> T:
            if self._file is None:
                self._file = self.handler.fs.open_input_file(self.path)
            try:
                return fn(self._file)
            except Exception:
                self._drop()  # the connection under it may be gone: the next attempt opens it again
                raise
        return self.handler._retried(f"{what} {self.path}", attempt)

    def _drop(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except Exception:  # noqa: BLE001 - already broken
                pass

    def _size_now(self) -> int:
        if self._size is None:
            self._size = self._attempt("open", lambda f: f.size())
        return self._size

    def size(self) -> int:
        return self._size_now()

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._position, 2: self._size_now()}[whence]
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def read(self, nbytes: Optional[int] = None) -> bytes:
        left = self._size_now() - self._position
        nbytes = left if nbytes is None or nbytes < 0 else min(nbytes, left)
        if nbytes <= 0:
            return b""
        data = self._attempt("read", lambda f: f.read_at(nbytes, self._position))
        self._position += len(data)
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True
        self._drop()


class _WholeObjectWriter(io.BytesIO):
    """A file open for writing, held in memory and written as a whole object as it closes, each attempt
    under the final name (a part is a chunk's rows: megabytes, not gigabytes)."""

    def __init__(self, handler: RetryingHandler, path: str, metadata):
        super().__init__()
        self.handler, self.path, self.metadata = handler, path, metadata

    def close(self) -> None:
        if self.closed:
            return
        data = self.getvalue()
        super().close()

        def write() -> None:
            with self.handler.fs.open_output_stream(self.path, metadata=self.metadata) as f:
                f.write(data)
        self.handler._retried(f"write {self.path}", write)
