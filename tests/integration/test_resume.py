"""Resuming a job: a model changed in place is not mixed in, a hub model is pinned to one commit,
retry_errors generates only what failed in generation, a stop Ray cannot finish still ends the job,
and a killed driver resumes without redoing committed work.
"""


import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers.config import compose
from helpers.data import snapshot, write_prompts
from helpers.models import llama_with_remote_code
from helpers.oracles import oracle
from helpers.processes import Said, finish, kill_tree, parts, slow_job, start_job, wait_for_parts
from helpers.tally import TALLY, account
from lmbatch.errors import JobError
from lmbatch.models import model_identity
from lmbatch.output.directory import LEASE_FILE, part_name
from lmbatch.pipeline.run import run
from lmbatch.plan.job import plan_job, to_job_config


def test_a_model_changed_in_place_is_not_mixed_into_a_resumed_job(tmp_path, tiny_llama, capsys):
    """A scheduled job's model.path (say /models/current) is moved to a retrained model between a
    run that died and its rerun: resuming would generate the rest of the rows with another model,
    all under one manifest. A copy of the same model, with new file times, is the same model."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model, copy_function=shutil.copy)  # new file times
    (model / ".cache").mkdir()  # what `hf download --local-dir` keeps beside a model
    (model / ".cache" / "model.safetensors.metadata").write_text("downloaded at ...")
    assert model_identity(str(model)) == model_identity(tiny_llama)
    source = write_prompts(tmp_path / "in.parquet", [f"prompt {i}" for i in range(10)])
    out = tmp_path / "out"
    job = to_job_config(compose(f"input.path={source}", f"output.path={out}", f"model.path={model}",
                                "batching.chunk_rows=4", "cluster.num_replicas=1"))
    plan = plan_job(job)
    plan.begin_output()
    first = plan.chunks[0]
    plan.output.write_part(first.id, pa.table({"finish_reason": ["stop"] * first.num_rows}))
    assert plan_job(job).state.done_chunks == {first.id}  # resumable as it is

    retrained = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        for p in retrained.parameters():
            p.add_(0.01)
    retrained.save_pretrained(model)  # in place: the same files, of the same sizes
    assert model_identity(str(model)) != model_identity(tiny_llama)
    partial = snapshot(out)
    with pytest.raises(JobError, match=f"^output.path {out} holds part of this job made with other model files than "
                                       "model.path holds now \\(content \\w+ then, content \\w+ now\\): resuming "
                                       "would mix the outputs of two models"):
        plan_job(job)
    assert snapshot(out) == partial
    TALLY["bad_input_kinds"].add("a partial output made with other model files at model.path")

    # Finished, the output is all of one model: a rerun is the usual no-op, and says so.
    for chunk in plan.chunks[1:]:
        plan.output.write_part(chunk.id, pa.table({"finish_reason": ["stop"] * chunk.num_rows,
                                                   "error": pa.nulls(chunk.num_rows, pa.string())}))
    plan.output.commit({}, {})
    capsys.readouterr()
    assert run(job) == {"output": str(out), "already_finished": True}
    assert "It was made, all of it, with the model files model.path held then, not those it holds now" in \
        capsys.readouterr().out
    # Nor are its rows that failed in generation retried with the other model.
    plan.output.write_part(first.id, pa.table({"finish_reason": ["error"] + ["stop"] * (first.num_rows - 1),
                                               "error": ["out of memory: injected"] + [None] * (first.num_rows - 1)}))
    with pytest.raises(JobError, match="retrying its failed rows would mix the outputs of two models"):
        plan_job(to_job_config(compose(f"input.path={source}", f"output.path={out}", f"model.path={model}",
                                       "batching.chunk_rows=4", "output.mode=retry_errors")))


def test_a_hub_model_is_pinned_to_one_commit_for_the_whole_job(tmp_path, tiny_llama):
    """Replicas and tokenizer workers load a hub model themselves (each node downloads it): `main`
    moving on while the job runs (a new commit pushed) would mix two models in one output. The plan
    pins the commit it saw (where `main` pointed in the cache; also the model's identity, which a
    resume checks), or the one model.revision names, and every load takes that one."""
    repo = tmp_path / "hub" / "models--acme--tiny"
    first, second = "1" * 40, "2" * 40
    for commit in (first, second):
        shutil.copytree(tiny_llama, repo / "snapshots" / commit)
    # the second commit is another model, with another tokenizer
    for name, key, value in (("config.json", "rms_norm_eps", 1e-3), ("tokenizer_config.json", "model_max_length", 77)):
        settings = json.loads((repo / "snapshots" / second / name).read_text())
        (repo / "snapshots" / second / name).write_text(json.dumps({**settings, key: value}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(first)
    (repo / "refs" / "v2").write_text(second)
    source = write_prompts(tmp_path / "in.parquet", ["hello"])
    script = f"""
import json
from lmbatch.config import InputConfig, JobConfig, ModelConfig, OutputConfig
from lmbatch.plan.job import plan_job
from lmbatch.replica.actor import load_engine
from lmbatch.models.tokens import load_tokenizer

def plan(revision=None):
    return plan_job(JobConfig(input=InputConfig(path={str(source)!r}),
                              output=OutputConfig(path={str(tmp_path / 'out')!r}),
                              model=ModelConfig(path="acme/tiny", revision=revision)))

job = plan()
open({str(repo / "refs" / "main")!r}, "w").write({second!r})  # main moves on as the job runs
s, engine = job.settings, load_engine(job.job, "cpu")  # what replicas and prepare workers load
tokenizer = load_tokenizer(s.tokenizer_path, s.trust_remote_code, s.tokenizer_class, s.tokenizer_revision)
same_tokenizer = engine.tokenizer.model_max_length == tokenizer.model_max_length != 77
print(json.dumps([job.job.model.revision, job.model_identity, engine.model.config.rms_norm_eps, same_tokenizer,
                  plan("v2").job.model.revision]))
"""
    found = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert found.returncode == 0, found.stderr[-3000:]
    assert json.loads(found.stdout.splitlines()[-1]) == [first, f"commit {first}", 1e-6, True, second]


def test_retry_errors_generates_again_only_the_chunks_of_rows_that_failed_in_generation(tmp_path, tiny_llama,
                                                                                           capsys):
    """A row that ran out of memory alone (here injected while a flag file exists: a GPU too small)
    stays an error row in a finished output. output.mode=retry_errors generates again the chunks
    that hold such rows, once the cause is gone, and keeps the others' parts untouched; a row that
    failed for its input (a null prompt) fails the same way again and is not a reason to retry."""
    flag = tmp_path / "out-of-memory"
    flag.touch()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = llama_with_remote_code(tiny_llama, tmp_path, f"""
import os, torch
class RemoteLlama(LlamaForCausalLM):
    def forward(self, input_ids=None, **kwargs):
        if os.path.exists({str(flag)!r}) and ({tokenizer.convert_tokens_to_ids("<|system|>")} == input_ids).any():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return super().forward(input_ids=input_ids, **kwargs)
""")
    prompts = [f"row {i} says hello" for i in range(12)]
    prompts[5], prompts[9] = "row 5 holds <|system|> in its text", None
    out = tmp_path / "out"
    job = [f"input.path={write_prompts(tmp_path / 'in.parquet', prompts)}", f"output.path={out}",
           f"model.path={model}", "model.trust_remote_code=true", "batching.chunk_rows=4", "cluster.num_replicas=1",
           "generation.max_new_tokens=4"]
    env = {"HF_MODULES_CACHE": str(tmp_path / "hf-modules")}
    log = finish(start_job(tmp_path, *job, env=env))
    assert ("rows failed in generation  once the cause is gone (a GPU too small, a bug), output.mode=retry_errors "
            "generates them again") in log  # the summary says how
    errors = {r["id"]: r["error"] for r in pq.read_table(out).to_pylist() if r["error"]}
    assert errors == {5: "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB (injected)",
                      9: "null prompt: column 'prompt' is null"}
    kept = {p: os.stat(out / p).st_mtime_ns for p in parts(out) if p != part_name("00000-000000004")}

    flag.unlink()  # a larger GPU, a smaller budget
    log = finish(start_job(tmp_path, *job, "output.mode=retry_errors", env=env))
    assert (f"lmbatch: retrying the rows that failed in generation in {out} (out of memory: 1), with the rest of "
            "their chunks: 1 of 3 chunks to generate, 2 kept") in log
    assert account(out, range(12)) == (0, 0)
    rows = pq.read_table(out).to_pylist()
    assert [r["id"] for r in rows if r["error"]] == [9]
    assert rows[5]["generated_text"] == oracle(tiny_llama, prompts[5], 4)
    assert {p: os.stat(out / p).st_mtime_ns for p in kept} == kept
    assert json.loads((out / "_metrics.json").read_text())["rows_error"] == 1
    capsys.readouterr()
    assert run(compose(*job, "output.mode=retry_errors"))["already_finished"]  # in-process: it starts no Ray
    assert "nothing to do (output.mode=retry_errors: no row failed in generation)" in capsys.readouterr().out
    TALLY["faults"] += 1


def test_a_stop_that_ray_cannot_finish_still_ends_the_job(tmp_path):
    """A scheduler stopping a job signals every process in it (Slurm, systemd), Ray's GCS included,
    and Ray's shutdown (or Ray Data's) can then wait a minute for it, after which Ray aborts the
    driver with status 1 (seen here once in 45 such stops). Past STOP_GRACE_S the job says what is
    committed and exits with the status of a SIGTERM anyway, letting go of its lease in the output
    (renewed meanwhile, as a run renews it), so that a rerun on another machine need not wait for it
    to lapse."""
    script = """
import functools, signal, sys, time
from lmbatch.output.directory import OutputDir
from lmbatch.output.lease import Lease
from lmbatch.pipeline import session
from lmbatch.report.samplers import Periodic
session.STOP_GRACE_S = 3
lease = Lease(OutputDir(sys.argv[1]))
lease.acquire(print)
Periodic(lease.renew, 0.01).__enter__()  # renewing all along, as a run's thread does (every 10 s)
said = lambda: print("lmbatch: stopped with 2 of 4 chunks committed", file=sys.stderr)
signal.signal(signal.SIGTERM, functools.partial(session._exit_on_sigterm, said))
try:
    print("generating", flush=True)  # inside the try: a SIGTERM right after it unwinds through finally
    time.sleep(60)
finally:
    print("unwinding", flush=True)
    time.sleep(60)  # shutting Ray down, which waits on its dead GCS
"""
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout.readline() == "generating\n" and (tmp_path / LEASE_FILE).exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline() == "lmbatch: SIGTERM received: stopping (what is committed is kept)\n"
    assert proc.stdout.readline() == "unwinding\n"
    proc.send_signal(signal.SIGTERM)  # a second one neither cuts the unwinding short nor says it twice
    log, _ = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, log
    assert log.count("lmbatch: stopped with 2 of 4 chunks committed") == 1 and "SIGTERM received" not in log, log
    assert not (tmp_path / LEASE_FILE).exists()


def test_a_killed_driver_resumes_without_redoing_committed_work(tmp_path, long_input):
    path, ids = long_input
    out = tmp_path / "out"
    # A scheduler stopping the job (SIGTERM): Ray shuts down and the log says what is committed.
    proc = start_job(tmp_path, *slow_job(path, out))
    wait_for_parts(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=60)
    stopped = re.search(r"lmbatch: stopped with (\d+) of 50 chunks committed in (\S+); run the same command "
                        r"again to resume", log)
    assert proc.returncode == 128 + signal.SIGTERM and stopped, log[-3000:]  # not an abort (-6): see ray_session
    assert "lmbatch: SIGTERM received: stopping (what is committed is kept)" in log
    assert int(stopped[1]) == len(parts(out)) >= 2 and stopped[2] == str(out)

    proc = start_job(tmp_path, *slow_job(path, out))
    wait_for_parts(out, 5, proc)
    # A scheduler starts the job again while it still runs (a retry after a timeout, a trigger fired
    # twice): the second run waits on the first's lease instead of generating the same chunks.
    second = Said(start_job(tmp_path, *slow_job(path, out)))
    second.wait_for("waiting for it to end")
    # The first run's driver and the Ray it started, SIGKILLed at once, as a preempted machine loses
    # them: the waiting run, on the same machine, sees the lease's process gone, takes the lease and resumes.
    kill_tree(proc)
    TALLY["faults"] += 1
    committed = {p: (os.stat(out / p).st_ino, os.stat(out / p).st_mtime_ns) for p in parts(out)}
    assert 5 <= len(committed) < 50 and not (out / "_SUCCESS").exists()
    (out / ".part-00000-000000399.parquet.dead.tmp").write_bytes(b"half a part")  # a write cut short

    log = second.finish()
    assert "lmbatch: another run of this job (host " in log and not (out / LEASE_FILE).exists()
    assert f"{len(committed)} of 50 chunks already committed" in log
    assert account(out, ids) == (0, 0)
    for p, stamp in committed.items():  # committed parts were not rewritten
        assert (os.stat(out / p).st_ino, os.stat(out / p).st_mtime_ns) == stamp
    metrics = json.loads((out / "_metrics.json").read_text())
    assert metrics["chunks_this_run"] == 50 - len(committed)
    assert metrics["rows_skipped_as_done"] == 8 * len(committed)
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]

    # The worst moment: every part written, the commit not yet. A rerun generates nothing, commits.
    for name in ("_SUCCESS", "_manifest.json", "_metrics.json"):
        os.remove(out / name)
    log = finish(start_job(tmp_path, *slow_job(path, out)))
    assert "50 of 50 chunks already committed" in log
    assert json.loads((out / "_metrics.json").read_text())["chunks_this_run"] == 0
    assert account(out, ids) == (0, 0) and (out / "_SUCCESS").exists() and (out / "_manifest.json").exists()
