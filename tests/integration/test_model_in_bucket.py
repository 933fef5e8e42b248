"""model.path in a bucket (s3://), against a real S3-compatible server (moto) on 127.0.0.1: the plan reads
the model where it is, copying no weights; a node copies it once, whole or not at all, and again when
it changes. A whole job with its model in a bucket, under faults: test_object_store_faults.py."""

import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from helpers.config import compose
from helpers.data import write_prompts
from helpers.object_store import CREDENTIALS, moto_server
from lmbatch.errors import JobError
from lmbatch.models import model_identity, parameter_count
from lmbatch.models.remote import local_copy
from lmbatch.plan.job import plan_job, to_job_config

URI = "s3://lake/models/tiny"


@pytest.fixture
def bucket(tmp_path, monkeypatch, tiny_llama):
    """The tiny model in s3://lake/models/tiny; the cache of copies in tmp_path/cache."""
    with moto_server("lake") as endpoint:
        for k, v in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "LMBATCH_CACHE": str(tmp_path / "cache")}.items():
            monkeypatch.setenv(k, v)
        fs = pafs.FileSystem.from_uri("s3://lake/")[0]
        for path in Path(tiny_llama).rglob("*"):
            if path.is_file():
                put(fs, f"lake/models/tiny/{path.relative_to(tiny_llama)}", path.read_bytes())
        yield fs


def put(fs, key, data: bytes):
    with fs.open_output_stream(key) as f:
        f.write(data)


def copies(tmp_path):
    root = tmp_path / "cache" / "models" / "remote"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.exists() else []


def test_the_plan_reads_a_model_in_a_bucket_where_it_is(bucket, tmp_path, tiny_llama):
    source = tmp_path / "in.parquet"
    write_prompts(source, ["a prompt"])
    plan = plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}",
                                          f"model.path={URI}/")))
    assert plan.job.model.path == f"{URI}/"  # replicas copy it from there
    assert plan.model_identity == model_identity(tiny_llama)  # same files, same identity
    assert parameter_count(URI) == parameter_count(tiny_llama)
    [config] = copies(tmp_path)  # config and tokenizer only: no weights copied to the driver
    assert config.endswith("-config")
    held = os.listdir(tmp_path / "cache" / "models" / "remote" / config)
    assert "config.json" in held and "tokenizer.json" in held and not [n for n in held if n.endswith(".safetensors")]


def test_broken_weights_in_a_bucket_stop_the_job_at_plan(bucket, tmp_path):
    source = tmp_path / "in.parquet"
    write_prompts(source, ["a prompt"])
    weights = bucket.open_input_stream("lake/models/tiny/model.safetensors").read()
    put(bucket, "lake/models/tiny/model.safetensors", weights[: len(weights) // 2])  # a copy cut short
    cut = r"\(its tensors take [\d,]+ bytes, the file has [\d,]+\): an interrupted copy\?$"
    unreadable = f"^model.path {URI}: model.safetensors is not a readable safetensors file {cut}"
    with pytest.raises(JobError, match=unreadable):
        plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}",
                                       f"model.path={URI}")))
    with pytest.raises(JobError, match="^model.path s3://lake/models/none does not exist"):
        plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}",
                                       "model.path=s3://lake/models/none")))


def test_a_node_copies_the_model_once_whole_and_again_when_it_changes(bucket, tmp_path, tiny_llama):
    first = Path(local_copy(URI))
    assert sorted(p.name for p in first.iterdir() if p.is_file() and p.name != ".complete") == sorted(
        p.name for p in Path(tiny_llama).iterdir() if p.is_file())
    assert (first / "model.safetensors").read_bytes() == (Path(tiny_llama) / "model.safetensors").read_bytes()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert Path(local_copy(URI)) == first and (first / "model.safetensors").stat().st_mtime_ns == stamp  # shared

    (first / ".complete").unlink()  # a copy cut short (its process killed) is never taken as whole
    assert Path(local_copy(URI)) == first and (first / ".complete").exists()

    put(bucket, "lake/models/tiny/generation_config.json", b'{"do_sample": false}')  # changed in the bucket
    changed = Path(local_copy(URI))
    assert changed != first and (changed / "generation_config.json").read_text() == '{"do_sample": false}'
