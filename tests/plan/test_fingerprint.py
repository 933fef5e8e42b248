"""A job's fingerprint is what a resumed run matches its output by: it must not change when the code
moves. These values were computed by lmbatch 0.2.0 before the package was laid out in folders (the
fingerprint of commit 27f1af2); an output that version left half-written resumes only while they hold."""

import pyarrow as pa

from lmbatch.config import GenerationOptions, InputConfig, JobConfig, ModelConfig, OutputConfig
from lmbatch.input.files import InputFile, InputPlan
from lmbatch.plan.fingerprint import job_fingerprint

INPUTS = InputPlan(uri="/data/prompts", files=[InputFile("/data/prompts/a.parquet", 1234, 3),
                                               InputFile("/data/prompts/b.parquet", 99, 1)],
                   schema=pa.schema([("id", pa.int64()), ("prompt", pa.string())]))


def test_the_default_jobs_fingerprint_is_the_one_it_had_before_the_move():
    job = JobConfig(input=InputConfig(path="/data/prompts"), output=OutputConfig(path="/out"))
    assert job_fingerprint(job, INPUTS) == "550cd61f0941e8ec"


def test_a_job_with_many_keys_set_keeps_its_fingerprint():
    job = JobConfig(input=InputConfig(path="/data/prompts", template="Q: {prompt}", param_columns=["temperature"],
                                      max_prompt_tokens=100),
                    output=OutputConfig(path="/out", partition_by="lang", reasoning_tags=["<think>", "</think>"]),
                    model=ModelConfig(path="/models/m", revision="abc"),
                    generation=GenerationOptions(do_sample=True, temperature=0.7, seed=3, num_return_sequences=2,
                                                 logprobs=True, top_logprobs=2, stop=["\n"]))
    partitioned = InputPlan(uri=INPUTS.uri, files=INPUTS.files, schema=INPUTS.schema, partition_columns=("lang",))
    assert job_fingerprint(job, partitioned) == "a49ecbab5c5508db"


def test_what_does_not_shape_a_row_leaves_the_fingerprint_alone():
    base = JobConfig(input=InputConfig(path="/data/prompts"), output=OutputConfig(path="/out"))
    elsewhere = JobConfig(input=InputConfig(path="/other/place", limit=10**9),
                          output=OutputConfig(path="/elsewhere", compression="zstd"),
                          model=ModelConfig(kv_cache="static"))
    assert job_fingerprint(elsewhere, INPUTS) == job_fingerprint(base, INPUTS)
    assert job_fingerprint(JobConfig(input=InputConfig(path="/data/prompts"), output=OutputConfig(path="/out"),
                                     generation=GenerationOptions(max_new_tokens=33)), INPUTS) != "550cd61f0941e8ec"
