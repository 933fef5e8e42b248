"""The job's tokenizer: loaded once per worker, and called through its Rust backend where it has one.

Prepare workers, the planner and the replicas share these, so a prompt is tokenized the same way
wherever it is read.
"""

from __future__ import annotations

import functools
import importlib
from typing import Optional


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str, trust_remote_code: bool = False, class_path: Optional[str] = None,
                   revision: Optional[str] = None):
    """One tokenizer per worker process: Ray reuses workers, so this loads once, not per chunk.

    class_path ("module:Class", from `direct_class_path`) loads that class itself instead of
    going through AutoTokenizer, whose module imports torch (through transformers'
    configuration_utils): about 4 s of CPU in every prepare worker, which needs no torch.
    """
    from lmbatch.models import resolve_model_path

    local = resolve_model_path(path)
    if class_path:
        module, name = class_path.split(":")
        tokenizer = getattr(importlib.import_module(module), name).from_pretrained(local, revision=revision)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=trust_remote_code, revision=revision)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # as transformers' own call would set it up for `encode`
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    return tokenizer


def direct_class_path(tokenizer, path: str, revision: Optional[str] = None) -> Optional[str]:
    """The `class_path` that loads `tokenizer` (loaded through AutoTokenizer) without AutoTokenizer,
    or None where that is remote code or loads a tokenizer that differs in what prepare uses."""
    cls = type(tokenizer)
    if not cls.__module__.startswith("transformers."):  # remote code lives in transformers_modules
        return None
    class_path = f"{cls.__module__}:{cls.__qualname__}"

    def pipeline(t):
        backend = getattr(t, "backend_tokenizer", None)
        return backend.to_str() if backend is not None else None

    probe = ["Hello, world!  <s> </s> <|im_end|> 12345 ünïcödé 🚀\n\tend", ""]
    try:
        direct = load_tokenizer.__wrapped__(path, class_path=class_path, revision=revision)
        same = (type(direct) is cls and pipeline(direct) == pipeline(tokenizer)
                and direct.all_special_ids == tokenizer.all_special_ids
                and direct.chat_template == tokenizer.chat_template
                and all(encode(direct, probe, s) == encode(tokenizer, probe, s) for s in (True, False)))
    except Exception:  # noqa: BLE001 - whatever fails here keeps the AutoTokenizer path
        return None
    return class_path if same else None


def encode(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """Token ids per text: the same as `tokenizer(texts)["input_ids"]`.

    A fast tokenizer is called through its Rust backend directly: transformers' per-row
    conversion into a BatchEncoding costs as much as the tokenizing itself, and every
    prompt of the job passes through here.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=add_special_tokens)]


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], special: frozenset) -> list[tuple[list[int], int]]:
    """Token ids per pair of texts as the tokenizer joins them (`tokenizer(firsts, seconds)["input_ids"]`), each
    with where its second text begins. A fast tokenizer says which text each token comes from, so a separator
    typed into the first text ("a [SEP] b", read as the token) stays in it; without one (or where the second
    text has no tokens), the second text is taken to begin after the special tokens that follow the first."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        firsts, seconds = (list(t) for t in zip(*pairs))
        return [(ids, second_text_start(ids, special)) for ids in tokenizer(firsts, seconds)["input_ids"]]
    encoded = []
    for e in backend.encode_batch(pairs, add_special_tokens=True):
        second = [n for n, text in enumerate(e.sequence_ids) if text == 1]
        encoded.append((e.ids, second[0] if second else second_text_start(e.ids, special)))
    return encoded


def second_text_start(ids: list[int], special: frozenset) -> int:
    """Where the second text of a pair begins in its ids, read from the ids alone: after the special tokens
    that follow the first text ([SEP] in BERT's `[CLS] a [SEP] b [SEP]`, `</s></s>` in RoBERTa's)."""
    first = next((n for n, t in enumerate(ids) if t not in special), len(ids))
    separator = next((n for n in range(first, len(ids)) if ids[n] in special), len(ids))
    return next((n for n in range(separator, len(ids)) if ids[n] not in special), len(ids))


def special_ids(tokenizer) -> frozenset:
    """The ids of the tokenizer's special tokens: BOS and the like, and the special tokens added for chat
    templates (<|im_start|>, <|user|>)."""
    added = tokenizer.added_tokens_decoder
    return frozenset(tokenizer.all_special_ids) | {i for i, token in added.items() if token.special}
