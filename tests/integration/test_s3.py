"""Input and output on s3://, against a real S3-compatible server (moto) on 127.0.0.1.
"""


import re

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from helpers.config import compose
from helpers.data import write_prompts
from helpers.object_store import CREDENTIALS, moto_server
from helpers.processes import run_job, run_job_ok
from lmbatch.errors import JobError
from lmbatch.plan.job import plan_job, to_job_config


@pytest.fixture
def s3(monkeypatch):
    """A real S3-compatible server (moto) on 127.0.0.1 with one bucket; credentials via the standard variables."""
    with moto_server("lmbatch-test") as endpoint:
        for k, v in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(k, v)
        yield pafs.FileSystem.from_uri("s3://lmbatch-test/")[0]


@pytest.mark.slow
def test_input_and_output_on_s3(s3, tmp_path):
    source = write_prompts(tmp_path / "in.parquet", ["first prompt", "second prompt", "third"], topic=["a", "b", "a"])
    pq.write_table(pq.read_table(source), "lmbatch-test/prompts/part-0.parquet", filesystem=s3)
    out = "s3://lmbatch-test/generations/run-1"
    job = ["input.path=s3://lmbatch-test/prompts/", f"output.path={out}", "generation.max_new_tokens=4",
           "output.partition_by=topic"]  # the partitions' parts are written side by side
    log = run_job_ok(tmp_path, *job, "cluster.num_replicas=1")
    assert f"to {out}" in log
    names = {i.base_name for i in s3.get_file_info(pafs.FileSelector("lmbatch-test/generations/run-1"))}
    assert {"_SUCCESS", "_manifest.json", "_metrics.json", "_lmbatch_job.json", "topic=a", "topic=b"} <= names
    table = pq.read_table("lmbatch-test/generations/run-1", filesystem=s3)
    assert sorted(zip(table["topic"].to_pylist(), table["id"].to_pylist())) == [("a", 0), ("a", 2), ("b", 1)]
    assert table["error"].null_count == 3
    again = run_job_ok(tmp_path, *job)
    assert "already holds this job, finished" in again


def test_an_output_that_cannot_be_created_stops_the_job_before_it_starts(s3, tmp_path):
    """pyarrow creates no bucket: a job writing to a missing one failed after Ray had started, with a
    traceback. A path below a file fails as early."""
    source = write_prompts(tmp_path / "in.parquet", ["a"])
    (tmp_path / "file").write_text("")
    for out, says in [("s3://no-such-bucket/out", "its bucket no-such-bucket does not exist"),
                      (f"{tmp_path}/file/out", f"{tmp_path / 'file'} is a file")]:
        with pytest.raises(JobError, match=f"^output.path {out} cannot be created: {says}$"):
            plan_job(to_job_config(compose(f"input.path={source}", f"output.path={out}")))
    assert plan_job(to_job_config(compose(f"input.path={source}", "output.path=s3://lmbatch-test/a/b"))).state.fresh

    # What the plan cannot see (an object store's policy refusing writes) fails as the output is
    # first written, still before any generation: here /proc, which root may write but holds no
    # directory of ours (a user who is not root is stopped by the plan).
    done = run_job(tmp_path, f"input.path={source}", "output.path=/proc/lmbatch-out", "engine=echo")
    assert done.returncode == 2, done.stderr[-3000:]
    assert re.fullmatch(r"lmbatch: error: output.path /proc/lmbatch-out cannot be (written: .*|created: /proc is not "
                        "writable)", done.stderr.strip().splitlines()[-1]), done.stderr[-2000:]
