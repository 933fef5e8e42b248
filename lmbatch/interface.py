"""What a replica hands an engine and gets back; free of torch, so the echo path never imports it."""

from __future__ import annotations

import collections
import dataclasses
import os
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

import pyarrow as pa

from lmbatch.batching import padded_size, plan_micro_batches

if TYPE_CHECKING:
    from lmbatch.config import BatchingConfig


@dataclass(frozen=True)
class Pooling:
    """How a prompt's last hidden states become its embedding (generation.embedding and the keys after it)."""

    kind: str
    """`last`: the last token's hidden state; `mean`: the mean over the prompt's tokens; `cls`: the first token's."""
    dimensions: Optional[int] = None
    """Keep the first N dimensions (before normalizing); None: all."""
    normalize: bool = True
    """Scale to length 1."""


@dataclass(frozen=True)
class SamplingParams:
    """Everything that must be equal for rows to share one `generate` call."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    num_return_sequences: int = 1
    logprobs: bool = False
    """Record each row's log-probability (generation.logprobs); the same for every row of a job."""
    top_logprobs: int = 0
    """Record each token's and its step's likeliest tokens' log-probabilities (generation.top_logprobs)."""
    prompt_logprobs: bool = False
    """Record each prompt's log-probability (generation.prompt_logprobs); the same for every row of a job."""
    adapter: Optional[str] = None
    """The adapter of model.adapters that generates the row (generation.adapter); None: the model alone."""
    embedding: Optional[Pooling] = None
    """Record each prompt's embedding, pooled so (generation.embedding); the same for every row of a job."""
    classify: bool = False
    """Record each prompt's label and label scores (generation.classify); the same for every row of a job."""


@dataclass
class Request:
    key: int
    """Caller's handle for the row (its position in the chunk)."""
    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    """Sampling seed of this row (derived from the job seed and the row's id)."""
    choices: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """(text, token ids) of each text the row must answer with (generation.choices); () for free text."""
    pattern: Optional[str] = None
    """The regular expression the row's text must match whole (generation.json_schema or regex), or None."""
    second_text_start: Optional[int] = None
    """Where a pair's second text begins in prompt_ids (input.pair_column): an encoder that reads token types
    reads it and what follows as type 1. None: one text."""


@dataclass
class Completion:
    key: int
    sample_index: int
    text: Optional[str]
    num_generated_tokens: int
    finish_reason: str  # stop | length | error
    error: Optional[str] = None
    logprob: Optional[float] = None
    """With generation.logprobs: the model's log-probability of the text's tokens given the prompt."""
    choice_logprobs: Optional[list[float]] = None
    """With generation.logprobs, for a row with choices: each choice's log-probability given the prompt."""
    prompt_logprob: Optional[float] = None
    """With generation.prompt_logprobs: the model's log-probability of the prompt, each token given those before."""
    token_logprobs: Optional[pa.StructArray] = None
    """With generation.top_logprobs: a TOKEN_LOGPROB per counted token (Arrow, not a dict per token: a
    chunk of long texts holds millions of them)."""
    embedding: Optional[pa.Array] = None
    """With generation.embedding: the prompt's embedding (float32 values)."""
    label: Optional[str] = None
    """With generation.classify: the name of the prompt's likeliest label."""
    label_scores: Optional[pa.Array] = None
    """With generation.classify: every label's score (float32 values, in the model's label order)."""


_TOKEN = [("token_id", pa.int64()), ("token", pa.string()), ("logprob", pa.float64())]
TOP_LOGPROB = pa.struct(_TOKEN)
"""One of the likeliest tokens at a step (generation.top_logprobs): its id, its text alone, its log-probability."""
TOKEN_LOGPROB = pa.struct([*_TOKEN, ("top_logprobs", pa.list_(TOP_LOGPROB))])
"""A generated token as TOP_LOGPROB, with the likeliest tokens at its step, likeliest first."""


def list_column(rows: Sequence[Optional[pa.Array]], value_type: pa.DataType) -> pa.ListArray:
    """One list per row from each row's array of values (None: a null list), without a Python object per value."""
    offsets = [0]
    for r in rows:
        offsets.append(offsets[-1] + (len(r) if r is not None else 0))
    present = [r for r in rows if r is not None]
    values = pa.concat_arrays(present) if present else pa.array([], value_type)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, type=pa.list_(value_type),
                                    mask=pa.array([r is None for r in rows], pa.bool_()))


@dataclass
class EngineStats:
    """Counters for the efficiency figures of the benchmark and the run summary."""

    micro_batches: int = 0
    prompt_tokens: int = 0
    padded_prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_slots: int = 0
    """rows x decode steps computed; generated_tokens / decode_slots is the decode slot efficiency."""
    decode_steps: int = 0
    """Forward passes of decoding; decode_slots / decode_steps is the average batch per step."""
    split_retries: int = 0
    shared_prefix_tokens: int = 0
    """Prompt tokens not computed again: a shared prefix's, for every sequence of its micro-batch but one."""


def plan_requests(batching: BatchingConfig, requests: Sequence[Request]) -> list[list[int]]:
    """The planner's micro-batches (indices into `requests`): rows with other sampling settings never
    share one, a row sampled num_return_sequences times is that many sequences, and with
    batching.share_prefix and group_prefixes the prompts of one beginning are bucketed apart (`prefix_groups`)."""
    keys: list = [r.params for r in requests]
    if batching.share_prefix and batching.group_prefixes and batching.strategy == "bucketed":
        keys = list(zip(keys, prefix_groups(requests, batching.max_batch_rows)))
    return plan_micro_batches([len(r.prompt_ids) for r in requests], [r.max_new_tokens for r in requests],
                              group_keys=keys, sequences=[r.params.num_return_sequences for r in requests],
                              **batching.planner_settings)


SHARED_PREFIX_MIN_TOKENS = 16
"""The fewest tokens all prompts of a micro-batch must begin with to be computed once for all of them:
below it the saving is too small to be worth a forward pass of its own."""


PREFIX_GROUP_MIN_SHARE = 0.25
"""The least share of a group's prompt tokens that its prompts must all begin with for the group to be
bucketed apart: below it, sharing saves too little prefill for the decode steps that its micro-batches
of its own add (what a GPU's time goes by)."""


def prefix_groups(requests: Sequence[Request], min_sequences: int) -> list[Optional[tuple[int, ...]]]:
    """Each request's group of prompts that begin alike, to be bucketed apart so that a job mixing
    templates (or system prompts) gets micro-batches that share their beginning (`shared_prefix`),
    where ordering by length alone would mix the templates and share nothing: the prompt's first
    SHARED_PREFIX_MIN_TOKENS tokens, where at least `min_sequences` sequences' prompts begin with
    them (enough to fill a micro-batch of their own) and all of them begin with at least
    PREFIX_GROUP_MIN_SHARE of their tokens in common; else None (planned together, as before). Rows
    that generate nothing (prompts only scored or embedded) share nothing, and are not grouped."""
    beginnings = [tuple(r.prompt_ids[:SHARED_PREFIX_MIN_TOKENS])
                  if len(r.prompt_ids) > SHARED_PREFIX_MIN_TOKENS and r.max_new_tokens else None for r in requests]
    members = collections.defaultdict(list)
    for beginning, r in zip(beginnings, requests):
        members[beginning].append(r)

    def apart(group: list[Request]) -> bool:
        common = len(os.path.commonprefix([r.prompt_ids for r in group]))
        return (sum(r.params.num_return_sequences for r in group) >= min_sequences
                and common * len(group) >= PREFIX_GROUP_MIN_SHARE * sum(len(r.prompt_ids) for r in group))

    kept = {b for b, group in members.items() if b is not None and apart(group)}
    return [b if b in kept else None for b in beginnings]


def padded_tokens(batch: Sequence[Request]) -> int:
    """Tokens a micro-batch of these requests computes (`batching.padded_size`): what the budget holds."""
    return padded_size(sum(r.params.num_return_sequences for r in batch), max(len(r.prompt_ids) for r in batch),
                       max(r.max_new_tokens for r in batch))


def shared_prefix(batch: Sequence[Request]) -> int:
    """How many tokens all the micro-batch's prompts begin with (a template's instructions, a system
    prompt, few-shot examples), to compute once for all its sequences (batching.share_prefix): 0 for
    fewer than SHARED_PREFIX_MIN_TOKENS, a single sequence, or nothing to generate. Each prompt keeps
    a token of its own, from which its first token is generated."""
    if sum(r.params.num_return_sequences for r in batch) < 2 or not max(r.max_new_tokens for r in batch):
        return 0
    common = os.path.commonprefix([r.prompt_ids for r in batch])
    shared = min(len(common), min(len(r.prompt_ids) for r in batch) - 1)
    return shared if shared >= SHARED_PREFIX_MIN_TOKENS else 0


def choose_kv_cache(requested: Optional[str], device: str) -> str:
    """The configured KV cache; unset: `static` on a GPU, `dynamic` on CPU.

    On a GPU a step of a small model is bound by kernel launches and allocations, and a dynamic
    cache reallocates every layer's keys and values at every step: measured on an H200
    (Qwen2.5-0.5B shape, bf16), 57 vs 18 ms per step at 512 rows, 176 vs 127 ms at 1,024 rows of
    1,024 tokens. On CPU static was no faster (tiny model: 2.2 vs 1.9 ms per step)."""
    if requested:
        return requested
    return "static" if device.startswith("cuda") else "dynamic"


def identical_requests(requests: Sequence[Request]) -> tuple[list[Request], dict[int, list[int]]]:
    """Greedy requests equal to an earlier one (prompt tokens, max_new_tokens, settings) are generated
    once: greedy decoding gives them the same completion. Returns the requests to generate and, by the
    key of each that has them, the keys of its repeats. Sampled rows each draw their own samples."""
    first: dict[tuple, int] = {}
    unique: list[Request] = []
    repeats: dict[int, list[int]] = {}
    for r in requests:
        same = None if r.params.do_sample else (tuple(r.prompt_ids), r.max_new_tokens, r.params, r.choices, r.pattern)
        if same in first:
            repeats.setdefault(first[same], []).append(r.key)
            continue
        if same is not None:
            first[same] = r.key
        unique.append(r)
    return unique, repeats


def with_repeats(completions: Sequence[Completion], repeats: dict[int, list[int]]) -> list[Completion]:
    """The completions, and a copy of each for every repeat of its request (`identical_requests`)."""
    return [*completions, *(dataclasses.replace(c, key=k) for c in completions for k in repeats.get(c.key, ()))]


def row_seed(seed: int, *parts: object) -> int:
    """A stable seed per row: reruns of the same job draw the same samples."""
    return zlib.crc32(":".join(map(str, (seed, *parts))).encode())
