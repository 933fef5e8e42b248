"""The commit check: every planned part present, holding exactly its chunk's rows.
"""


import os

import pyarrow as pa
import pytest

from helpers.config import compose
from helpers.data import write_prompts
from lmbatch.errors import JobFailed
from lmbatch.output.directory import part_name
from lmbatch.pipeline.commit import count_committed
from lmbatch.plan.job import plan_job, to_job_config


def test_the_commit_check_counts_every_part_and_fails_on_a_short_or_missing_one(tmp_path, tiny_llama):
    """The check before _SUCCESS, on parts written by hand: rows and error rows are counted over
    every chunk's part; a part holding a row too few, or no part, fails the commit."""
    source = write_prompts(tmp_path / "in.parquet", [f"prompt {i}" for i in range(10)])
    out = tmp_path / "out"
    plan = plan_job(to_job_config(compose(f"input.path={source}", f"output.path={out}", f"model.path={tiny_llama}",
                                          "batching.chunk_rows=4", "cluster.num_replicas=1")))
    plan.begin_output()
    for chunk in plan.chunks:
        plan.output.write_part(chunk.id, pa.table({"error": [None] * (chunk.num_rows - 1) + ["too long: ..."]}))
    assert count_committed(plan) == {"rows": 10, "rows_ok": 7, "rows_error": 3, "rows_error_by_kind": {"too long": 3},
                                     "parts": 3}
    last = plan.chunks[-1]
    plan.output.write_part(last.id, pa.table({"error": pa.array([None] * (last.num_rows - 1), pa.string())}))
    with pytest.raises(JobFailed, match=f"parts of chunk {last.id} hold {last.num_rows - 1} rows, expected "
                                        f"{last.num_rows}: delete {out / part_name(last.id)} and run"):
        count_committed(plan)
    os.remove(out / part_name(last.id))
    with pytest.raises(JobFailed, match=f"parts for chunks \\['{last.id}'\\] are missing"):
        count_committed(plan)
