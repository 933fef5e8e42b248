"""Cluster set-ups with the real thing: `ray job submit` to a `ray start` cluster, Hydra multirun sweeps,
the KubeRay manifest's entrypoint, and local jobs whose replicas would starve or not fit in memory."""

import os
import re
import shlex
import shutil
import subprocess
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from transformers import AutoModelForCausalLM

from helpers.config import REPO, compose
from helpers.data import write_prompts
from helpers.processes import BIN, free_port, run_job, run_job_ok, stop_group, wait_for_http
from lmbatch.models import parameter_count
from lmbatch.plan.job import plan_job, to_job_config
from lmbatch.plan.resources import available_memory, memory_shortfall


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


@pytest.mark.slow
def test_multirun_sweep_writes_distinct_outputs(tmp_path):
    source = write_prompts(tmp_path / "in.parquet", ["a prompt to sample from", "another one"])
    run_job_ok(tmp_path, "-m", "generation=sampling", "generation.temperature=0.2,5.0", f"input.path={source}",
               "generation.max_new_tokens=6", "cluster.num_replicas=1", timeout=600)
    outputs = sorted(tmp_path.glob("runs/multirun/*/*/*/output"))
    assert [p.parent.name for p in outputs] == ["0", "1"]
    cold, hot = (pq.read_table(p)["generated_text"].to_pylist() for p in outputs)
    assert all((p / "_SUCCESS").exists() for p in outputs) and cold != hot


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
    done = run_job(tmp_path, *job, "cluster.num_replicas=64", "cluster.cpus_per_replica=1")
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert re.fullmatch(r"lmbatch: error: replicas of cluster.cpus_per_replica=1 take (\d+) of the Ray cluster's \1 "
                        r"CPUs \(\1 of cluster.num_replicas=64 fit\), and the 0 left .* \(the local Ray this job "
                        r"started never grows\)", done.stderr.strip().splitlines()[-1]), done.stderr[-2000:]
    # Replicas that need GPUs where there are none (cluster=gpu_node on a laptop) would wait too.
    done = run_job(tmp_path, *job, "cluster=gpu_node")
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
    done = run_job_ok(tmp_path, *job, f"cluster.num_replicas={too_many}")
    assert re.search(rf"lmbatch: warning: {too_many} replicas x 0.0 GB of float32 weights need more memory than this "
                     r"machine has available \([\d.]+ GB\): replicas will be killed as they load; lower "
                     r"cluster.num_replicas or use model.dtype=bfloat16\n", done), done
    for fits in ([f"cluster.num_replicas={fewer}"], [f"cluster.num_replicas={too_many}", "cluster=gpu_node", "engine=hf"]):
        done = run_job_ok(tmp_path, *job, *fits)
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
