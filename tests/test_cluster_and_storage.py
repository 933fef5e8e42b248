"""Data-team and cluster set-ups with the real thing: an S3-compatible server, `ray job submit` to a
`ray start` cluster, Hydra multirun sweeps, and the KubeRay manifest's entrypoint."""

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml
from transformers import AutoModelForCausalLM

from conftest import REPO, compose, write_prompts
from lmbatch.config import ClusterConfig
from lmbatch.errors import JobError
from lmbatch.models import parameter_count
from lmbatch.plan.job import plan_job, to_job_config
from lmbatch.plan.resources import available_memory, cpu_shortfall, gpu_mismatch, memory_shortfall

BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:  # noqa: BLE001 - not up yet
            if time.time() > deadline:
                raise
            time.sleep(0.3)


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a process we started and everything it started (its own session), by process group."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def generate(*args, cwd, env=None, timeout=400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "generate.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def run_job(*args, cwd, env=None, timeout=400):
    done = generate(*args, cwd=cwd, env=env, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_kuberay_manifest_entrypoint_is_a_valid_job():
    manifest = yaml.safe_load((REPO / "jobs" / "kuberay-rayjob.yaml").read_text())
    assert manifest["kind"] == "RayJob" and manifest["apiVersion"].startswith("ray.io/")
    command = shlex.split(manifest["spec"]["entrypoint"])
    assert command[:2] == ["python", "jobs/generate.py"] and (REPO / command[1]).exists()
    job = to_job_config(compose(*command[2:]))  # every override exists in the schema and validates
    assert job.cluster.gpus_per_replica == 1 and job.input.path.startswith("s3://")
    assert job.batching.max_batch_rows == 1024  # batching=gpu, which cluster=gpu_node chooses: wide micro-batches
    workers = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(int(g["replicas"]) * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in workers)
    assert gpus == job.cluster.num_replicas * job.cluster.gpus_per_replica


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """A real S3-compatible server (moto) on 127.0.0.1 with one bucket; credentials via the standard variables."""
    port = free_port()
    server = subprocess.Popen([os.path.join(BIN, "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/")
        import boto3

        boto3.client("s3").create_bucket(Bucket="lmbatch-test")
        yield pafs.FileSystem.from_uri("s3://lmbatch-test/")[0]
    finally:
        stop_group(server)


@pytest.mark.slow
def test_input_and_output_on_s3(s3, tmp_path):
    source = write_prompts(tmp_path / "in.parquet", ["first prompt", "second prompt", "third"], topic=["a", "b", "a"])
    pq.write_table(pq.read_table(source), "lmbatch-test/prompts/part-0.parquet", filesystem=s3)
    out = "s3://lmbatch-test/generations/run-1"
    job = ["input.path=s3://lmbatch-test/prompts/", f"output.path={out}", "generation.max_new_tokens=4",
           "output.partition_by=topic"]  # the partitions' parts are written side by side
    log = run_job(*job, "cluster.num_replicas=1", cwd=tmp_path)
    assert f"to {out}" in log
    names = {i.base_name for i in s3.get_file_info(pafs.FileSelector("lmbatch-test/generations/run-1"))}
    assert {"_SUCCESS", "_manifest.json", "_metrics.json", "_lmbatch_job.json", "topic=a", "topic=b"} <= names
    table = pq.read_table("lmbatch-test/generations/run-1", filesystem=s3)
    assert sorted(zip(table["topic"].to_pylist(), table["id"].to_pylist())) == [("a", 0), ("a", 2), ("b", 1)]
    assert table["error"].null_count == 3
    again = run_job(*job, cwd=tmp_path)
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
    done = generate(f"input.path={source}", "output.path=/proc/lmbatch-out", "engine=echo", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert re.fullmatch(r"lmbatch: error: output.path /proc/lmbatch-out cannot be (written: .*|created: /proc is not "
                        "writable)", done.stderr.strip().splitlines()[-1]), done.stderr[-2000:]


@pytest.mark.slow
def test_multirun_sweep_writes_distinct_outputs(tmp_path):
    source = write_prompts(tmp_path / "in.parquet", ["a prompt to sample from", "another one"])
    run_job("-m", "generation=sampling", "generation.temperature=0.2,5.0", f"input.path={source}",
            "generation.max_new_tokens=6", "cluster.num_replicas=1", cwd=tmp_path, timeout=600)
    outputs = sorted(tmp_path.glob("runs/multirun/*/*/*/output"))
    assert [p.parent.name for p in outputs] == ["0", "1"]
    cold, hot = (pq.read_table(p)["generated_text"].to_pylist() for p in outputs)
    assert all((p / "_SUCCESS").exists() for p in outputs) and cold != hot


@pytest.mark.parametrize("gpus,per_replica,replicas,expected", [
    (8, 0, 2, "the Ray cluster has GPUs (8), but cluster.gpus_per_replica=0: replicas run on CPU"),
    (4, 1, 8, "8 replicas x 1 GPUs need 8, the Ray cluster has 4: only 4 replicas can start until GPUs join"),
    (3, 0.5, 8, "only 6 replicas can start"),
    (0, 1, 2, "no replica can start until GPUs join the cluster"),
    (8, 1, 8, None), (0, 0, 2, None), (8, 2, 4, None),
])
def test_replicas_and_the_clusters_gpus_that_do_not_match_are_named(gpus, per_replica, replicas, expected):
    found = gpu_mismatch(ClusterConfig(num_replicas=replicas, gpus_per_replica=per_replica), gpus, replicas)
    assert found == expected if expected is None else expected in found


@pytest.mark.parametrize("cpus,gpus,per_replica,replicas,expected", [
    (2, 0, 0.5, 2, None), (2, 0, 0.5, 3, None), (16, 4, 2, 8, None),  # the last: 4 GPUs, so 4 replicas start
    (2, 0, 0.5, 8, "take 2 of the Ray cluster's 2 CPUs (4 of cluster.num_replicas=8 fit), and the 0 left are less"),
    (2, 0, 0.6, 3, "take 1.8 of the Ray cluster's 2 CPUs (3 of cluster.num_replicas=3 fit), and the 0.2 left"),
    (16, 8, 2, 8, "(8 of cluster.num_replicas=8 fit), and the 0 left are less than reading and tokenizing a chunk "
                  "takes (cluster.prepare_cpus=1)"),
    (2, 0, 3, 1, "no replica can start: each takes 3 CPUs (cluster.cpus_per_replica), the Ray cluster has 2"),
])
def test_replicas_that_leave_no_cpu_to_read_their_input_are_named(cpus, gpus, per_replica, replicas, expected):
    prepare_cpus = 1 if gpus else 0.25  # as in cluster=gpu_node and cluster=local
    cluster = ClusterConfig(num_replicas=replicas, gpus_per_replica=1 if gpus else 0, cpus_per_replica=per_replica,
                            prepare_cpus=prepare_cpus)
    found = cpu_shortfall(cluster, cpus, gpus, replicas)
    assert found == expected if expected is None else expected in found


def test_a_local_job_whose_replicas_would_starve_stops_before_touching_the_output(tmp_path):
    """Replicas that take every CPU of the local Ray leave none for reading and tokenizing their
    input: the job waited forever at `replicas starting: 4/8 ready`. It now stops as Ray is up, before
    the output is touched (`output.mode=overwrite` would have cleared a finished one)."""
    out = tmp_path / "out"
    job = [f"output.path={out}", "engine=echo", "output.mode=overwrite"]
    plan = plan_job(to_job_config(compose(*job)))  # a run of this job that wrote one part
    plan.begin_output()
    plan.output.write_part(plan.chunks[0].id, pa.table({"id": [0]}))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert "_lmbatch_job.json" in before and len(before) == 2, before
    done = generate(*job, "cluster.num_replicas=64", "cluster.cpus_per_replica=1", cwd=tmp_path)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert re.fullmatch(r"lmbatch: error: replicas of cluster.cpus_per_replica=1 take (\d+) of the Ray cluster's \1 "
                        r"CPUs \(\1 of cluster.num_replicas=64 fit\), and the 0 left .* \(the local Ray this job "
                        r"started never grows\)", done.stderr.strip().splitlines()[-1]), done.stderr[-2000:]
    # Replicas that need GPUs where there are none (cluster=gpu_node on a laptop) would wait too.
    done = generate(*job, "cluster=gpu_node", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == (
        "lmbatch: error: 8 replicas x 1 GPUs need 8, the Ray cluster has 0: no replica can start until GPUs join the "
        "cluster (or lower cluster.num_replicas) (the local Ray this job started never grows)"), done.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_replicas_whose_weights_exceed_this_machines_memory_are_warned_of(tmp_path, tiny_llama):
    """On a local CPU run each replica loads its own float32 copy of the weights: more copies than
    the memory available holds are killed as they load. The dry run says so, from the safetensors
    headers alone; a GPU run (the weights go to the GPUs) or a remote cluster (other nodes) is not checked."""
    parameters = parameter_count(tiny_llama)
    assert parameters == AutoModelForCausalLM.from_pretrained(tiny_llama).num_parameters()
    fit = available_memory() // (4 * parameters)  # memory available moves a little: a margin either side
    too_many, fewer = int(fit * 1.25), int(fit * 0.8)
    job = [f"input.path={write_prompts(tmp_path / 'in.parquet', ['hi there'])}", f"output.path={tmp_path / 'out'}",
           f"model.path={tiny_llama}", "dry_run=true"]
    done = run_job(*job, f"cluster.num_replicas={too_many}", cwd=tmp_path)
    assert re.search(rf"lmbatch: warning: {too_many} replicas x 0.0 GB of float32 weights need more memory than this "
                     r"machine has available \([\d.]+ GB\): replicas will be killed as they load; lower "
                     r"cluster.num_replicas or use model.dtype=bfloat16\n", done), done
    for fits in ([f"cluster.num_replicas={fewer}"], [f"cluster.num_replicas={too_many}", "cluster=gpu_node"]):
        done = run_job(*job, *fits, cwd=tmp_path)
        assert "lmbatch dry run: " in done and "warning" not in done, done

    small = to_job_config(compose("model.dtype=bfloat16", "cluster.num_replicas=3", f"output.path={tmp_path}"))
    assert memory_shortfall(small, 10**9, 6 * 10**9) is None
    assert memory_shortfall(small, 10**9, 5 * 10**9).startswith(
        "3 replicas x 2.0 GB of bfloat16 weights need more memory than this machine has available (5.0 GB)")


@pytest.mark.slow
def test_ray_job_submit_to_a_started_cluster(tmp_path):
    port, dashboard = free_port(), free_port()
    # Its own temp dir: `ray start` records itself there, where no other Ray in the tests looks.
    # (A short path: Ray's socket paths under it must stay within the OS limit.)
    temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    head = subprocess.Popen([os.path.join(BIN, "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--temp-dir={temp_dir}",
                             f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                             # a GPU the job leaves idle (Ray takes the count on trust): the job says so
                             "--num-cpus=2", "--num-gpus=1", "--include-dashboard=true"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            # The job's `python` is this environment's, also where it is not activated.
                            env={**os.environ, "RAY_AUTH_MODE": "disabled",
                                 "PATH": BIN + os.pathsep + os.environ.get("PATH", "")})
    try:
        wait_for_http(f"http://127.0.0.1:{dashboard}/api/version", timeout=120)
        source = write_prompts(tmp_path / "in.parquet", ["submitted as a Ray job", "second row"])
        # No output.path: the default, under the run directory, lies in the job's Ray-made working directory.
        done = subprocess.run(
            [os.path.join(BIN, "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir",
             str(REPO), "--", "python", "jobs/generate.py", f"input.path={source}",
             "generation.max_new_tokens=4", "cluster.num_replicas=1"],
            cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "succeeded" in done.stdout
        assert "lmbatch: warning: the Ray cluster has GPUs (1), but cluster.gpus_per_replica=0" in done.stdout
        out = re.search(r"lmbatch: wrote 2 rows in \d+ parts to (\S+)", done.stdout)[1]
        assert out.startswith(temp_dir) and pq.read_table(out).num_rows == 2
        assert (f"lmbatch: warning: output.path {out} lies in the working directory Ray made for this submitted job"
                in done.stdout)
    finally:
        stop_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
