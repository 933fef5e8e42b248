"""Jobs on s3:// through a store that fails a share of its requests as object stores do under load:
503 SlowDown, connections dropped before or after the store acted, requests held unanswered. A real
S3-compatible server (moto) and the fault-injecting proxy in front of it run on 127.0.0.1
(helpers/object_store.py); the job is the real command, its replicas on a real local Ray.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from helpers.config import REPO
from helpers.data import varied_prompts, write_prompts
from helpers.object_store import CREDENTIALS, faulty_store
from helpers.processes import kill_tree, run_job, run_job_ok, start_job
from helpers.tally import TALLY, account

pytestmark = pytest.mark.slow

FILES, ROWS_PER_FILE = 4, 12
PATIENT = ["storage.base_delay_s=0.05", "storage.max_delay_s=1", "storage.request_timeout_s=2"]
"""Short waits, so that a test rides out its faults in seconds (the defaults are for real stores)."""


@pytest.fixture
def store(tmp_path):
    """A bucket `lake` holding FILES files of prompts, behind a proxy failing 10% of the job's requests."""
    with faulty_store("lake", tmp_path / "proxy.log", fault_rate=0.1) as store:
        fs = store.filesystem()
        prompts = varied_prompts(FILES * ROWS_PER_FILE, seed=3, max_words=40)
        for f in range(FILES):
            rows = range(f * ROWS_PER_FILE, (f + 1) * ROWS_PER_FILE)
            local = write_prompts(tmp_path / f"in-{f}.parquet", [prompts[i] for i in rows], ids=list(rows))
            # written straight to moto: the test's own requests see no faults
            pq.write_table(pq.read_table(local), f"lake/prompts/part-{f}.parquet", filesystem=fs)
        yield store


def job(store, out="s3://lake/out", *extra):
    return ["input.path=s3://lake/prompts/", f"output.path={out}", "generation.max_new_tokens=4",
            "batching.chunk_rows=6", "cluster.num_replicas=2", *PATIENT, *extra]


def env(store):
    return {**CREDENTIALS, "AWS_ENDPOINT_URL": store.endpoint}


def wait_for_objects(store, prefix, starting, count, proc, timeout=300):
    """Until `count` objects whose names begin with `starting` are under `prefix` (seen straight from moto)."""
    fs, deadline = store.filesystem(), time.monotonic() + timeout
    while len([i for i in fs.get_file_info(pafs.FileSelector(prefix, allow_not_found=True))
               if i.base_name.startswith(starting)]) < count:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"not {count} objects {prefix}/{starting}* in {timeout} s"
        time.sleep(0.2)


def texts(table):
    return dict(zip(table["id"].to_pylist(), table["generated_text"].to_pylist()))


def upload(fs, local, prefix):
    """A local directory's files into the bucket, straight to moto."""
    for path in Path(local).rglob("*"):
        if path.is_file():
            with fs.open_output_stream(f"{prefix}/{path.relative_to(local)}") as f:
                f.write(path.read_bytes())


def test_a_job_rides_out_a_store_failing_a_tenth_of_its_requests(store, tmp_path, tiny_llama):
    """Input, output and the model's weights in the bucket; a tenth of the job's requests fail."""
    upload(store.filesystem(), tiny_llama, "lake/models/tiny")
    cache = tmp_path / "cache"
    log = run_job_ok(tmp_path, *job(store), "model.path=s3://lake/models/tiny/",
                     env={**env(store), "LMBATCH_CACHE": str(cache)})
    faults = store.faults()
    failed = sum(n for kind, n in faults.items() if kind != "ok")
    assert failed >= 10 and {"throttled", "dropped", "hung"} <= faults.keys(), faults
    TALLY["faults"] += failed
    fs = store.filesystem()
    assert account("lake/out", range(FILES * ROWS_PER_FILE), filesystem=fs) == (0, 0)
    table = pq.read_table("lake/out", filesystem=fs)
    assert table["error"].null_count == table.num_rows
    parts = [i.base_name for i in fs.get_file_info(pafs.FileSelector("lake/out")) if i.base_name.startswith("part-")]
    assert len(parts) == FILES * ROWS_PER_FILE // 6  # one per chunk: a retried write left no second copy
    with fs.open_input_stream("lake/out/_metrics.json") as f:
        retries = json.loads(f.read())["storage_retries"]
    # pyarrow's SDK rides out most faults itself; what reached lmbatch's layer is counted and said
    assert set(retries) <= {"throttled", "timeout", "connection", "server error"}
    if retries:
        said = re.search(r"storage retries\s+([\d,]+) \(", log)
        assert said and int(said[1].replace(",", "")) >= sum(retries.values()), log[-3000:]

    # the node copied the model once for its two replicas; the driver, its small files alone
    copies = [p.name for p in (cache / "models" / "remote").iterdir() if p.is_dir()]
    assert len(copies) == 2 and sum(name.endswith("-config") for name in copies) == 1, copies
    assert not list((cache / "models" / "remote").glob("*-config/*.safetensors"))

    # the same job with everything on local disk writes the same texts
    local = tmp_path / "local-out"
    source = tmp_path / "all.parquet"
    pq.write_table(pq.read_table("lake/prompts", filesystem=fs).sort_by("id"), source)
    run_job_ok(tmp_path, f"input.path={source}", f"output.path={local}", "generation.max_new_tokens=4",
               "batching.chunk_rows=6", "cluster.num_replicas=2", f"model.path={tiny_llama}")
    assert texts(table) == texts(pq.read_table(local))


def test_a_run_killed_under_faults_resumes_to_the_same_output(store, tmp_path):
    slow = ["generation.max_new_tokens=24", "batching.chunk_rows=4"]
    proc = start_job(tmp_path, *job(store, "s3://lake/out", *slow), env=env(store))
    fs = store.filesystem()
    wait_for_objects(store, "lake/out", "part-", 2, proc)
    kill_tree(proc)  # the driver and its Ray, as a preempted machine loses them
    TALLY["faults"] += 1
    assert not fs.get_file_info("lake/out/_SUCCESS").is_file

    log = run_job_ok(tmp_path, *job(store, "s3://lake/out", *slow), env=env(store))
    assert re.search(r"[1-9]\d* of 12 chunks already committed", log), log[-3000:]
    assert account("lake/out", range(FILES * ROWS_PER_FILE), filesystem=fs) == (0, 0)
    TALLY["faults"] += sum(n for kind, n in store.faults().items() if kind != "ok")

    # the same job in one run, elsewhere in the bucket, writes the same texts
    run_job_ok(tmp_path, *job(store, "s3://lake/again", *slow), env=env(store))
    assert texts(pq.read_table("lake/out", filesystem=fs)) == texts(pq.read_table("lake/again", filesystem=fs))


def test_what_is_not_transient_fails_at_once_with_one_line(store, tmp_path):
    done = run_job(tmp_path, *job(store), "input.path=s3://lake/no-such-prompts/", env=env(store))
    assert done.returncode == 2, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line == "lmbatch: error: input.path s3://lake/no-such-prompts/ does not exist", line

    bad = {**env(store), "AWS_ENDPOINT_URL": "http://127.0.0.1:1"}  # nothing listens there: a wrong endpoint
    done = run_job(tmp_path, *job(store), "storage.attempts=20", "storage.base_delay_s=1", env=bad)
    assert done.returncode == 2 and "given up" not in done.stderr, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("lmbatch: error: cannot read input.path s3://lake/prompts/: ") and "connect" in line, line


LEASE_TIMINGS = """
import runpy, sys
from lmbatch.output import lease
from lmbatch.pipeline import run
lease.RENEW_S = run.RENEW_S = 0.5  # renewed every 0.5 s, lapsing 6 s after the last renewal
lease.EXPIRE_S = 6.0
sys.argv = ["jobs/generate.py", *sys.argv[1:]]
runpy.run_path("jobs/generate.py", run_name="__main__")
"""


def test_a_lease_the_store_cannot_renew_before_it_lapses_stops_the_run(store, tmp_path):
    """Renewals the store fails are tried again; an outage longer than the lease stops the run, saying so,
    before another run could take the output over."""
    slow = ["generation.max_new_tokens=24", "batching.chunk_rows=4", "storage.attempts=1000"]  # parts wait it out
    proc = subprocess.Popen([sys.executable, "-c", LEASE_TIMINGS, *job(store, "s3://lake/out", *slow)],
                            cwd=REPO, env={**os.environ, **env(store)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_objects(store, "lake/out", "part-", 2, proc)
        assert proc.poll() is None  # the renewals rode out the store's faults this far
        store.outage()
        TALLY["faults"] += 1
        try:
            log, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired as e:
            proc.kill()
            raise AssertionError((e.output or b"").decode()[-5000:]) from None
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, log[-3000:]
    last = log.strip().splitlines()[-1]
    assert re.fullmatch(r"lmbatch: error: the run's lease _lmbatch_run.json in s3://lake/out could not be renewed "
                        r"for \d+ s \(.*\); the run stops before it lapses, as another run would then take the "
                        r"output over", last), log[-3000:]
    assert "lmbatch: stopped with the chunks committed in s3://lake/out kept" in log
