"""Models in a bucket: `model.path=s3://bucket/models/my-model/` (or any URI the input and output take).

The plan reads such a model where it is: its small files (config, tokenizer, generation config) are
copied into a local cache for transformers to read, and its weights are checked by their headers and
identified by samples, in the bucket (`ModelFiles`), so the driver never copies the weights. Each node
copies the whole directory once, into the same cache, as its first replica starts; the other
replicas of the node wait for that copy and share it. A copy is made under a scratch name and renamed
when whole, so a half-copied model is never loaded; it is named by the objects' names, sizes and
times, so a model changed in the bucket is copied again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

from lmbatch.storage import cache_dir, in_threads, resolve_filesystem

WEIGHT_LIKE = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
"""Files the plan does not copy from a bucket: weights, in any framework's format."""

COPY_CHUNK = 8 * 2**20


def is_remote(path: str) -> bool:
    """Whether model.path names a model in a bucket (not a local directory, a hub id or a built-in)."""
    return "://" in path and not path.startswith("builtin://")


class ModelFiles:
    """The files of a model directory, local or in a bucket: their names (hidden ones left out:
    `hf download --local-dir` keeps its records in `.cache/`), sizes and bytes."""

    def __init__(self, path: str):
        if is_remote(path):
            self.fs, root = resolve_filesystem(path)
        else:
            self.fs, root = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
        self.root = root.rstrip("/")
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True, allow_not_found=True))
        named = ((i.path[len(self.root) + 1:], i) for i in infos if i.is_file)
        self.files = {name: i for name, i in named if not any(p.startswith(".") for p in name.split("/"))}

    def size(self, name: str) -> int:
        return self.files[name].size

    def read(self, name: str, offset: int = 0, nbytes: int | None = None) -> bytes:
        with self.fs.open_input_file(f"{self.root}/{name}") as f:
            return f.read_at(self.size(name) - offset if nbytes is None else nbytes, offset)

    def signature(self) -> str:
        """Names, sizes and modification times of every file: what a copy is named by."""
        stamps = sorted((name, i.size, i.mtime_ns) for name, i in self.files.items())
        return hashlib.sha256(repr(stamps).encode()).hexdigest()[:16]


def local_copy(uri: str, weights: bool = True) -> str:
    """A local directory holding the model at `uri` (without its weights unless `weights`), copied
    into the cache unless a whole copy of these very files is there already."""
    files = ModelFiles(uri)
    if not files.files:
        raise FileNotFoundError(f"{uri} holds no files")
    name = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:12]
    target = cache_dir() / "models" / "remote" / f"{name}-{files.signature()}{'' if weights else '-config'}"
    if (target / ".complete").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.with_name(target.name + ".lock")):  # the node's other replicas wait, then share it
        if not (target / ".complete").exists():
            _copy(files, target, [n for n in files.files if weights or not n.lower().endswith(WEIGHT_LIKE)])
    return str(target)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _copy(files: ModelFiles, target: Path, names: list[str]) -> None:
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        def copy(name: str) -> None:
            (scratch / name).parent.mkdir(parents=True, exist_ok=True)
            # each read is retried on its own (lmbatch.retrying): a dropped connection reads on from there
            with files.fs.open_input_stream(f"{files.root}/{name}") as source, open(scratch / name, "wb") as out:
                shutil.copyfileobj(source, out, COPY_CHUNK)
        list(in_threads(copy, names))
        (scratch / ".complete").write_text("")  # marks a whole copy (a copy left by an older lmbatch lacks it)
        shutil.rmtree(target, ignore_errors=True)
        os.rename(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
