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

_LFS_POINTER = b"version https://git-lfs"  # how a Git LFS pointer file starts


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")  # what from_pretrained loads, under any file name


def tokenizer_source(path: str, revision: Optional[str], adapter: Optional[str]) -> tuple[str, Optional[str]]:
    """Where a job's tokenizer comes from, as (path, revision): the adapter's directory when it holds
    a tokenizer (a fine-tune that set a chat template or added tokens saves its own there, as TRL's
    trainers do), else the model's."""
    if adapter and os.path.isfile(os.path.join(adapter, "tokenizer_config.json")):
        return adapter, None
    return path, revision


def weight_files(root: Path) -> set[str]:
    """The weight files of a local model: those its shard indexes name, else the single file."""
    files = set()
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (root / index).exists():
            files |= set(json.loads((root / index).read_text()).get("weight_map", {}).values())
    return files | {name for name in ("model.safetensors", "pytorch_model.bin") if (root / name).exists()}


def parameter_count(directory: str) -> Optional[int]:
    """Parameters of a local model, from its safetensors headers (None: weights in another format)."""
    files = weight_files(Path(directory))
    if not files or not all(name.endswith(".safetensors") for name in files):
        return None
    total = 0
    for name in files:
        with open(Path(directory) / name, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))  # the format: header length, JSON header, data
            header = json.loads(f.read(size))
        total += sum(math.prod(t["shape"]) for key, t in header.items() if key != "__metadata__")
    return total


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
    """Raise ValueError, naming the file, when a local model's weights cannot be loaded: none at all
    (a download or copy that stopped before them), a Git LFS pointer where the weights should be (a
    clone without `git lfs pull`), a truncated safetensors file (an interrupted copy), a shard its
    index names but that is missing. Replicas would otherwise fail loading them only after Ray and
    the job had started. Reads only file headers."""
    from safetensors import safe_open

    root = Path(directory)
    if not root.is_dir():
        raise ValueError("is a file, not a model directory (config.json, tokenizer and weights)")
    if not any(p.suffix in WEIGHT_SUFFIXES for p in root.iterdir()):
        raise ValueError(f"holds no weights (no {', '.join('*' + s for s in WEIGHT_SUFFIXES)} file): an "
                         "incomplete download or copy?")
    for name in sorted(weight_files(root)):
        path = root / name
        if not path.exists():
            raise ValueError(f"{name} is missing (its shard index names it)")
        with open(path, "rb") as f:
            if f.read(len(_LFS_POINTER)) == _LFS_POINTER:
                raise ValueError(f"{name} is a Git LFS pointer, not the weights: run `git lfs pull` in {root}")
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(path), "numpy"):
                    pass
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
                raise ValueError(f"{name} is not a readable safetensors file ({e}): an interrupted copy?") from None


IDENTITY_SAMPLES, IDENTITY_SAMPLE_BYTES = 16, 64 * 1024


def model_identity(path: str, revision: Optional[str] = None) -> Optional[str]:
    """What the model at `path` is, to tell whether it changed between two runs of one job (a model
    directory updated in place, a symlink moved to a new model, a hub id with a new commit): a local
    directory by its content, a hub id by its commit in the local cache; None where neither is known.

    Content is every file's name and size, with 16 evenly spaced 64 KiB samples of it (all of a
    small file): at most 1 MiB read per file, even for weights of hundreds of GB, and any retrained
    or re-saved model differs in them. Copying the files, which changes their times, changes nothing.
    Hidden files are left out (`hf download --local-dir` keeps its download records in `.cache/`)."""
    local = Path(os.path.expanduser(resolve_model_path(path)))
    if not local.is_dir():
        commit = hub_commit(path, revision)
        return f"commit {commit}" if commit else None
    digest = hashlib.sha256()
    for file in sorted(p for p in local.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(local).parts)):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(local)}\0{size}\0".encode())
        with open(file, "rb") as f:
            if size <= IDENTITY_SAMPLES * IDENTITY_SAMPLE_BYTES:
                digest.update(f.read())
                continue
            for i in range(IDENTITY_SAMPLES):  # the first sample holds a safetensors file's header
                f.seek(i * (size - IDENTITY_SAMPLE_BYTES) // (IDENTITY_SAMPLES - 1))
                digest.update(f.read(IDENTITY_SAMPLE_BYTES))
    return f"content {digest.hexdigest()[:16]}"
