"""Output side: the commit protocol that makes output exactly-once and resumable.

Layout of an output directory:
    _lmbatch_job.json       written first: the job's fingerprint and chunk size
    _lmbatch_run.json       while a run goes on: its lease (`lease`), removed at its end
    part-<chunk>.parquet    one per chunk, written atomically (temp name + rename on local disks;
                            a single PUT on object stores), so a part is either whole or absent
    _manifest.json, _metrics.json
    _SUCCESS                written last

With `output.partition_by=COLUMN` a chunk writes one part per value, Hive style
(`COLUMN=value/part-<chunk>.parquet`, the column itself moves into the path), and then a marker
`_chunks/<chunk>`: the marker, written last, is what records the chunk as done.

A part's existence is the only progress record, so there is no window between "data written"
and "progress recorded" in which a crash could duplicate rows: a rerun skips exactly the chunks
whose parts exist and regenerates the others under the same names. Resume bookkeeping on the
driver is one set of chunk ids: O(rows / chunk_rows), independent of row count within a chunk.
"""

from __future__ import annotations

import json
import os
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

import lmbatch
from lmbatch.errors import JobError
from lmbatch.storage import HIVE_NULL, in_threads, resolve_filesystem

STATE_FILE = "_lmbatch_job.json"
MANIFEST = "_manifest.json"
METRICS = "_metrics.json"
SUCCESS = "_SUCCESS"
LEASE_FILE = "_lmbatch_run.json"
PART_PREFIX, PART_SUFFIX = "part-", ".parquet"


def part_name(chunk_id: str) -> str:
    return f"{PART_PREFIX}{chunk_id}{PART_SUFFIX}"


def with_part_metadata(table: pa.Table, fingerprint: str, chunk_id: str) -> pa.Table:
    """A part found anywhere names its job (the fingerprint in _lmbatch_job.json) and chunk."""
    return table.replace_schema_metadata({"lmbatch.version": lmbatch.__version__, "lmbatch.job": fingerprint,
                                          "lmbatch.chunk": chunk_id})


@dataclass
class OutputState:
    """What an output directory already holds for this job."""

    finished: bool = False
    done_chunks: set[str] = field(default_factory=set)
    chunk_rows: Optional[int] = None
    """Chunk size recorded by the first run, reused so that resumed chunk ids line up."""
    fresh: bool = True
    """Nothing of this job is there yet (or it is to be overwritten)."""
    model_changed: bool = False
    """The finished output was made with other model files at model.path than there are now."""


CHUNK_MARKERS = "_chunks"


def partition_dir(column: str, value) -> str:
    return f"{column}={HIVE_NULL if value is None else urllib.parse.quote(str(value), safe='')}"


MAX_NAME_BYTES = 255
"""The longest file or directory name most file systems take (ext4, XFS, APFS, NTFS)."""


class OutputDir:
    def __init__(self, uri: str, partition_by: Optional[str] = None, compression: str = "snappy"):
        self.uri, self.partition_by, self.compression = uri, partition_by, compression
        self.fs, self.path = resolve_filesystem(uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def _file(self, name: str) -> str:
        return f"{self.path}/{name}"

    def names(self) -> list[str]:
        """What the directory holds, but the lease: another run's, which `lease` waits on."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))
        return [i.base_name for i in infos if i.base_name != LEASE_FILE]

    def inspect(self, fingerprint: str, mode: str, model: Optional[str] = None) -> OutputState:
        """Decide between fresh start, resume and no-op; refuse to touch anything not ours. `model` is
        the model's identity (`models.files.model_identity`): a job resumed with other model files at the
        same model.path would mix the outputs of two models."""
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.NotFound:
            self._check_creatable()
            return OutputState()
        if info.type != pafs.FileType.Directory:
            raise JobError(f"output.path {self.uri} exists and is not a directory")
        names = self.names()
        if not names:
            return OutputState()
        if STATE_FILE not in names:
            raise JobError(f"output.path {self.uri} is not empty and holds no lmbatch output; "
                           "choose another output.path (lmbatch never deletes what it did not write)")
        if mode == "overwrite":
            return OutputState()
        state = self.read_json(STATE_FILE)
        if state.get("fingerprint") != fingerprint:
            raise JobError(f"output.path {self.uri} holds the output of a different job "
                           f"(other input or generation settings); use output.mode=overwrite to replace it, "
                           "or choose another output.path")
        finished = SUCCESS in names
        # outputs begun before identities were recorded have none: nothing to compare
        model_changed = None not in (model, state.get("model")) and state["model"] != model
        if model_changed and not finished:
            raise JobError(f"output.path {self.uri} holds part of this job made with other model files than "
                           f"model.path holds now ({state['model']} then, {model} now): resuming would mix the "
                           "outputs of two models; point model.path at the model it began with, or use "
                           "output.mode=overwrite to start again")
        return OutputState(finished=finished, done_chunks=self.done_chunks(bool(self.partition_by)),
                           chunk_rows=state["chunk_rows"], fresh=False,
                           model_changed=model_changed)

    def _check_creatable(self) -> None:
        """A new output directory's nearest existing ancestor must be a directory, writable if local;
        on an object store that is at least its bucket (pyarrow creates no buckets)."""
        parts = self.path.rstrip("/").split("/")
        for i in range(len(parts) - 1, 0, -1):
            ancestor = "/".join(parts[:i]) or "/"
            found = self.fs.get_file_info(ancestor).type
            if found == pafs.FileType.File:
                raise JobError(f"output.path {self.uri} cannot be created: {ancestor} is a file")
            if found == pafs.FileType.Directory:
                if self.local and not os.access(ancestor, os.W_OK | os.X_OK):
                    raise JobError(f"output.path {self.uri} cannot be created: {ancestor} is not writable")
                return
        raise JobError(f"output.path {self.uri} cannot be created: "
                       f"{'nothing of its path exists' if self.local else f'its bucket {parts[0]} does not exist'}")

    def begin(self, state: OutputState, fingerprint: str, chunk_rows: int, model: Optional[str] = None) -> None:
        """Clear an overwritten job, create the directory, record the job (before any part)."""
        try:
            self._begin(state, {"fingerprint": fingerprint, "chunk_rows": chunk_rows, "model": model})
        except OSError as e:  # what the plan cannot see: no permission to write (an object store's policy)
            raise JobError(f"output.path {self.uri} cannot be written: {e}") from None

    def _begin(self, state: OutputState, record: dict) -> None:
        if state.fresh and self.fs.get_file_info(self.path).type == pafs.FileType.Directory:
            def delete(info: pafs.FileInfo) -> None:
                (self.fs.delete_dir if info.type == pafs.FileType.Directory else self.fs.delete_file)(info.path)
            # all but this run's lease; thousands of parts on an object store take a request each
            list(in_threads(delete, [i for i in self.fs.get_file_info(pafs.FileSelector(self.path))
                                     if i.base_name != LEASE_FILE]))
        self.fs.create_dir(self.path, recursive=True)
        for info in self._list(""):  # leftovers of parts that were being written when a run died
            if info.base_name.endswith(".tmp"):
                self.fs.delete_file(info.path)
        if state.fresh:
            self._write_text(STATE_FILE, json.dumps(record))

    def check_shared(self, fingerprint: str, where: str) -> None:
        """Called where parts are written (a replica, maybe on another node than the driver): the job
        file the driver wrote must be there, or the parts would land where the driver never looks."""
        try:
            found = self.read_json(STATE_FILE).get("fingerprint")
        except (OSError, ValueError):
            found = None
        if found != fingerprint:
            raise RuntimeError(f"output.path {self.uri}, as {where} sees it, does not hold this job's {STATE_FILE}, "
                               "which the driver wrote there: the output must be on storage every node shares "
                               "(a shared file system or an object store)")

    def write_part(self, chunk_id: str, table: pa.Table) -> None:
        if not self.partition_by:
            self._write_table(part_name(chunk_id), table)
            return
        column = table[self.partition_by]

        def write(value) -> None:
            # is_in, not equal: it matches a null to null and a NaN to NaN, which equal leaves out
            rows = table.filter(pc.is_in(column, value_set=pa.array([value], column.type)))
            self._write_table(f"{partition_dir(self.partition_by, value)}/{part_name(chunk_id)}",
                              rows.drop_columns([self.partition_by]))
        # A chunk may hold hundreds of values: one object-store PUT after another would take seconds.
        list(in_threads(write, pc.unique(column).to_pylist()))
        self.fs.create_dir(self._file(CHUNK_MARKERS), recursive=True)
        self._write_text(f"{CHUNK_MARKERS}/{chunk_id}", "")  # last: the chunk is whole

    def done_chunks(self, partitioned: bool) -> set[str]:
        """The chunks committed: a partitioned chunk once its marker exists, a plain one once its part does."""
        return {i.base_name for i in self._list(CHUNK_MARKERS)} if partitioned else set(self.part_files())

    def part_files(self) -> dict[str, list[str]]:
        """Chunk id -> paths of its parts (one, or one per partition value)."""
        found: dict[str, list[str]] = {}
        for info in self._list(""):
            name = info.base_name
            if info.is_file and name.startswith(PART_PREFIX) and name.endswith(PART_SUFFIX):
                found.setdefault(name[len(PART_PREFIX):-len(PART_SUFFIX)], []).append(info.path)
        return found

    def errors(self, chunk_ids, files: Optional[dict[str, list[str]]] = None) -> dict[str, tuple[int, list[str]]]:
        """Chunk id -> its rows and the error messages among them, read from its parts' `error` column
        alone (null on every row but an error row). `files`: `part_files()`, if the caller has listed them."""
        files = self.part_files() if files is None else files

        def read(chunk_id: str) -> tuple[int, list[str]]:
            columns = [pq.read_table(path, columns=["error"], filesystem=self.fs)["error"]
                       for path in files.get(chunk_id, ())]
            return sum(map(len, columns)), [message for c in columns for message in c.drop_null().to_pylist()]
        chunk_ids = sorted(chunk_ids)
        return dict(zip(chunk_ids, in_threads(read, chunk_ids)))

    def _write_table(self, name: str, table: pa.Table) -> None:
        final = self._file(name)
        if "/" in name:
            self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        if not self.local:  # an object store PUT is atomic: the object appears whole or not at all
            pq.write_table(table, final, filesystem=self.fs, compression=self.compression)
            return
        folder, base = final.rsplit("/", 1)
        scratch = f"{folder}/.{base}.{uuid.uuid4().hex}.tmp"
        pq.write_table(table, scratch, filesystem=self.fs, compression=self.compression)
        self.fs.move(scratch, final)  # rename: atomic, and a retried chunk replaces its own part

    def _list(self, sub: str) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(self._file(sub) if sub else self.path, recursive=True, allow_not_found=True)
        return self.fs.get_file_info(selector)

    def commit(self, manifest: dict, metrics: dict) -> None:
        self._write_text(MANIFEST, json.dumps(manifest, indent=2, default=str))
        self._write_text(METRICS, json.dumps(metrics, indent=2, default=str))
        self._write_text(SUCCESS, "")

    def read_lease(self) -> Optional[str]:
        try:
            return self._read_text(LEASE_FILE)
        except FileNotFoundError:
            return None

    def write_lease(self, text: str) -> None:
        self.fs.create_dir(self.path, recursive=True)
        self._write_text(LEASE_FILE, text)

    def delete_lease(self) -> None:
        try:
            self.fs.delete_file(self._file(LEASE_FILE))
        except FileNotFoundError:
            pass

    def _write_text(self, name: str, text: str) -> None:
        with self.fs.open_output_stream(self._file(name)) as f:
            f.write(text.encode())

    def _read_text(self, name: str) -> str:
        with self.fs.open_input_stream(self._file(name)) as f:
            return f.read().decode()

    def read_json(self, name: str):
        return json.loads(self._read_text(name))
