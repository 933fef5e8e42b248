"""The micro-batch planner: pure Python, no Ray, no torch.

Given the prompt length and output budget of each row in a window, decide which rows run
together. `bucketed` orders the window by prompt length band (lengths within a factor of
1 / min_padding_efficiency share a band), then by max_new_tokens, so that rows padded to a common
length are nearly equal and rows that finish together run together; then it cuts micro-batches
whose padded size stays under a token budget and whose prefill padding and decode slots stay
efficient. `fixed` is the naive baseline:
input order, a fixed number of rows per batch.

Rows with different group keys (e.g. different sampling parameters) never share a batch. A row
sampled several times (num_return_sequences) is that many sequences in its batch, and the bucketed
budget and row cap count sequences, which are what a batch computes and holds in memory.
"""

from __future__ import annotations

import math
from typing import Hashable, Optional, Sequence


def padded_size(sequences: int, longest_prompt: int, max_new_tokens: int) -> int:
    """Tokens a micro-batch computes: every sequence is padded to the longest prompt plus the longest output."""
    return sequences * (longest_prompt + max_new_tokens)


def plan_micro_batches(
    prompt_lengths: Sequence[int],
    max_new_tokens: Sequence[int],
    *,
    strategy: str = "bucketed",
    max_batch_tokens: int = 16384,
    max_batch_rows: int = 64,
    fixed_batch_size: int = 16,
    min_padding_efficiency: float = 0.0,
    min_decode_efficiency: float = 0.0,
    group_keys: Optional[Sequence[Hashable]] = None,
    sequences: Optional[Sequence[int]] = None,
) -> list[list[int]]:
    """Return micro-batches as lists of row indices; every index appears exactly once.

    A single row larger than the budget still gets a batch of its own: the budget shapes
    batches, it never drops rows. A bucketed batch also closes before real prompt tokens / padded
    prompt tokens would fall below min_padding_efficiency, or before the rows' max_new_tokens /
    (rows x the largest max_new_tokens), the share of decode slots that can do useful work,
    would fall below min_decode_efficiency. `sequences` are the sequences each row generates (1 each
    by default); bucketed budget and row cap count them.
    """
    n = len(prompt_lengths)
    if any(x is not None and len(x) != n for x in (max_new_tokens, group_keys, sequences)):
        raise ValueError("prompt_lengths, max_new_tokens, group_keys and sequences must have the same length")
    keys = group_keys if group_keys is not None else [0] * n
    if strategy == "fixed":
        return _fixed(n, keys, fixed_batch_size)
    if strategy == "bucketed":
        return _bucketed(prompt_lengths, max_new_tokens, keys, sequences or [1] * n, max_batch_tokens, max_batch_rows,
                         min_padding_efficiency, min_decode_efficiency)
    raise ValueError(f"unknown batching strategy {strategy!r}")


def _fixed(n: int, keys: Sequence[Hashable], size: int) -> list[list[int]]:
    batches: list[list[int]] = []
    for i in range(n):
        if batches and len(batches[-1]) < size and keys[batches[-1][0]] == keys[i]:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _bucketed(
    lengths: Sequence[int],
    new_tokens: Sequence[int],
    keys: Sequence[Hashable],
    sequences: Sequence[int],
    budget: int,
    max_rows: int,
    min_padding: float,
    min_decode: float,
) -> list[list[int]]:
    # Group keys are arbitrary hashables: order groups by first appearance, not by value.
    group_rank: dict[Hashable, int] = {}
    for k in keys:
        group_rank.setdefault(k, len(group_rank))
    band = math.log(1 / min_padding) if 0 < min_padding < 1 else None

    def order_key(i: int):
        length_band = int(math.log(max(lengths[i], 1)) / band) if band else 0
        return group_rank[keys[i]], length_band, new_tokens[i], lengths[i], i

    batches: list[list[int]] = []
    longest = most_new = real = useful = seqs = 0
    for i in sorted(range(len(lengths)), key=order_key):
        if batches:
            current = batches[-1]
            rows, new_longest, new_most = len(current) + 1, max(longest, lengths[i]), max(most_new, new_tokens[i])
            fits = (
                keys[current[0]] == keys[i]
                and seqs + sequences[i] <= max_rows
                and padded_size(seqs + sequences[i], new_longest, new_most) <= budget
                and real + lengths[i] >= min_padding * rows * new_longest
                and useful + new_tokens[i] >= min_decode * rows * new_most
            )
            if fits:
                current.append(i)
                longest, most_new = new_longest, new_most
                real, useful, seqs = real + lengths[i], useful + new_tokens[i], seqs + sequences[i]
                continue
        batches.append([i])
        longest, most_new, real, useful, seqs = lengths[i], new_tokens[i], lengths[i], new_tokens[i], sequences[i]
    return batches


def padding_efficiency(batches: Sequence[Sequence[int]], prompt_lengths: Sequence[int]) -> float:
    """Real prompt tokens / padded prompt tokens computed for the plan (1.0 means no padding)."""
    real = sum(prompt_lengths[i] for b in batches for i in b)
    padded = sum(len(b) * max(prompt_lengths[i] for i in b) for b in batches if b)
    return real / padded if padded else 1.0


def decode_steps(batches: Sequence[Sequence[int]], max_new_tokens: Sequence[int]) -> int:
    """Decode steps the plan runs when no row stops early: each micro-batch runs to its largest
    max_new_tokens. On a GPU a step costs about as much for one row as for hundreds, so this,
    not the token count, is what a plan costs there."""
    return sum(max(max_new_tokens[i] for i in b) for b in batches if b)
