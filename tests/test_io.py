"""Input discovery and reading through filesystems other than the local disk."""

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmbatch.io import JobError, inspect_inputs, plan_chunks, read_chunk


def test_a_filesystem_only_fsspec_knows_is_read_through_pyarrow():
    """memory:// has no pyarrow filesystem; fsspec's is wrapped (the same path serves az://, etc.)."""
    memory = fsspec.filesystem("memory")
    table = pa.table({"id": list(range(10)), "prompt": [f"prompt {i}" for i in range(10)], "x": [1.0] * 10})
    for name, rows in (("a", slice(0, 6)), ("b", slice(6, 10))):
        with memory.open(f"/lmbatch-io-test/in/{name}.parquet", "wb") as f:
            pq.write_table(table[rows], f, row_group_size=3)  # chunks cut across row groups
    plan = inspect_inputs("memory://lmbatch-io-test/in", {"prompt": "string", "id": "any"})
    assert [f.num_rows for f in plan.files] == [6, 4]
    chunks = plan_chunks(plan.files, 4)
    assert [(c.file_index, c.start, c.stop) for c in chunks] == [(0, 0, 4), (0, 4, 6), (1, 0, 4)]
    got = pa.concat_tables(read_chunk(plan.uri, c, ["id", "prompt"]) for c in chunks)
    assert got.equals(table.select(["id", "prompt"]))


def test_an_unknown_scheme_is_a_job_error():
    with pytest.raises(JobError, match="neither pyarrow nor fsspec"):
        inspect_inputs("nosuchscheme://bucket/in", {"prompt": "string"})
