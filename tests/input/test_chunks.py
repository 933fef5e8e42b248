"""Cutting the input into chunks: their size, a limit, small files packed and large ones split, and a
file rewritten while the job runs refused, not mixed in.
"""


import dataclasses

import pyarrow as pa
import pytest

from helpers.data import write_prompts
from lmbatch.errors import JobError
from lmbatch.input.chunks import Chunk, choose_chunk_rows, plan_chunks, read_chunk
from lmbatch.input.files import InputFile, InputPlan, inspect_inputs


def test_a_file_rewritten_while_the_job_runs_is_refused_not_mixed_in(tmp_path):
    """A producer replaces its table while the job reads it: the rows of later chunks would come from
    the new version, the earlier ones from the old, all in one output."""
    source = write_prompts(tmp_path / "in.parquet", ["a", "b", "c", "d"])
    plan = inspect_inputs(str(source), {"prompt": "string", "id": "any"})
    first, second = plan_chunks(plan.files, 2)
    assert read_chunk(plan.uri, first, ["prompt"])["prompt"].to_pylist() == ["a", "b"]
    size = source.stat().st_size
    write_prompts(source, ["a new day", "of prompts", "in the same file", "and more"])
    with pytest.raises(JobError, match=rf"^input file {source} changed while the job ran \({size:,} bytes when "
                                       rf"planned, {source.stat().st_size:,} now\): the job stops rather than mix"):
        read_chunk(plan.uri, second, ["prompt"])
    source.unlink()
    with pytest.raises(JobError, match=r"bytes when planned, it is gone\)"):
        read_chunk(plan.uri, first, ["prompt"])


@pytest.mark.parametrize("rows, replicas, expected_rows, expected_chunks", [
    (5_000, 2, 1_250, 4),        # small input: two chunks per replica
    (5_000, 1, 2_500, 2),
    (300, 2, 75, 4),
    (3, 2, 1, 3),                # fewer rows than wanted chunks: one row each
    (20_000, 2, 3_334, 6),       # 5 chunks of <= 4096 rows would leave one replica working alone
    (1_000_000, 8, 4_033, 248),  # large input: the configured size, evened out over the replicas
])
def test_chunk_size_gives_every_replica_the_same_number_of_chunks(rows, replicas, expected_rows, expected_chunks):
    chunk_rows = choose_chunk_rows(rows, 4096, replicas)
    assert chunk_rows == expected_rows and -(-rows // chunk_rows) == expected_chunks
    assert chunk_rows <= 4096


def test_a_limit_takes_the_first_rows_of_the_files_in_order():
    plan = InputPlan("in", [InputFile("a", 5, 1), InputFile("empty", 0, 1), InputFile("b", 5, 1)], pa.schema([]))
    assert plan.head(None) is plan
    assert [(f.path, f.num_rows) for f in plan.head(5).files] == [("a", 5)]  # no file of zero rows after it
    assert [(f.path, f.num_rows) for f in plan.head(7).files] == [("a", 5), ("empty", 0), ("b", 2)]
    assert plan.head(100).files == plan.files


def test_chunks_pack_small_files_and_split_large_ones():
    """Thousands of tiny files must not become thousands of tiny parts, nor a huge file one giant part."""
    files = [InputFile(f"small-{i}", 10, 1) for i in range(1000)] + [InputFile("large", 100_000, 1)]
    chunks = plan_chunks(files, 4096)
    assert [c.num_rows for c in chunks[:-1]] == [4096] * (len(chunks) - 1)
    assert sum(c.num_rows for c in chunks) == 110_000 and len(chunks) == 27
    assert len(chunks[0].pieces) == 410 and chunks[2].pieces[-1].file == "large"
    assert len({c.id for c in chunks}) == len(chunks)
    # every input row lies in exactly one chunk, in input order
    rows = [(p.file_index, r) for c in chunks for p in c.pieces for r in range(p.start, p.stop)]
    assert rows == [(i, r) for i, f in enumerate(files) for r in range(f.num_rows)]
    assert Chunk.from_dict(dataclasses.asdict(chunks[1])) == chunks[1]
