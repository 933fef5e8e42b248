"""The commands users type: `python jobs/generate.py`, the `lmbatch` console script, the README's and the
docs' examples."""

import os
import re
import shutil
import subprocess
import sys
import time
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers.config import REPO
from helpers.data import write_prompts
from lmbatch.models import resolve_model_path
from lmbatch.models.tokens import load_tokenizer


def run_cli(args, cwd, timeout=300, entry=None):
    command = entry or [sys.executable, str(REPO / "jobs" / "generate.py")]
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow
def test_default_job_runs_offline_with_no_arguments(tmp_path):
    done = run_cli([], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(l for l in done.stdout.splitlines() if l.startswith("lmbatch: wrote"))
    out = line.rsplit(" to ", 1)[1]
    assert "300 rows" in line and out.startswith(str(tmp_path / "runs"))
    assert os.path.exists(os.path.join(out, "_SUCCESS"))
    assert pq.read_table(out).num_rows == 300
    assert "rows ok / error" in done.stdout and "generated tokens/s" in done.stdout
    run_dir = os.path.dirname(out)
    assert os.path.exists(os.path.join(run_dir, "generate.log"))  # Hydra's log of the run


@pytest.mark.slow
def test_console_script_runs_the_classic_gpt2_example(tmp_path, tiny_gpt2):
    """The README's last feature: the transformers example (5 samples at temperature 0.7, max length 50) on a
    local GPT-2 directory."""
    lmbatch = shutil.which("lmbatch", path=os.path.dirname(sys.executable))
    done = run_cli(["experiment=gpt2_samples", f"model.path={tiny_gpt2}", f"output.path={tmp_path / 'out'}"],
                   cwd=tmp_path, entry=[lmbatch])
    assert done.returncode == 0, done.stderr[-3000:]
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert [r["sample_index"] for r in rows] == [0, 1, 2, 3, 4]
    assert {r["prompt"] for r in rows} == {"I love computer programming because"}
    assert all(r["num_prompt_tokens"] + r["num_generated_tokens"] <= 50 for r in rows)
    assert len({r["generated_text"] for r in rows}) > 1


@pytest.mark.slow
def test_progress_moves_inside_a_chunk_and_counts_a_chunk_as_soon_as_its_part_is_written(tmp_path):
    """Two chunks of 16 rows on one replica, in micro-batches of 2 rows: the progress line must show
    rows of a chunk still running (replicas report each micro-batch), and the first chunk as done
    before the second part exists (Ray Data's block prefetch once held each chunk's summary back
    until the next chunk was done)."""
    write_prompts(tmp_path / "in.parquet", [f"tell me a long story number {i}" for i in range(32)])
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "generate.py"), f"input.path={tmp_path / 'in.parquet'}",
                             f"output.path={tmp_path / 'out'}", "batching=fixed", "batching.fixed_batch_size=2",
                             "batching.chunk_rows=16", "cluster.num_replicas=1", "generation.max_new_tokens=600",
                             "progress_every_s=0.5"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    shown, lines = [], []  # (time, rows done) of each progress line; the lines
    for line in proc.stdout:
        if line.startswith("[lmbatch] ["):
            shown.append((time.time(), int(line.split("] ")[2].split("/")[0])))
            lines.append(line)
    assert proc.wait(timeout=300) == 0
    # the replica's model load takes seconds, lines come every 0.5 s: start-up is visible as such
    assert any(line.rstrip().endswith("| replicas starting: 0/1 ready") for line in lines), lines
    assert "starting" not in lines[-1]
    parts = sorted(p.stat().st_mtime for p in (tmp_path / "out").glob("part-*.parquet"))
    assert len(parts) == 2 and shown[-1][1] == 32
    assert any(rows % 16 for _, rows in shown), shown
    first_chunk_shown = next(t for t, rows in shown if rows >= 16)
    assert first_chunk_shown < parts[1], (first_chunk_shown, parts)


def test_dry_run_loads_no_model_and_writes_nothing(tmp_path):
    write_prompts(tmp_path / "in.parquet", ["short one", "a much longer prompt " * 20, None])
    # a template over two lines, as the shell's $'...' quoting passes it (Hydra reads "\n" as two characters)
    done = run_cli([f"input.path={tmp_path / 'in.parquet'}", f"output.path={tmp_path / 'out'}", "dry_run=true",
                    "generation.max_new_tokens=7", 'input.template="Q: {prompt}\nA:"',
                    "output.max_error_fraction=0.25"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "prompt tokens" in done.stdout
    batches = int(done.stdout.split("planned micro-batches (bucketed): ")[1].split()[0])
    assert f"planned decode steps for the sampled rows: at most {7 * batches} " in done.stdout
    assert "1 would be error rows" in done.stdout
    assert "  error row id=2: null prompt: column 'prompt' is null\n" in done.stdout  # what makes it one
    assert ("warning: 33.3% of the sampled rows would be error rows, over output.max_error_fraction=0.25: "
            "the job would stop\n") in done.stdout
    tokenizer = load_tokenizer(resolve_model_path("builtin://tiny-llama"))
    tokens = len(tokenizer("Q: short one\nA:")["input_ids"])
    assert (f"the first row's prompt as the model is given it (id=0, {tokens} tokens, special tokens shown):\n"
            "  | Q: short one\n  | A:\n") in done.stdout
    # what a micro-batch needs besides the weights: here the long prompt alone, in the tiny model's
    # float32 (2 layers x 2 (keys, values) x 2 KV heads x 16 dims x 4 bytes = 512 bytes a token)
    tokens = len(tokenizer("Q: " + "a much longer prompt " * 20 + "\nA:")["input_ids"]) + 7
    assert (f"KV cache of the largest planned micro-batch: {tokens:,} tokens x 512 bytes (float32) = "
            f"{tokens * 512 / 1e6:.1f} MB (batching.max_batch_tokens=16,384 allows 8.4 MB)\n") in done.stdout
    assert not (tmp_path / "out").exists()

    # Rows with their own sampling settings get micro-batches of their own, as in the job:
    # two chunks of 20 short rows, each with three temperatures (0.2, 0.9 and the config's).
    pq.write_table(pa.table({"id": list(range(40)), "prompt": ["a few words"] * 40,
                             "temperature": [0.2, 0.9, None, 0.2] * 10}), tmp_path / "params.parquet")
    done = run_cli([f"input.path={tmp_path / 'params.parquet'}", f"output.path={tmp_path / 'out'}", "dry_run=true",
                    "generation=sampling", "input.param_columns=[temperature]", "cluster.num_replicas=1"], cwd=tmp_path)
    assert "planned micro-batches (bucketed): 6 " in done.stdout, done.stdout + done.stderr[-3000:]
    # Greedy, a chunk's repeats of one prompt are copied from its first row, not generated: one row a chunk.
    # (with choices, the dry run shows how the model's tokens spell them: a leading space is a token's)
    done = run_cli([f"input.path={tmp_path / 'params.parquet'}", f"output.path={tmp_path / 'out'}", "dry_run=true",
                    "cluster.num_replicas=1", 'generation.choices=[" few",words]'], cwd=tmp_path)
    assert "0 would be error rows, 38 repeat an earlier row's prompt" in done.stdout, done.stdout
    assert "planned micro-batches (bucketed): 2 " in done.stdout
    spelled = {c: " + ".join(repr(tokenizer.decode([t])) for t in tokenizer(c, add_special_tokens=False)["input_ids"])
               for c in (" few", "words")}
    said = f"its choices as the model's tokens: ' few' = {spelled[' few']}; 'words' = {spelled['words']}\n"
    assert said in done.stdout


def test_the_sentiment_experiment_labels_reviews(tmp_path, capsys):
    """conf/experiment/sentiment.yaml, as docs/prompts-and-settings.md shows it: a template over two lines, the labels
    as choices and their log-probabilities; its dry run shows the prompt and the labels' tokens."""
    from helpers.config import compose
    from lmbatch.pipeline.run import run

    pq.write_table(pa.table({"id": [1], "review": ["Broke in a day."]}), tmp_path / "reviews.parquet")
    job = compose("experiment=sentiment", f"input.path={tmp_path / 'reviews.parquet'}", "dry_run=true",
                  f"output.path={tmp_path / 'out'}")
    assert (job.generation.choices, job.generation.logprobs) == ([" positive", " negative", " neutral"], True)
    run(job)
    printed = capsys.readouterr().out
    assert "  | Review: Broke in a day.\n  | Sentiment:\n" in printed
    assert "its choices as the model's tokens: ' positive' = " in printed


def test_a_long_prompt_is_shown_by_its_start_and_end():
    from lmbatch.plan.dry_run import SHOWN_PROMPT_CHARS, shown_prompt

    prompt = "<|system|>\nBe brief.\n" + "word " * 1000 + "\n<|assistant|>\n"
    shown = shown_prompt(prompt)
    assert shown.startswith("  | <|system|>\n  | Be brief.\n") and shown.endswith("\n  | <|assistant|>\n  | ")
    assert f"[... {len(prompt) - SHOWN_PROMPT_CHARS:,} characters ...]" in shown
    assert shown_prompt("short") == "  | short"


def test_a_bad_job_exits_with_one_readable_line(tmp_path):
    done = run_cli([f"input.path={tmp_path / 'missing.parquet'}", f"output.path={tmp_path / 'out'}"], cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"lmbatch: error: input.path {tmp_path / 'missing.parquet'} does not exist"
    assert "Traceback" not in done.stderr


def test_a_config_hydra_refuses_exits_2_like_every_bad_job(tmp_path):
    """Hydra composes the config before the job starts and exits 1 on a key it does not know: the
    status of a job that failed while it ran, which a scheduler may retry. Both commands make it 2."""
    lmbatch = shutil.which("lmbatch", path=os.path.dirname(sys.executable))
    for entry, override, says in [(None, "generation.max_new_tokn=3", "Key 'max_new_tokn' not in"),
                                  ([lmbatch], "model=nope", "Could not find 'model/nope'")]:
        done = run_cli([override, "dry_run=true"], cwd=tmp_path, entry=entry)
        assert done.returncode == 2, done.stderr[-3000:]
        assert says in done.stderr
    assert not (tmp_path / "runs").exists()


def test_wheel_ships_the_configs(tmp_path):
    """Installed without -e, lmbatch finds its configs inside the package (lmbatch/conf)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("lmbatch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").rglob("*.yaml")}
    assert shipped and {f"lmbatch/conf/{p}" for p in shipped} <= names
    assert "lmbatch/cli.py" in names


def test_a_dry_run_counts_the_prompt_tokens_micro_batches_share(tmp_path, capsys):
    """Prompts of one template, its instructions first: the dry run says how many prompt tokens the
    planned micro-batches would compute once, whatever the KV cache (none with batching.share_prefix=false)."""
    from helpers.config import compose
    from helpers.data import varied_prompts, write_prompts
    from lmbatch.pipeline.run import run

    source = write_prompts(tmp_path / "in.parquet", varied_prompts(20, seed=5, max_words=20))
    instructions = "Read the text below carefully and answer in one short sentence, plainly and politely."

    def dry(*overrides):
        result = run(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}", "dry_run=true",
                             f"input.template='{instructions} Text: {{prompt}}'", *overrides))
        return result["prompt_tokens_shared"], capsys.readouterr().out

    shared, printed = dry()
    micro_batches = int(re.search(r"planned micro-batches \(bucketed\): (\d+) ", printed).group(1))
    assert shared >= 16 * (20 - micro_batches) > 0
    assert re.search(rf"prompt tokens shared within the planned micro-batches, computed once for each: {shared:,} "
                     r"of the [\d,]+ their sequences hold \(\d+%; batching.share_prefix\)", printed)
    assert dry("model.kv_cache=static")[0] == shared  # the GPU default's cache shares them too
    unshared, printed = dry("batching.share_prefix=false")
    assert unshared == 0 and "prompt tokens shared" not in printed
