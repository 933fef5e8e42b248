"""Facts about a model's files: its weights (present, whole, not Git LFS pointers), its parameter count, its
identity on disk or on the hub (what a resumed job checks), an adapter's fit, where its tokenizer comes from.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Optional

from lmbatch.models.builtin import resolve_model_path
from lmbatch.models.remote import ModelFiles, is_remote

_LFS_POINTER = b"version https://git-lfs"  # how a Git LFS pointer file starts


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")  # what from_pretrained loads, under any file name


def tokenizer_source(path: str, revision: Optional[str], adapter: Optional[str]) -> tuple[str, Optional[str]]:
    """Where a job's tokenizer comes from, as (path, revision): the adapter's directory when it holds
    a tokenizer (a fine-tune that set a chat template or added tokens saves its own there, as TRL's
    trainers do), else the model's."""
    if adapter and os.path.isfile(os.path.join(adapter, "tokenizer_config.json")):
        return adapter, None
    return path, revision


def weight_files(files: ModelFiles) -> set[str]:
    """The weight files of a model: those its shard indexes name, else the single file."""
    found = set()
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index in files.files:
            found |= set(json.loads(files.read(index)).get("weight_map", {}).values())
    return found | {name for name in ("model.safetensors", "pytorch_model.bin") if name in files.files}


def safetensors_header(files: ModelFiles, name: str) -> dict:
    """The JSON header of a safetensors file, read alone (the format: its length, the header, the data);
    ValueError where the file is not whole: a header or data cut short."""
    size = files.size(name)
    if size < 8:
        raise ValueError(f"{size} bytes, less than a header")
    (length,) = struct.unpack("<Q", files.read(name, 0, 8))
    if length > size - 8:
        raise ValueError(f"its header of {length:,} bytes does not fit in its {size:,}")
    try:
        header = json.loads(files.read(name, 8, length))
    except ValueError as e:
        raise ValueError(f"its header is not JSON: {e}") from None
    end = max((t["data_offsets"][1] for key, t in header.items() if key != "__metadata__"), default=0)
    if 8 + length + end != size:
        raise ValueError(f"its tensors take {8 + length + end:,} bytes, the file has {size:,}")
    return header


def parameter_count(directory: str) -> Optional[int]:
    """Parameters of a model directory (local or in a bucket), from its safetensors headers (None:
    weights in another format)."""
    files = ModelFiles(directory)
    names = weight_files(files)
    if not names or not all(name.endswith(".safetensors") for name in names):
        return None
    return sum(math.prod(t["shape"]) for name in names
               for key, t in safetensors_header(files, name).items() if key != "__metadata__")


def hub_commit(path: str, revision: Optional[str] = None) -> Optional[str]:
    """The commit of a hub model's files in the local cache (of `revision`, else of `main`); None
    where the cache does not hold them (a local directory, a model not fetched yet)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, "config.json", revision=revision)  # cached by the plan's check
    return Path(cached).parent.name if isinstance(cached, str) else None


def adapter_misfit(model_config, adapter: str, trust_remote_code: bool = False) -> Optional[str]:
    """How the PEFT adapter in `adapter` fails to fit the model of `model_config`, or None: layers it
    targets that the model lacks, or tensors of other shapes than the model's layers give them.
    Checked on an empty (meta-device) copy of the model and the adapter file's header: no weights read."""
    import warnings

    from accelerate import init_empty_weights
    from peft import PeftConfig, get_peft_model, get_peft_model_state_dict
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():  # peft warns that the copy is not the base model its config names
        warnings.simplefilter("ignore")
        with init_empty_weights():
            empty = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
        try:
            expected = get_peft_model_state_dict(get_peft_model(empty, PeftConfig.from_pretrained(adapter)))
        except ValueError as e:  # peft's NoMatchingPeftModuleError: no layer of the model is a target
            return str(e).splitlines()[0]
    weights = Path(adapter, "adapter_model.safetensors")
    if not weights.exists():  # an older adapter_model.bin: no header to read without loading it
        return None
    with safe_open(str(weights), "pt") as f:
        found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    other = [name for name, shape in found.items() if name in expected and tuple(expected[name].shape) != shape]
    if not other:
        return None
    name = other[0]
    return (f"{len(other)} of its {len(found)} tensors have other shapes than the model's layers give them "
            f"({name}: {list(found[name])} in the adapter, {list(expected[name].shape)} for the model)")


def check_weights(directory: str) -> None:
    """Raise ValueError, naming the file, when a model's weights (local, or in a bucket) cannot be
    loaded: none at all (a download or copy that stopped before them), a Git LFS pointer where the
    weights should be (a clone without `git lfs pull`), a truncated safetensors file (an interrupted
    copy), a shard its index names but that is missing. Replicas would otherwise fail loading them only
    after Ray and the job had started. Reads only file headers."""
    if not is_remote(directory) and not os.path.isdir(os.path.expanduser(directory)):
        raise ValueError("is a file, not a model directory (config.json, tokenizer and weights)")
    files = ModelFiles(directory)
    if not any("/" not in name and name.endswith(WEIGHT_SUFFIXES) for name in files.files):
        raise ValueError(f"holds no weights (no {', '.join('*' + s for s in WEIGHT_SUFFIXES)} file): an "
                         "incomplete download or copy?")
    for name in sorted(weight_files(files)):
        if name not in files.files:
            raise ValueError(f"{name} is missing (its shard index names it)")
        if files.read(name, 0, min(len(_LFS_POINTER), files.size(name))) == _LFS_POINTER:
            raise ValueError(f"{name} is a Git LFS pointer, not the weights: run `git lfs pull` in {directory}")
        if name.endswith(".safetensors"):
            try:
                safetensors_header(files, name)
            except ValueError as e:
                raise ValueError(f"{name} is not a readable safetensors file ({e}): an interrupted copy?") from None


IDENTITY_SAMPLES, IDENTITY_SAMPLE_BYTES = 16, 64 * 1024


def model_identity(path: str, revision: Optional[str] = None) -> Optional[str]:
    """What the model at `path` is, to tell whether it changed between two runs of one job (a model
    directory updated in place, a symlink moved to a new model, a hub id with a new commit): a local
    directory (or one in a bucket) by its content, a hub id by its commit in the local cache; None where
    neither is known.

    Content is every file's name and size, with 16 evenly spaced 64 KiB samples of it (all of a
    small file): at most 1 MiB read per file, even for weights of hundreds of GB, and any retrained
    or re-saved model differs in them. Copying the files, which changes their times, changes nothing.
    Hidden files are left out (`hf download --local-dir` keeps its download records in `.cache/`)."""
    local = path if is_remote(path) else os.path.expanduser(resolve_model_path(path))
    if not is_remote(path) and not os.path.isdir(local):
        commit = hub_commit(path, revision)
        return f"commit {commit}" if commit else None
    files = ModelFiles(local)
    digest = hashlib.sha256()
    for name in sorted(files.files):
        size = files.size(name)
        digest.update(f"{name}\0{size}\0".encode())
        if size <= IDENTITY_SAMPLES * IDENTITY_SAMPLE_BYTES:
            digest.update(files.read(name))
            continue
        for i in range(IDENTITY_SAMPLES):  # the first sample holds a safetensors file's header
            digest.update(files.read(name, i * (size - IDENTITY_SAMPLE_BYTES) // (IDENTITY_SAMPLES - 1),
                                     IDENTITY_SAMPLE_BYTES))
    return f"content {digest.hexdigest()[:16]}"
