"""Planning over Requests, beside the pure planner: the micro-batches of a chunk's requests, the prompt
prefix a micro-batch shares, identical requests generated once, and the seed of each row.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import zlib
from typing import Optional, Sequence

from lmbatch.config import BatchingConfig
from lmbatch.engine.batching import padded_size, plan_micro_batches
from lmbatch.engine.types import Completion, Request


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
    """Tokens a micro-batch of these requests computes (`engine.batching.padded_size`): what the budget holds."""
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
