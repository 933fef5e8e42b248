"""A bad job stops at plan, before any model loads, with one readable line and exit status 2, and touches
no output: bad input files, broken model weights, output clashes.
"""


import json
import os
import re
import shutil
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers.config import REPO, compose
from helpers.data import corrupt_column, one_prompt, rows_in_row_groups, snapshot, write_prompts
from helpers.processes import finish, run_job, start_job
from helpers.tally import TALLY, account
from lmbatch.errors import JobError
from lmbatch.plan.job import plan_job, to_job_config


def corrupt(d):
    (d / "bad.parquet").write_bytes(b"PAR1 this is not really parquet PAR1")
    return d / "bad.parquet"


def truncated(d):
    path = write_prompts(d / "cut.parquet", ["a", "b"])
    path.write_bytes(path.read_bytes()[:-30])
    return path


def garbled_ids(d):
    return corrupt_column(rows_in_row_groups(d / "garbled.parquet", 40, 10), row_group=2, column=0)


def empty_directory(d):
    (d / "empty").mkdir()
    return d / "empty"


def no_parquet_files(d):
    (d / "csv").mkdir()
    (d / "csv" / "a.csv").write_text("id,prompt\n1,hello\n")
    return d / "csv"


def integer_prompts(d):
    pq.write_table(pa.table({"id": [1], "prompt": [5]}), d / "int.parquet")
    return d / "int.parquet"


def mismatched_files(d):
    write_prompts(d / "mix" / "a.parquet", ["a"])
    write_prompts(d / "mix" / "b.parquet", ["b"], ids=["x"])  # string ids where a.parquet has integers
    return d / "mix"


def topics(d, values):
    """Rows with a `topic` column for output.partition_by, two to a row group (the scan reads them all)."""
    pq.write_table(pa.table({"id": range(len(values)), "prompt": ["hi"] * len(values), "topic": values}),
                   d / "topics.parquet", row_group_size=2)
    return d / "topics.parquet"


FITS, TOO_LONG = "é" * 41, "é" * 42  # "topic=" and %C3%A9 per character: 252 and 258 bytes, 255 allowed


BAD_JOBS = {
    "missing input": (lambda d: d / "nope.parquet", [], "does not exist"),
    "empty directory": (empty_directory, [], "is an empty directory"),
    "no parquet files": (no_parquet_files, [], "holds no Parquet files"),
    "corrupt file": (corrupt, [], "is not a readable Parquet file"),
    "truncated file": (truncated, [], "is not a readable Parquet file"),
    # the ids are read for the duplicate check: data that cannot be read is found before any model loads
    "garbled data": (garbled_ids, [], r"garbled.parquet cannot be read \(row groups 2, columns id\): .* \(a corrupt "
                                      r"file\? replace or remove it\)"),
    "prompt column missing": (one_prompt, ["input.prompt_column=text"], "has no column 'text'"),
    "id column missing": (one_prompt, ["input.id_column=key"], "has no column 'key'"),
    "wrong column type": (integer_prompts, [], "must hold strings, found int64"),
    "mismatched files": (mismatched_files, [], "b.parquet does not match the files before it: its column 'id' is "
                                               "string, theirs int64"),
    "model path missing": (one_prompt, ["model.path=/no/such/model"], "model.path /no/such/model does not exist"),
    "a revision of a local model": (one_prompt, ["model.revision=v2"],
                                    "model.revision=v2 names a commit of a hub model, but model.path builtin://"),
    "model path a file": (one_prompt, [f"model.path={sys.executable}"], "is a file, not a model directory"),
    "adapter missing": (one_prompt, ["model.adapter=/no/such/adapter"], "model.adapter /no/such/adapter does not "
                                                                         "exist: it must be a local directory"),
    "adapter not an adapter": (one_prompt, [f"model.adapter={REPO}"], f"model.adapter {REPO} holds no "
                                                                      "adapter_config.json"),
    "template column missing": (one_prompt, ["input.template='Q: {question}'"], "has no column 'question'"),
    "no room for a prompt": (one_prompt, ["generation.max_new_tokens=2048"], "leaves no room for a prompt"),
    "parameter column of text": (lambda d: write_prompts(d / "in.parquet", ["a"], max_new_tokens=["5"]),
                                  ["input.param_columns=[max_new_tokens]"],
                                  "column 'max_new_tokens' in .* must hold whole numbers, found string"),
    "kept prompt column not text": (integer_prompts, ["input.keep_columns=[prompt]"], "must hold strings, found int64"),
    "partition by the id": (lambda d: topics(d, ["a"]), ["output.partition_by=id"], "other than the id"),
    "partition by lists": (lambda d: topics(d, [["a"], ["b"]]), ["output.partition_by=topic"],
                           "is a list<element: string> column; partition by a column of strings"),
    "partition value too long": (lambda d: topics(d, ["a", FITS, "b", TOO_LONG, None]), ["output.partition_by=topic"],
                                 r"1 value\(s\) would name a directory longer than the 255 bytes"),
}


@pytest.mark.parametrize("kind", BAD_JOBS)
def test_a_bad_job_stops_before_any_model_loads(kind, tmp_path):
    make_input, overrides, message = BAD_JOBS[kind]
    source = make_input(tmp_path)
    with pytest.raises(JobError, match=message):
        plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}", *overrides)))
    assert not (tmp_path / "out").exists()
    TALLY["bad_input_kinds"].add(kind)


def test_partition_values_that_fit_a_directory_name_are_taken(tmp_path):
    source = topics(tmp_path, ["a", FITS, None, TOO_LONG])
    job = ["output.partition_by=topic", "input.limit=3"]  # the long value lies beyond the limit
    assert plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}", *job))).state.fresh


def lfs_pointer(weights):
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a21\nsize 684904\n")


def truncated_copy(weights):
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)


def missing_shard(weights):
    weights.rename(weights.with_name("model-00001-of-00002.safetensors"))
    index = {"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors",
                            "model.norm.weight": "model-00002-of-00002.safetensors"}}
    weights.with_name("model.safetensors.index.json").write_text(json.dumps(index))


BROKEN_WEIGHTS = {
    "no weights at all": (os.remove, "holds no weights (no *.safetensors, *.bin, *.pt, *.pth file): an incomplete "
                                     "download or copy?"),
    "weights a Git LFS pointer": (lfs_pointer, "model.safetensors is a Git LFS pointer, not the weights: run `git lfs pull`"),
    "weights cut short": (truncated_copy, "model.safetensors is not a readable safetensors file"),
    "a shard missing": (missing_shard, "model-00002-of-00002.safetensors is missing"),
}


@pytest.mark.parametrize("kind", BROKEN_WEIGHTS)
def test_broken_model_weights_stop_the_job_before_ray(kind, tmp_path, tiny_llama):
    """The driver reads only the model's config and tokenizer; replicas load the weights. Weights that
    cannot load would otherwise fail every replica after Ray and the job had started."""
    break_weights, message = BROKEN_WEIGHTS[kind]
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    break_weights(model / "model.safetensors")
    with pytest.raises(JobError, match=re.escape(f"model.path {model}: {message}")):
        plan_job(to_job_config(compose(f"input.path={one_prompt(tmp_path)}", f"output.path={tmp_path / 'out'}",
                                       f"model.path={model}")))
    assert not (tmp_path / "out").exists()
    TALLY["bad_input_kinds"].add(kind)


def test_output_clashes_stop_the_job_and_touch_nothing(tmp_path):
    data = tmp_path / "data"
    source = write_prompts(data / "in.parquet", ["a", "b", "c"])
    cases = {"output equal to input": data, "output inside input": data / "out"}
    for kind, out in cases.items():
        with pytest.raises(JobError, match="overlaps input.path"):
            plan_job(to_job_config(compose(f"input.path={data}", f"output.path={out}")))
        TALLY["bad_input_kinds"].add(kind)
    assert sorted(os.listdir(data)) == ["in.parquet"]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("not ours")
    for mode in ("resume", "overwrite"):
        with pytest.raises(JobError, match="holds no lmbatch output"):
            plan_job(to_job_config(compose(f"input.path={source}", f"output.path={foreign}", f"output.mode={mode}")))
    assert (foreign / "precious.txt").read_text() == "not ours"
    TALLY["bad_input_kinds"].add("output holds other data")

    # A different job's output (finished, or partial) is refused unless output.mode=overwrite.
    out = tmp_path / "out"
    finish(start_job(tmp_path, f"input.path={source}", f"output.path={out}", "generation.max_new_tokens=3",
                     "cluster.num_replicas=1"))
    before = snapshot(out)
    with pytest.raises(JobError, match="holds the output of a different job"):
        plan_job(to_job_config(compose(f"input.path={source}", f"output.path={out}", "generation.max_new_tokens=5")))
    os.remove(out / "_SUCCESS")
    partial = snapshot(out)
    with pytest.raises(JobError, match="holds the output of a different job"):
        plan_job(to_job_config(compose(f"input.path={source}", f"output.path={out}", "generation.temperature=0.5")))
    assert snapshot(out) == partial and set(before) - set(partial) == {"_SUCCESS"}
    TALLY["bad_input_kinds"].update(["output holds another finished job", "output holds another partial job"])

    done = run_job(tmp_path, f"input.path={source}", f"output.path={out}", "generation.max_new_tokens=5",
                   "output.mode=overwrite", "cluster.num_replicas=1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert account(out, [0, 1, 2]) == (0, 0)
