"""The reliability figures over a test run: kinds of bad input tried, faults injected, rows lost and rows
duplicated. The tests add to TALLY; conftest's terminal summary prints `figure_line()` at the end of the run.
"""

from __future__ import annotations

import collections
import os

import pyarrow.parquet as pq

TALLY = {"bad_input_kinds": set(), "faults": 0, "lost": 0, "duplicated": 0}


def account(out, input_ids, samples=1, filesystem=None):
    """Rows lost and duplicated in a finished output, compared id by id with the input (`out` in
    `filesystem`, if given: a bucket)."""
    if filesystem is None:
        assert os.path.exists(os.path.join(out, "_SUCCESS"))
    else:
        assert filesystem.get_file_info(f"{out}/_SUCCESS").is_file
    table = pq.read_table(out, filesystem=filesystem)
    key = ["id", "sample_index"] if samples > 1 else ["id"]
    got = collections.Counter(tuple(r.values()) for r in table.select(key).to_pylist())
    expected = collections.Counter((i, s) if samples > 1 else (i,) for i in input_ids for s in range(samples))
    lost, duplicated = sum((expected - got).values()), sum((got - expected).values())
    TALLY["lost"] += lost
    TALLY["duplicated"] += duplicated
    return lost, duplicated


def figure_line() -> str:
    return (f"reliability: {len(TALLY['bad_input_kinds'])} kinds of bad input tried, {TALLY['faults']} faults "
            f"injected, {TALLY['lost']} rows lost, {TALLY['duplicated']} rows duplicated")


def tallied() -> bool:
    """Whether any test of the run added to the figures."""
    return bool(TALLY["bad_input_kinds"] or TALLY["faults"] or TALLY["lost"] or TALLY["duplicated"])
