"""The pure planner: every row exactly once, budget and caps respected, ordering by length."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from lmbatch.config import BatchingConfig
from lmbatch.engine.batching import decode_steps, padded_size, padding_efficiency, plan_micro_batches
from lmbatch.engine.requests import identical_requests, plan_requests, prefix_groups, shared_prefix, with_repeats
from lmbatch.engine.types import Completion, Request, SamplingParams


def test_bucketed_orders_by_length_and_respects_budget():
    lengths = [50, 3, 20, 4, 49, 21]
    batches = plan_micro_batches(lengths, [10] * 6, max_batch_tokens=100, max_batch_rows=8)
    # lengths 3, 4, 20 fit: 3 x (20 + 10) = 90; adding 21 would be 4 x 31 = 124 > 100; 21 + 49 -> 118
    assert batches == [[1, 3, 2], [5], [4], [0]]
    assert plan_micro_batches(lengths, [10] * 6, max_batch_tokens=10**6, max_batch_rows=2) == [[1, 3], [2, 5], [4, 0]]


def test_fixed_keeps_input_order():
    assert plan_micro_batches([5, 1, 9, 2, 7], [4] * 5, strategy="fixed", fixed_batch_size=2) == [[0, 1], [2, 3], [4]]


def test_oversized_row_gets_its_own_batch():
    assert plan_micro_batches([10, 5000, 12], [8] * 3, max_batch_tokens=100) == [[0, 2], [1]]


def test_groups_never_share_a_batch():
    batches = plan_micro_batches([5, 5, 5, 5], [4] * 4, group_keys=["a", "b", "a", "b"])
    assert sorted(map(sorted, batches)) == [[0, 2], [1, 3]]
    fixed = plan_micro_batches([5] * 4, [4] * 4, strategy="fixed", fixed_batch_size=4, group_keys=["a", "a", "b", "a"])
    assert fixed == [[0, 1], [2], [3]]


def test_a_row_sampled_n_times_counts_as_n_sequences():
    """num_return_sequences=4: each row is 4 sequences in its batch, in the row cap and the budget."""
    lengths, new = [20] * 8, [10] * 8
    assert plan_micro_batches(lengths, new, max_batch_rows=16) == [list(range(8))]
    assert plan_micro_batches(lengths, new, max_batch_rows=16, sequences=[4] * 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # 2 rows x 4 sequences x (20 + 10) tokens = 240
    assert plan_micro_batches(lengths, new, max_batch_tokens=240, sequences=[4] * 8) == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_min_padding_efficiency_closes_batches():
    lengths = [10, 11, 40, 41]
    assert plan_micro_batches(lengths, [1] * 4, min_padding_efficiency=0.9) == [[0, 1], [2, 3]]
    assert plan_micro_batches(lengths, [1] * 4, min_padding_efficiency=0.0) == [[0, 1, 2, 3]]


def test_rows_that_finish_together_run_together():
    # Same prompt length band; max_new_tokens 4 and 60 alternate: sorted by budget, cut where slots would idle.
    batches = plan_micro_batches([20] * 6, [4, 60, 4, 60, 4, 60], min_padding_efficiency=0.8, min_decode_efficiency=0.8)
    assert batches == [[0, 2, 4], [1, 3, 5]]
    assert decode_steps(batches, [4, 60, 4, 60, 4, 60]) == 4 + 60  # mixed, both batches would run 60


def test_padding_efficiency():
    assert padding_efficiency([[0, 1]], [2, 4]) == 6 / 8
    assert padding_efficiency([], []) == 1.0


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(st.tuples(st.integers(1, 600), st.integers(1, 64), st.sampled_from("abc")), max_size=120),
    budget=st.integers(1, 20000),
    max_rows=st.integers(1, 70),
    strategy=st.sampled_from(["bucketed", "fixed"]),
    fixed=st.integers(1, 40),
    min_eff=st.floats(0, 1),
    min_decode=st.floats(0, 1),
)
def test_plan_properties(rows, budget, max_rows, strategy, fixed, min_eff, min_decode):
    lengths, new, keys = ([r[i] for r in rows] for i in range(3))
    sequences = [{"a": 1, "b": 3, "c": 1}[k] for k in keys]  # samples per row, one setting per group
    batches = plan_micro_batches(lengths, new, strategy=strategy, max_batch_tokens=budget, max_batch_rows=max_rows,
                                 fixed_batch_size=fixed, min_padding_efficiency=min_eff,
                                 min_decode_efficiency=min_decode, group_keys=keys, sequences=sequences)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(rows)))  # every row exactly once
    for b in batches:
        assert b and len({keys[i] for i in b}) == 1
        if strategy == "fixed":
            assert len(b) <= fixed and b == sorted(b)
        elif len(b) > 1:  # a lone oversized row is allowed; a shared batch must fit
            seqs = sum(sequences[i] for i in b)
            assert seqs <= max_rows
            assert padded_size(seqs, max(lengths[i] for i in b), max(new[i] for i in b)) <= budget
            assert sum(lengths[i] for i in b) >= min_eff * len(b) * max(lengths[i] for i in b) - 1e-9
            assert sum(new[i] for i in b) >= min_decode * len(b) * max(new[i] for i in b) - 1e-9


def test_prompts_of_one_beginning_are_bucketed_apart_when_they_fill_a_micro_batch():
    """batching.share_prefix: rows of two templates, of lengths that interleave, each get micro-batches of
    their own, so every micro-batch shares its template's instructions; a template with too few rows to
    fill a micro-batch, or whose instructions are little of its prompts, or that generates nothing (its prompts
    only embedded or scored: no generation shares them), stays with the rest. Without sharing
    or grouping, length alone orders the rows."""
    rng = random.Random(0)
    templates = [list(range(100 * t, 100 * t + 20)) for t in (1, 2, 3)]  # 20-token instructions each
    texts = [[rng.randrange(1000) for _ in range(rng.randint(1, 60))] for _ in range(40)]
    requests = [Request(i, templates[2 if i >= 36 else i % 2] + text, rng.randint(4, 8))
                for i, text in enumerate(texts)]
    groups = prefix_groups(requests, 8)
    assert groups[:36] == [tuple(templates[i % 2][:16]) for i in range(36)] and groups[36:] == [None] * 4
    assert prefix_groups([Request(0, templates[0][:16], 4)] * 9, 8) == [None] * 9  # nothing of its own after it
    long_texts = [Request(i, templates[0] + [i] * 61, 4) for i in range(9)]  # 20 of 81 tokens in common: < 1/4
    assert prefix_groups(long_texts, 8) == [None] * 9
    assert prefix_groups([Request(i, templates[0] + [i] * 59, 4) for i in range(9)], 8)[0]  # 20 of 79: > 1/4
    assert prefix_groups([Request(i, templates[0] + [i] * 59, 0) for i in range(9)], 8) == [None] * 9  # embedded

    def shared(**sharing):
        batching = BatchingConfig(max_batch_rows=8, **sharing)
        return [shared_prefix([requests[i] for i in b]) for b in plan_requests(batching, requests) if len(b) > 1]

    assert min(shared()) >= 16
    assert min(shared(group_prefixes=False)) == min(shared(share_prefix=False)) == 0


def test_a_greedy_row_equal_to_an_earlier_one_is_generated_once():
    greedy, sampled = SamplingParams(), SamplingParams(do_sample=True)
    requests = [Request(0, [5, 6], 8), Request(1, [5, 6], 8), Request(2, [5, 6], 9),  # more new tokens
                Request(3, [5, 6], 8, SamplingParams(stop=("x",))), Request(4, [5, 6, 7], 8),
                Request(5, [5, 6], 8, sampled, seed=1), Request(6, [5, 6], 8, sampled, seed=1),  # own samples
                Request(7, [5, 6], 8, greedy), Request(8, [5, 6], 8, choices=(("a", (9,)),))]  # constrained
    unique, repeats = identical_requests(requests)
    assert [r.key for r in unique] == [0, 2, 3, 4, 5, 6, 8] and repeats == {0: [1, 7]}
    done = [Completion(r.key, 0, f"text {r.key}", 3, "stop") for r in unique]
    copies = with_repeats(done, repeats)
    assert sorted((c.key, c.text) for c in copies) == sorted([(r.key, f"text {r.key}") for r in unique]
                                                            + [(1, "text 0"), (7, "text 0")])
