"""The whole job on a real local Ray (127.0.0.1) with two replicas."""

import json
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers.config import compose
from helpers.data import varied_prompts, write_prompts
from helpers.oracles import oracle
from lmbatch.errors import JobError, JobFailed
from lmbatch.models import model_identity
from lmbatch.output.columns import split_reasoning
from lmbatch.output.directory import OutputDir
from lmbatch.pipeline.run import ERROR_CHECK_MIN_ROWS, run
from lmbatch.pipeline.session import failure_cause
from lmbatch.plan.job import plan_job, to_job_config
from lmbatch.status import output_status

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    rng = random.Random(7)
    prompts = varied_prompts(70, seed=3, max_words=200)
    ids = rng.sample(range(10_000, 99_999), len(prompts))  # not sorted: order must come from the input
    return write_prompts(tmp_path_factory.mktemp("in") / "prompts.parquet", prompts, ids,
                         topic=[rng.choice("abc") for _ in prompts], weight=[rng.random() for _ in prompts])


def run_job(out, prompts_file, model, *overrides):
    return run(compose(f"input.path={prompts_file}", f"output.path={out}", f"model.path={model}",
                       "cluster.num_replicas=2", "generation.max_new_tokens=12", *overrides))


@pytest.fixture(scope="module")
def default_job(local_ray, tmp_path_factory, prompts_file, tiny_llama):
    """(output directory, result) of the job with its defaults, which several tests read."""
    out = tmp_path_factory.mktemp("default") / "out"
    return out, run_job(out, prompts_file, tiny_llama)


def test_generate_end_to_end(default_job, prompts_file, tiny_llama):
    out, result = default_job
    source = pq.read_table(prompts_file)
    table = pq.read_table(out)

    assert (out / "_SUCCESS").exists() and result["rows"] == table.num_rows == source.num_rows
    assert table["id"].to_pylist() == source["id"].to_pylist()  # every id once, in input order
    assert table.column_names == ["id", "prompt", "topic", "weight", "generated_text", "num_prompt_tokens",
                                  "num_generated_tokens", "finish_reason", "error"]
    assert table.schema.field("generated_text").type == pa.string()
    assert table.schema.field("num_prompt_tokens").type == pa.int64()
    assert table["topic"].to_pylist() == source["topic"].to_pylist()
    assert set(table["finish_reason"].to_pylist()) <= {"stop", "length"}
    assert table["error"].null_count == table.num_rows

    with torch.inference_mode():
        for row in table.to_pylist()[:40]:
            assert row["generated_text"] == oracle(tiny_llama, row["prompt"], 12), row["id"]
            assert row["num_generated_tokens"] <= 12

    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["output"]["rows_ok"] == 70 and manifest["input"]["rows"] == 70
    assert manifest["config"]["model"]["path"] == tiny_llama
    recorded = json.loads((out / "_lmbatch_job.json").read_text())["model"]
    assert manifest["model_identity"] == recorded == model_identity(tiny_llama)
    metrics = json.loads((out / "_metrics.json").read_text())
    assert metrics["rows_this_run"] == 70 and metrics["generated_tokens"] == sum(table["num_generated_tokens"].to_pylist())
    assert metrics["rows_cut_at_token_limit"] == table["finish_reason"].to_pylist().count("length")

    again = run_job(out, prompts_file, tiny_llama)  # a finished job is a no-op
    assert again["already_finished"] and pq.read_table(out).equals(table)


@pytest.fixture
def replicas_start_together():
    """Dispatch only once the whole pool is up, so that a replica loading a few seconds late
    still gets work."""
    import ray

    context = ray.data.DataContext.get_current()
    before, context.wait_for_min_actors_s = context.wait_for_min_actors_s, 120
    yield
    context.wait_for_min_actors_s = before


def test_chunks_spread_over_the_replicas(local_ray, replicas_start_together, tmp_path):
    """Both replicas work when there is work for both. Ray Data hands a block to the least busy
    actor, the same one on a tie, so chunks that take less time than the gap between prepared
    chunks (tiny chunks, or prepare workers importing at start) may all go to one replica; here
    each chunk keeps its replica busy for seconds (4 rows one at a time, up to 600 new tokens)."""
    path = write_prompts(tmp_path / "in.parquet", [f"tell me a long story number {i}" for i in range(16)])
    result = run(compose(f"input.path={path}", f"output.path={tmp_path / 'out'}", "cluster.num_replicas=2",
                         "batching=fixed", "batching.fixed_batch_size=1", "batching.chunk_rows=4",
                         "generation.max_new_tokens=600"))
    assert result["rows"] == 16 and result["parts"] == 4
    assert len(result["metrics"]["replicas"]) == 2, result["metrics"]["replicas"]


def test_keep_columns_and_fixed_strategy_give_the_same_greedy_text(local_ray, tmp_path, prompts_file, tiny_gpt2):
    bucketed = run_job(tmp_path / "b", prompts_file, tiny_gpt2, "input.keep_columns=[topic]")
    fixed = run_job(tmp_path / "f", prompts_file, tiny_gpt2, "input.keep_columns=[]", "batching=fixed",
                    "output.compression=zstd")
    b, f = pq.read_table(tmp_path / "b"), pq.read_table(tmp_path / "f")
    for out, codec in (("b", "SNAPPY"), ("f", "ZSTD")):
        part = next((tmp_path / out).glob("part-*.parquet"))
        assert pq.ParquetFile(part).metadata.row_group(0).column(0).compression == codec
    assert b.column_names[:2] == ["id", "topic"] and "prompt" not in b.column_names
    assert f.column_names[0] == "id" and "topic" not in f.column_names
    assert b["generated_text"].to_pylist() == f["generated_text"].to_pylist()
    assert bucketed["metrics"]["padding_efficiency"] > fixed["metrics"]["padding_efficiency"]


def test_seeded_sampling_is_reproducible_with_samples_per_prompt(local_ray, tmp_path, prompts_file, tiny_llama):
    overrides = ["generation=sampling", "generation.num_return_sequences=3", "generation.max_new_tokens=8"]
    run_job(tmp_path / "one", prompts_file, tiny_llama, *overrides)
    # Another layout: one replica, other chunks, other micro-batches; the same samples.
    run_job(tmp_path / "two", prompts_file, tiny_llama, *overrides, "cluster.num_replicas=1", "batching=fixed")
    one, two = pq.read_table(tmp_path / "one"), pq.read_table(tmp_path / "two")
    assert one.num_rows == 3 * 70 and one.equals(two)
    rows = one.select(["id", "sample_index"]).to_pylist()
    ids = pq.read_table(prompts_file)["id"].to_pylist()
    assert rows == [{"id": i, "sample_index": s} for i in ids for s in range(3)]
    assert len(set(one["generated_text"].to_pylist())) > 70  # samples differ

    other_seed = run_job(tmp_path / "three", prompts_file, tiny_llama, *overrides, "generation.seed=1")
    assert other_seed["rows"] == 210
    assert pq.read_table(tmp_path / "three")["generated_text"] != one["generated_text"]


def test_reasoning_is_what_comes_before_the_closing_tag():
    think = ("<think>", "</think>")
    assert split_reasoning("<think>\nsteps\n</think>\n\nAnswer", *think) == ("steps", "Answer")
    assert split_reasoning("steps\n</think>\n\nAnswer", *think) == ("steps", "Answer")  # opened in the prompt
    assert split_reasoning("<think>\nsteps, cut sh", *think) == ("steps, cut sh", "")  # at the token limit
    assert split_reasoning("Answer alone", *think) == (None, "Answer alone")  # thinking turned off
    assert split_reasoning("<think></think>A</think>B", *think) == ("", "A</think>B")
    assert split_reasoning(None, *think) == (None, None)  # an error row


def test_stop_strings_cut_the_text_and_reasoning_tags_split_it(default_job, tmp_path, prompts_file, tiny_llama):
    run_job(tmp_path / "cut", prompts_file, tiny_llama, "generation.stop=[e,XYZ]")
    full, cut = pq.read_table(default_job[0]).to_pylist(), pq.read_table(tmp_path / "cut").to_pylist()
    stopped = 0
    for f, c in zip(full, cut):
        assert "e" not in c["generated_text"]
        if "e" in f["generated_text"]:
            stopped += 1
            assert c["generated_text"] == f["generated_text"].split("e")[0]
            assert c["finish_reason"] == "stop" and c["num_generated_tokens"] <= f["num_generated_tokens"]
        else:
            assert (c["generated_text"], c["finish_reason"]) == (f["generated_text"], f["finish_reason"])
    assert stopped >= 10

    # Letters of the random model's texts stand in for a reasoning model's tags.
    run_job(tmp_path / "split", prompts_file, tiny_llama, 'output.reasoning_tags=["t","e"]')
    split = pq.read_table(tmp_path / "split")
    assert split.schema.field("reasoning").type == pa.string()
    for f, r in zip(full, split.to_pylist()):
        assert (r["reasoning"], r["generated_text"]) == split_reasoning(f["generated_text"], "t", "e")
        assert (r["num_generated_tokens"], r["finish_reason"]) == (f["num_generated_tokens"], f["finish_reason"])
    assert split["reasoning"].null_count < split.num_rows
    with pytest.raises(JobError, match="holds the output of a different job"):  # unsplit texts are another job's
        run_job(tmp_path / "split", prompts_file, tiny_llama)


def test_output_files_are_bounded_and_read_back_with_duckdb(local_ray, tmp_path, prompts_file, tiny_llama):
    import duckdb

    out = tmp_path / "out"
    run_job(out, prompts_file, tiny_llama, "output.max_rows_per_file=16", "generation.max_new_tokens=3")
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) >= 5 and all(pq.read_metadata(p).num_rows <= 16 for p in parts)
    con = duckdb.connect()
    got = con.execute(f"select count(*), count(distinct id), sum(num_generated_tokens), "
                      f"count(*) filter (where finish_reason = 'error') from read_parquet('{out}/part-*.parquet')").fetchone()
    table = pq.read_table(out)
    assert got == (70, 70, sum(table["num_generated_tokens"].to_pylist()), 0)
    schema = {name: str(t) for name, t, *_ in con.execute(
        f"describe select * from read_parquet('{out}/part-*.parquet')").fetchall()}
    assert schema["generated_text"] == "VARCHAR" and schema["num_prompt_tokens"] == "BIGINT"


def test_output_partitioned_by_an_input_column(local_ray, tmp_path, prompts_file, tiny_llama):
    import duckdb
    import pyarrow.dataset as ds

    out = tmp_path / "out"
    result = run_job(out, prompts_file, tiny_llama, "output.partition_by=topic", "generation.max_new_tokens=3")
    source = pq.read_table(prompts_file)
    assert sorted(p.name for p in out.glob("topic=*")) == ["topic=a", "topic=b", "topic=c"]
    table = ds.dataset(out, format="parquet", partitioning="hive").to_table()
    assert sorted(table["id"].to_pylist()) == sorted(source["id"].to_pylist()) and result["rows"] == 70
    by_id = {r["id"]: r["topic"] for r in table.select(["id", "topic"]).to_pylist()}
    assert by_id == dict(zip(source["id"].to_pylist(), source["topic"].to_pylist()))
    counted = duckdb.connect().execute(
        f"select topic, count(*) from read_parquet('{out}/*/*.parquet', hive_partitioning = true) group by topic "
        "order by topic").fetchall()
    assert counted == sorted(__import__("collections").Counter(source["topic"].to_pylist()).items())
    assert run_job(out, prompts_file, tiny_llama, "output.partition_by=topic",
                   "generation.max_new_tokens=3")["already_finished"]

    # A chunk without its marker (the run died before writing it) is regenerated, in place.
    marker = sorted((out / "_chunks").iterdir())[0]
    marker.unlink()
    (out / "_SUCCESS").unlink()
    again = run_job(out, prompts_file, tiny_llama, "output.partition_by=topic", "generation.max_new_tokens=3")
    assert again["metrics"]["chunks_this_run"] == 1 and again["rows"] == 70
    assert ds.dataset(out, format="parquet", partitioning="hive").to_table().equals(table)

    # A row that ran out of memory (written here into a part of one chunk, as a GPU too small would):
    # output.mode=retry_errors generates that chunk again, its part in every partition, and no other.
    part = sorted(out.glob("topic=b/part-*.parquet"))[-1]
    rows = pq.read_table(part)
    failed = {"generated_text": pa.array([None], pa.string()), "finish_reason": pa.array(["error"]),
              "error": pa.array(["out of memory: CUDA out of memory (injected)"])}
    for name, value in failed.items():
        i = rows.schema.get_field_index(name)
        rows = rows.set_column(i, rows.schema.field(i), pa.concat_arrays([value, rows[name].combine_chunks()[1:]]))
    pq.write_table(rows, part)  # its metadata (job, chunk) kept
    others = {p: p.stat().st_mtime_ns for p in out.glob("*/part-*.parquet") if p.name != part.name}
    retried = run_job(out, prompts_file, tiny_llama, "output.partition_by=topic", "generation.max_new_tokens=3",
                      "output.mode=retry_errors")
    assert retried["metrics"]["chunks_this_run"] == 1 and retried["rows_error"] == 0
    assert ds.dataset(out, format="parquet", partitioning="hive").to_table().equals(table)
    assert {p: p.stat().st_mtime_ns for p in others} == others

    # Read back as input, the topic=... directories give the topic column again (strings, as Spark's would).
    second = tmp_path / "second"
    run_job(second, out, tiny_llama, "engine=echo", "input.keep_columns=[topic]")
    assert {r["id"]: r["topic"] for r in pq.read_table(second).select(["id", "topic"]).to_pylist()} == by_id


def test_many_small_files_are_packed_into_even_parts(local_ray, tmp_path, tiny_llama):
    """40 files of 1-5 rows: parts of chunk_rows rows spanning files, in input order, and the
    manifest says which input rows each part holds (engine=echo: the layout, not the text, is tested)."""
    rng = random.Random(5)
    sizes = [rng.randint(1, 5) for _ in range(40)]
    total = sum(sizes)
    ids = list(range(total - 1)) + [7]  # the last row repeats an id of the first file
    prompts = varied_prompts(total, seed=11, max_words=20)
    files, start = [], 0
    for i, n in enumerate(sizes):
        files.append(write_prompts(tmp_path / "in" / f"f{i:03d}.parquet", prompts[start:start + n],
                                   ids[start:start + n]))
        start += n
    out = tmp_path / "out"
    result = run(compose(f"input.path={tmp_path / 'in'}", f"output.path={out}", f"model.path={tiny_llama}",
                         "cluster.num_replicas=2", "engine=echo", "batching.chunk_rows=16",
                         "input.on_duplicate_id=error"))

    manifest = json.loads((out / "_manifest.json").read_text())
    chunk_rows = manifest["output"]["chunk_rows"]
    parts = sorted(out.glob("part-*.parquet"))
    assert result["rows"] == total and len(parts) == -(-total // chunk_rows) < len(files)
    tables = [pq.read_table(p) for p in parts]
    assert [t.num_rows for t in tables[:-1]] == [chunk_rows] * (len(parts) - 1)
    assert [i for t in tables for i in t["id"].to_pylist()] == ids  # name order is input order
    job = json.loads((out / "_lmbatch_job.json").read_text())["fingerprint"]
    for path, table in zip(parts, tables):
        chunk = path.stem.removeprefix("part-")
        assert table.schema.metadata[b"lmbatch.job"].decode() == job
        assert table.schema.metadata[b"lmbatch.chunk"].decode() == chunk
        ranges = manifest["parts"][chunk]
        held = [i for f, a, b in ranges for i in pq.read_table(files[f])["id"].to_pylist()[a:b]]
        assert held == table["id"].to_pylist()
    errors = pa.concat_tables(tables)["error"].to_pylist()
    assert errors[:-1] == [None] * (total - 1) and errors[-1].startswith("duplicate id")


def test_a_limit_runs_the_first_rows_as_a_job_of_its_own(local_ray, tmp_path, tiny_llama):
    """input.limit=7 over three files of 5 rows: the first 7 rows (the second file cut short),
    committed like any job. Its output refuses the whole input as another job; a limit above the
    input's rows is the whole input, the same job as no limit."""
    ids = list(range(100, 115))
    for i in range(3):
        write_prompts(tmp_path / "in" / f"f{i}.parquet", varied_prompts(5, seed=i), ids[5 * i:5 * i + 5])

    def job(out, *extra):
        return compose(f"input.path={tmp_path / 'in'}", f"output.path={out}", f"model.path={tiny_llama}",
                       "engine=echo", "cluster.num_replicas=2", *extra)

    trial = tmp_path / "trial"
    assert run(job(trial, "input.limit=7"))["rows"] == 7
    assert pq.read_table(trial)["id"].to_pylist() == ids[:7] and (trial / "_SUCCESS").exists()
    assert plan_job(to_job_config(job(trial, "input.limit=7"))).state.finished
    with pytest.raises(JobError, match="holds the output of a different job"):
        plan_job(to_job_config(job(trial)))
    whole = plan_job(to_job_config(job(tmp_path / "full", "input.limit=1000")))
    assert whole.inputs.num_rows == 15
    assert whole.fingerprint == plan_job(to_job_config(job(tmp_path / "full"))).fingerprint


def test_a_job_with_too_many_error_rows_stops_and_goes_on_once_they_are_accepted(local_ray, tmp_path, tiny_llama,
                                                                                 capsys):
    """output.max_error_fraction: a job whose rows mostly fail stops once 1,000 rows are done, keeping
    what it committed; a smaller one writes every row but no _SUCCESS; a raised fraction goes on."""
    n, chunk = 2400, 200
    path = write_prompts(tmp_path / "in.parquet", [f"prompt {i}" if i % 5 == 0 else None for i in range(n)],
                         list(range(n)))  # 80% null prompts

    def job(out, fraction, *extra):
        return run(compose(f"input.path={path}", f"output.path={out}", f"model.path={tiny_llama}", "engine=echo",
                           f"batching.chunk_rows={chunk}", "cluster.num_replicas=1",
                           f"output.max_error_fraction={fraction}", *extra))

    out = tmp_path / "out"
    with pytest.raises(JobFailed, match=r"^stopped: [\d,]+ of the [\d,]+ rows done in this run are error rows "
                                        r"\(80.0%; null prompt: [\d,]+\), over output.max_error_fraction=0.5; "):
        job(out, 0.5)
    committed = len(list(out.glob("part-*")))
    assert ERROR_CHECK_MIN_ROWS // chunk <= committed < n // chunk and not (out / "_SUCCESS").exists()
    assert output_status(str(out))["state"] == "partial"  # as lmbatch-status reads it: the run let its lease go
    finished = job(out, 0.9)  # the fraction is no part of the job: it resumes
    assert f"resuming {out}: {committed} of {n // chunk} chunks already committed" in capsys.readouterr().out
    assert (finished["rows"], finished["rows_error"]) == (n, n * 4 // 5) and (out / "_SUCCESS").exists()
    assert {k: v for k, v in output_status(str(out)).items() if k in ("state", "rows", "rows_error", "chunks_done")
            } == {"state": "finished", "rows": n, "rows_error": n * 4 // 5, "chunks_done": n // chunk}
    assert sorted(pq.read_table(out)["id"].to_pylist()) == list(range(n))

    small = tmp_path / "small"  # under 1,000 rows the whole output is judged, at the end
    with pytest.raises(JobFailed, match=rf"^480 of the 600 rows in {re.escape(str(small))} are error rows "
                                        r"\(80.0%; null prompt: 480\), over output.max_error_fraction=0.5: every "
                                        r"row is written, but the output is not marked finished \(no _SUCCESS\)"):
        job(small, 0.5, "input.limit=600")
    assert len(list(small.glob("part-*"))) == 3 and not (small / "_SUCCESS").exists()
    accepted = job(small, 0.8, "input.limit=600")  # 80% is not over 0.8: finished, without generating again
    assert accepted["metrics"]["rows_this_run"] == 0 and (small / "_SUCCESS").exists()


def test_a_running_job_says_in_its_lease_how_far_it_has_got(local_ray, tmp_path, tiny_llama, monkeypatch):
    """The lease a run renews (every 10 s; 0.1 s here) carries its rows done and in all, as its
    progress line last said, for a run waiting on it and for anyone watching the output (lmbatch-status)."""
    from lmbatch.pipeline import run as pipeline_run

    renewed, write, watched = [], OutputDir.write_lease, []

    def write_lease(self, text):  # the real write, remembered, and the output as lmbatch-status then reads it
        renewed.append(json.loads(text))
        write(self, text)
        if renewed[-1]["renewals"] == 1:
            watched.append(output_status(self.uri))

    monkeypatch.setattr(pipeline_run, "RENEW_S", 0.1)
    monkeypatch.setattr(OutputDir, "write_lease", write_lease)
    path = write_prompts(tmp_path / "in.parquet", varied_prompts(40, seed=2, max_words=20))
    run(compose(f"input.path={path}", f"output.path={tmp_path / 'out'}", f"model.path={tiny_llama}",
                "cluster.num_replicas=1", "batching.chunk_rows=10", "progress_every_s=0.1"))
    done = [record["rows_done"] for record in renewed if record["renewals"]]
    assert done and done == sorted(done) and done[-1] <= 40
    assert {record["rows_total"] for record in renewed if record["renewals"]} == {40}
    assert watched[0]["state"] == "running" and watched[0]["run"]["rows_total"] == 40


def test_an_input_without_rows_gives_a_finished_empty_output(tmp_path, capsys):
    """A scheduled job's quiet day: no rows in, none out, and the job finishes (no Ray, no model).
    One part holds no rows but every column, typed, so readers find the schema (Spark does the same)."""
    source = write_prompts(tmp_path / "in.parquet", [], ids=pa.array([], pa.int64()), topic=pa.array([], pa.string()))
    out = tmp_path / "out"
    result = run(compose(f"input.path={source}", f"output.path={out}"))
    assert (result["rows"], result["parts"]) == (0, 1) and (out / "_SUCCESS").exists()
    printed = capsys.readouterr().out
    assert f"lmbatch: warning: input.path {source} holds no rows; the output holds none either" in printed
    assert re.search(r"\n  padding efficiency +-\n", printed)  # nothing generated: no ratio, and no "None"
    table = pq.read_table(out)
    assert table.num_rows == 0
    assert table.schema.names == ["id", "prompt", "topic", "generated_text", "num_prompt_tokens",
                                  "num_generated_tokens", "finish_reason", "error"]
    assert table.schema.field("id").type == pa.int64() and table.schema.field("num_prompt_tokens").type == pa.int64()
    assert run(compose(f"input.path={source}", f"output.path={out}"))["already_finished"]
    run(compose(f"input.path={source}", f"output.path={tmp_path / 'scored'}", "generation.logprobs=true"))
    assert pq.read_schema(next((tmp_path / "scored").glob("part-*"))).field("logprob").type == pa.float64()

    partitioned = run(compose(f"input.path={source}", f"output.path={tmp_path / 'by_topic'}",
                              "output.partition_by=topic"))
    assert (partitioned["rows"], partitioned["parts"]) == (0, 0)  # no value, so no partition


def test_a_failure_in_a_worker_is_named_in_one_line(local_ray):
    """Ray reports a worker's error as the worker's traceback wrapped in its own; the job's last line
    names the worker's error (the job test of a replica failing: test_reliability)."""
    import ray

    def fail(batch):
        raise OSError("No space left on device")

    with pytest.raises(ray.exceptions.RayError) as failed:
        ray.data.range(1).map_batches(fail).take_all()
    assert failure_cause(failed.value) == "a worker failed: OSError: No space left on device"

