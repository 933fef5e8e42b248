"""Nothing lost: bad rows, bad jobs, a killed replica, a lost node, out-of-memory, a killed driver, resume.

Every fault is real: processes are killed by pid with SIGKILL, a node of a simulated two-node
Ray cluster (ray.cluster_utils.Cluster on 127.0.0.1) is removed, an out-of-memory error is
raised inside the model's forward. After each, the output is checked row by row against the
input. The module ends by printing one figure line: kinds of bad input tried, faults injected,
rows lost, rows duplicated.
"""

import collections
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import fsspec
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from tokenizers import processors
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import (
    REPO,
    compose,
    oracle,
    save_classifier,
    save_headless,
    save_lora_adapter,
    varied_prompts,
    write_prompts,
)
from lmbatch.config import BatchingConfig, ConfigError, ModelConfig
from lmbatch.engine.hf import FAILED_ROWS_BEFORE_ANY_SUCCESS, EngineFailed, HFEngine
from lmbatch.engine.types import Request
from lmbatch.errors import JobError, JobFailed
from lmbatch.input import chunks as lmbatch_chunks
from lmbatch.models import build_tokenizer, model_identity
from lmbatch.output.directory import LEASE_FILE, part_name
from lmbatch.pipeline.commit import count_committed
from lmbatch.pipeline.dataset import ReadStalled, prepare_within
from lmbatch.pipeline.run import run
from lmbatch.plan.dry_run import dry_run
from lmbatch.plan.job import plan_job, to_job_config
from lmbatch.prepare.chunk import prepare_chunk
from lmbatch.prepare.rows import row_prompt
from lmbatch.prepare.settings import ERROR, MAX_NEW, PARAMS, PROMPT_IDS, SECOND_TEXT
from lmbatch.prepare.tokens import load_tokenizer
from lmbatch.replica.actor import Replica, load_engine
from lmbatch.replica.faults import (
    CRASHED,
    CRASHING_ROWS_PER_CHUNK,
    DEATHS_BEFORE_ISOLATING,
    check_load_deaths,
    isolating,
)
from lmbatch.replica.requests import row_options, sampling_params
from lmbatch.report.progress import LiveChunks

TALLY = {"bad_input_kinds": set(), "faults": 0, "lost": 0, "duplicated": 0}


def account(out, input_ids, samples=1):
    """Rows lost and duplicated in a finished output, compared id by id with the input."""
    assert os.path.exists(os.path.join(out, "_SUCCESS"))
    table = pq.read_table(out)
    key = ["id", "sample_index"] if samples > 1 else ["id"]
    got = collections.Counter(tuple(r.values()) for r in table.select(key).to_pylist())
    expected = collections.Counter((i, s) if samples > 1 else (i,) for i in input_ids for s in range(samples))
    lost, duplicated = sum((expected - got).values()), sum((got - expected).values())
    TALLY["lost"] += lost
    TALLY["duplicated"] += duplicated
    return lost, duplicated


def job_command(*overrides):
    return [sys.executable, str(REPO / "jobs" / "generate.py"), *overrides]


def run_job(tmp_path, *overrides, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(job_command(*overrides), cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def start_job(tmp_path, *overrides, env=None):
    return subprocess.Popen(job_command(*overrides), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def finish(proc, timeout=400):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


class Said:
    """What a running job prints, read as it comes, on a thread (a readline could block the test)."""

    def __init__(self, proc):
        self.proc, self.lines = proc, []
        self.reader = threading.Thread(target=lambda: [self.lines.append(line) for line in proc.stdout], daemon=True)
        self.reader.start()

    def wait_for(self, text, timeout=120):
        deadline = time.time() + timeout
        while not any(text in line for line in self.lines):
            assert self.reader.is_alive() and time.time() < deadline, "".join(self.lines)[-3000:]
            time.sleep(0.1)

    def finish(self, timeout=400):
        self.proc.wait(timeout=timeout)
        self.reader.join()
        log = "".join(self.lines)
        assert self.proc.returncode == 0, log[-4000:]
        return log


def parts(out):
    return sorted(p for p in os.listdir(out) if p.startswith("part-")) if os.path.isdir(out) else []


def wait_for_parts(out, count, proc, timeout=180):
    deadline = time.time() + timeout
    while len(parts(out)) < count:
        assert proc.poll() is None, "the job ended before the fault could be injected"
        assert time.time() < deadline, "no progress"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def long_input(tmp_path_factory):
    """Enough chunks (8 rows each) that faults land mid-job."""
    path = write_prompts(tmp_path_factory.mktemp("in") / "prompts.parquet", varied_prompts(400, seed=5, max_words=60),
                         ids=[f"row-{i:04d}" for i in range(400)])
    return path, [f"row-{i:04d}" for i in range(400)]


def slow_job(path, out, *extra):
    return [f"input.path={path}", f"output.path={out}", "batching.chunk_rows=8", "generation.max_new_tokens=24",
            "cluster.num_replicas=2", *extra]


# -- bad rows ------------------------------------------------------------------------------------
def test_bad_rows_become_error_rows_and_neighbours_succeed(tmp_path):
    prompts = ["fine prompt", None, "", "   \n\t", "word " * 3000, "also fine", "dup", "last fine one"]
    ids = [1, 2, 3, 4, 5, 6, 1, None]
    path = write_prompts(tmp_path / "in.parquet", prompts, ids)
    out = tmp_path / "out"
    log = finish(start_job(tmp_path, f"input.path={path}", f"output.path={out}", "input.on_duplicate_id=error",
                           "generation.max_new_tokens=4", "cluster.num_replicas=1"))
    assert ("lmbatch: warning: 1 row repeats an earlier 'id' value; it is written as an error row "
            "(input.on_duplicate_id=error)") in log
    rows = pq.read_table(out).to_pylist()
    assert [r["id"] for r in rows] == ids
    errors = [r["error"] and r["error"].split(":")[0] for r in rows]
    assert errors == [None, "null prompt", "empty prompt", "empty prompt", "too long", None, "duplicate id", "null id"]
    for r in rows:
        assert (r["finish_reason"] == "error") == (r["error"] is not None)
        assert (r["generated_text"] is None) == (r["error"] is not None)
    assert rows[4]["num_prompt_tokens"] > 2048  # the true count, though the row was not generated
    TALLY["bad_input_kinds"].update(e for e in errors if e)
    assert account(out, ids) == (0, 0)
    metrics = json.loads((out / "_metrics.json").read_text())
    assert metrics["errors_by_kind"] == {"null prompt": 1, "empty prompt": 2, "too long": 1, "duplicate id": 1,
                                         "null id": 1} == metrics["rows_error_by_kind"]  # the run made the output
    assert metrics["duplicate_id_rows"] == 1


# Many real chat templates raise on what they refuse (Mistral's and Llama 2's on roles that do not alternate).
STRICT_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_rows_that_a_template_refuses_become_error_rows(tmp_path, tiny_llama):
    """A template that raises for one row is that row's error, not the job's (it used to fail the
    prepare task, and so the job); one that refuses every row of the job is a bad job."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (model / "chat_template.jinja").write_text(STRICT_CHAT_TEMPLATE)
    chats = [[{"role": "user", "content": "hi"}],
             [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
             [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]]
    source = write_prompts(tmp_path / "chats.parquet", ["x"] * 3, messages=chats, tags=[["t"], None, []])

    def prepared(*overrides):
        plan = plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}",
                                              f"model.path={model}", "cluster.num_replicas=1", *overrides)))
        return [e for chunk in plan.chunks for e in prepare_chunk(chunk, plan.settings)[ERROR].to_pylist()]

    assert prepared("input.messages_column=messages") == [
        None, "chat template: Conversation roles must alternate user/assistant/user/assistant/...", None]
    errors = prepared("input.template='{prompt} about {tags[0]}'")  # the column is tags, indexed per row
    assert errors[0] is None and errors[1].startswith("template: input.template cannot be filled from this row: "
                                                      "TypeError(") and errors[2].startswith("template: ")
    with pytest.raises(JobError, match=f"the chat template of {model} fails on a single user message after "
                                       "input.system_prompt: System role not supported"):
        prepared("input.messages_column=messages", "input.system_prompt=terse")
    TALLY["bad_input_kinds"].update(["messages the chat template refuses", "a template index on a null value",
                                     "a system prompt the chat template refuses"])


# Qwen3's way: with enable_thinking false, an empty thinking block follows the generation prompt.
THINKING_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}"
    "<|assistant|>\n{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}")


def test_chat_template_variables_reach_the_template(tmp_path, tiny_llama):
    """input.chat_template_kwargs are the chat template's variables (Qwen3's enable_thinking here),
    in every row's prompt and in the job's identity; one the template does not read stops the job."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (model / "chat_template.jinja").write_text(THINKING_CHAT_TEMPLATE)
    prompts = ["hi there", "what is two and two?"]
    source = write_prompts(tmp_path / "in.parquet", prompts)
    tokenizer = AutoTokenizer.from_pretrained(model)

    def plan(*overrides):
        return plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}",
                                              f"model.path={model}", "cluster.num_replicas=1", *overrides)))

    def rendered(**variables):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True, **variables) for p in prompts]
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    def prompt_ids(p):
        return [ids for chunk in p.chunks for ids in prepare_chunk(chunk, p.settings)[PROMPT_IDS].to_pylist()]

    no_thinking = plan("+input.chat_template_kwargs={enable_thinking:false}")  # implies the chat template
    assert prompt_ids(no_thinking) == rendered(enable_thinking=False) != rendered()
    assert prompt_ids(plan("input.apply_chat_template=true")) == rendered()
    assert no_thinking.fingerprint != plan("input.apply_chat_template=true").fingerprint
    with pytest.raises(JobError, match=f"input.chat_template_kwargs sets enable_thinkng, which the chat template of "
                                       f"{model} does not read, so it would change nothing; it reads "
                                       "add_generation_prompt, enable_thinking, messages$"):
        plan("+input.chat_template_kwargs.enable_thinkng=false")
    with pytest.raises(JobError, match="input.chat_template_kwargs cannot set add_generation_prompt: lmbatch passes"):
        plan("+input.chat_template_kwargs.add_generation_prompt=false")


def test_a_chat_template_of_the_jobs_own_renders_every_row(tmp_path, tiny_llama):
    """input.chat_template: a template (or a file holding one) rendered with instead of the tokenizer's, for
    a base model that has none; part of the job's identity; one that is not Jinja stops the job."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (model / "chat_template.jinja").unlink()  # a base model: no chat template
    prompts = ["hi there", "what is two and two?"]
    source = write_prompts(tmp_path / "in.parquet", prompts)
    tokenizer = AutoTokenizer.from_pretrained(model)
    assert not tokenizer.chat_template
    template_file = tmp_path / "thinking.jinja"
    template_file.write_text(THINKING_CHAT_TEMPLATE)

    def plan(*overrides):
        return plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}",
                                              f"model.path={model}", "cluster.num_replicas=1", *overrides)))

    with pytest.raises(JobError, match="has no chat template, .* need \\(give one with input.chat_template\\)"):
        plan("input.apply_chat_template=true")
    own = plan(f"input.chat_template={template_file}", "+input.chat_template_kwargs.enable_thinking=false")
    assert own.job.input.chat_template == THINKING_CHAT_TEMPLATE  # the template, not the file's name
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True, chat_template=THINKING_CHAT_TEMPLATE,
                                           enable_thinking=False) for p in prompts]
    assert "<think>" in texts[0]
    assert [ids for chunk in own.chunks for ids in prepare_chunk(chunk, own.settings)[PROMPT_IDS].to_pylist()] == [
        tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    inline = plan("input.chat_template='{% for m in messages %}{{ m.content }}{% endfor %}'")
    assert inline.fingerprint != plan("input.chat_template='{% for m in messages %}{{ m.role }}{% endfor %}'"
                                      ).fingerprint
    with pytest.raises(JobError, match="^input.chat_template is not a template transformers can render: "):
        plan("input.chat_template='{% for m in messages %}'")
    with pytest.raises(ConfigError, match="input.chat_template /no/such.jinja is neither a chat template"):
        plan("input.chat_template=/no/such.jinja")


def test_rows_with_choices_get_the_tokens_their_longest_choice_needs(tmp_path, tiny_llama):
    """max_new_tokens does not cut a choice short; a max_length that would is a `too long` error row."""
    source = write_prompts(tmp_path / "in.parquet", ["a b", "the data table " * 3, "c d"],
                           choices=[None, None, ["x"]])
    plan = plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}",
                                          f"model.path={tiny_llama}", "generation.max_new_tokens=1",
                                          "generation.max_length=16", "generation.choices=[positive,negative]",
                                          "input.param_columns=[choices]")))
    tokenizer = load_tokenizer(tiny_llama)
    need = max(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in ["positive", "negative"]) + 1
    rows = pa.concat_tables(prepare_chunk(chunk, plan.settings) for chunk in plan.chunks)
    errors = rows[ERROR].to_pylist()
    assert errors[0] is None and errors[2] is None
    assert errors[1].startswith("too long: prompt has ") and errors[1].endswith(f"max_length=16, and the longest "
                                                                                 f"choice and an EOS take {need}")
    assert rows[MAX_NEW].to_pylist() == [need, 0, len(tokenizer("x", add_special_tokens=False)["input_ids"]) + 1]


def test_parameter_cells_are_read_as_their_settings_type(tmp_path, tiny_llama):
    """pandas writes an integer column with nulls as float64 (and polars keeps NaN apart from null):
    whole floats are integers and NaN keeps the config's value. A top_k of 5.0 used to fail
    generation itself, and a max_new_tokens of 3.5 was cut to 3 without a word."""
    nan = float("nan")
    source = write_prompts(tmp_path / "in.parquet", ["a b", "c d", "e f", "g h", "i j"],
                           max_new_tokens=[5.0, nan, 3.5, None, 2.0], top_k=[5.0, None, None, 7.5, None],
                           do_sample=[True, None, None, None, False], stop=[["x"], None, None, None, ["y", "z"]])
    plan = plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}",
                                          f"model.path={tiny_llama}", "generation.max_new_tokens=9",
                                          "input.param_columns=[max_new_tokens,top_k,do_sample,stop]")))
    rows = pa.concat_tables(prepare_chunk(chunk, plan.settings) for chunk in plan.chunks)
    assert rows[ERROR].to_pylist() == [None, None, "invalid parameter: max_new_tokens must be a whole number, got 3.5",
                                       "invalid parameter: top_k must be a whole number, got 7.5", None]
    assert rows[MAX_NEW].to_pylist() == [5, 9, 0, 0, 2]
    assert [json.loads(p) if p else None for p in rows[PARAMS].to_pylist()] == [
        {"max_new_tokens": 5, "top_k": 5, "do_sample": True, "stop": ["x"]}, None, None, None,
        {"max_new_tokens": 2, "do_sample": False, "stop": ["y", "z"]}]

    # OpenAI's penalties, as a request file exported from its API holds them, reach the replica's settings,
    # as does vLLM's min_p.
    source = write_prompts(tmp_path / "penalties.parquet", ["a b", "c d", "e f"], presence_penalty=[0.5, 2.5, None],
                           frequency_penalty=[1, None, None], min_p=[0.1, None, 1.5])
    plan = plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out2'}",
                                          f"model.path={tiny_llama}", "generation=sampling",
                                          "input.param_columns=[presence_penalty,frequency_penalty,min_p]")))
    rows = pa.concat_tables(prepare_chunk(chunk, plan.settings) for chunk in plan.chunks)
    assert rows[ERROR].to_pylist() == [None, "invalid parameter: presence_penalty must be in [-2, 2], got 2.5",
                                       "invalid parameter: min_p must be in [0, 1], got 1.5"]
    params = sampling_params(row_options(plan.job.generation, rows[PARAMS][0].as_py()))
    assert (params.presence_penalty, params.frequency_penalty, params.min_p) == (0.5, 1.0, 0.1)


def test_too_long_prompts_can_be_truncated_from_the_left(tmp_path):
    path = write_prompts(tmp_path / "in.parquet", ["word " * 3000, "short"])
    out = tmp_path / "out"
    finish(start_job(tmp_path, f"input.path={path}", f"output.path={out}", "input.on_too_long=truncate",
                     "generation.max_new_tokens=4", "cluster.num_replicas=1"))
    rows = pq.read_table(out).to_pylist()
    assert [r["error"] for r in rows] == [None, None]
    assert rows[0]["num_prompt_tokens"] > 2048 and rows[0]["num_generated_tokens"] >= 1
    assert json.loads((out / "_metrics.json").read_text())["rows_truncated"] == 1
    TALLY["bad_input_kinds"].add("too long (truncate)")


def test_truncation_keeps_the_bos_a_tokenizer_puts_first(tmp_path, tiny_llama):
    """Llama, Mistral and Gemma tokenizers start every prompt with BOS: cutting from the left took
    it away, and such a model drifts without it. The cut now comes after the leading special tokens."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    tokenizer = build_tokenizer()  # the tiny model's own vocabulary, now adding <s> first
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
    tokenizer.save_pretrained(model)
    source = write_prompts(tmp_path / "in.parquet", ["word " * 3000, "short"])
    plan = plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}",
                                          f"model.path={model}", "input.on_too_long=truncate",
                                          "generation.max_new_tokens=4")))
    rows = pa.concat_tables(prepare_chunk(chunk, plan.settings) for chunk in plan.chunks)
    whole = load_tokenizer(str(model))("word " * 3000)["input_ids"]
    cut, short = rows[PROMPT_IDS].to_pylist()
    assert whole[0] == tokenizer.bos_token_id and len(whole) > 2048 and rows[ERROR].to_pylist() == [None, None]
    assert cut == [tokenizer.bos_token_id] + whole[-(2048 - 4 - 1):]  # context 2048, 4 new tokens
    assert short[0] == tokenizer.bos_token_id and rows["num_prompt_tokens"].to_pylist()[0] == len(whole)


def test_truncating_the_end_keeps_the_start_and_the_eos_a_tokenizer_puts_last(tmp_path, tiny_llama):
    """input.on_too_long=truncate_end, for embedding long texts as embedding models are trained to read
    them: the start of the prompt, and the special tokens its tokenizer ends it with (the EOS whose hidden
    state a last-token embedding is), with the BOS it begins with; refused for chats, whose end is the turn
    the model answers. input.max_prompt_tokens caps prompts below the context the same way."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    tokenizer = build_tokenizer()  # the tiny model's own vocabulary, now with <s> first and </s> last
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tokenizer.bos_token_id), ("</s>", tokenizer.eos_token_id)])
    tokenizer.save_pretrained(model)
    source = write_prompts(tmp_path / "in.parquet", [" ".join(f"w{i}" for i in range(3000)), "short"])

    def prepared(*overrides):
        plan = plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}",
                                              f"model.path={model}", *overrides)))
        return pa.concat_tables(prepare_chunk(chunk, plan.settings) for chunk in plan.chunks)
    whole = load_tokenizer(str(model))(" ".join(f"w{i}" for i in range(3000)))["input_ids"]
    assert (whole[0], whole[-1]) == (tokenizer.bos_token_id, tokenizer.eos_token_id) and len(whole) > 2048
    rows = prepared("input.on_too_long=truncate_end", "generation.max_new_tokens=0", "generation.embedding=last")
    cut, short = rows[PROMPT_IDS].to_pylist()
    assert cut == whole[:2048 - 1] + [tokenizer.eos_token_id] and rows[ERROR].to_pylist() == [None, None]
    assert short[-1] == tokenizer.eos_token_id and rows["num_prompt_tokens"].to_pylist()[0] == len(whole)
    cut = prepared("input.on_too_long=truncate", "generation.max_new_tokens=4")[PROMPT_IDS].to_pylist()[0]
    assert cut == [tokenizer.bos_token_id] + whole[-(2048 - 4 - 1):]  # truncate: the BOS and the end, as before
    # input.max_prompt_tokens: a cap below the context, cut to as on_too_long says, or an error row
    rows = prepared("input.max_prompt_tokens=100", "input.on_too_long=truncate_end", "generation.max_new_tokens=0",
                    "generation.embedding=last")
    assert rows[PROMPT_IDS].to_pylist() == [whole[:99] + [tokenizer.eos_token_id], short]
    rows = prepared("input.max_prompt_tokens=100")
    assert rows[ERROR].to_pylist() == [f"too long: prompt has {len(whole)} tokens; it exceeds input.max_prompt_tokens="
                                       "100 (input.on_too_long=truncate keeps the end, truncate_end the start)", None]
    with pytest.raises(ConfigError, match="input.on_too_long=truncate_end would cut off the end of a chat"):
        prepared("input.on_too_long=truncate_end", "input.apply_chat_template=true")


def test_truncating_a_chat_drops_its_oldest_turns_and_keeps_the_system_message(tmp_path, tiny_llama):
    """Cutting a rendered chat from the left took its system message and opening away, and left the
    model a conversation that began mid-sentence. Whole turns go now, oldest first, a user turn first."""
    system = {"role": "system", "content": "Be brief."}
    old = [{"role": "user", "content": "word " * 500}, {"role": "assistant", "content": "ok"}]
    recent = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "fine"},
              {"role": "user", "content": "What now?"}]
    # and a long conversation: 41 turns of different lengths, about 3,000 tokens in all
    turns = [{"role": ("user", "assistant")[i % 2], "content": "word " * (40 + i * 37 % 60)} for i in range(41)]
    chats = [[system, *old, *recent], [{"role": "user", "content": "word " * 3000}], [system, *recent],
             [system, *turns]]
    source = write_prompts(tmp_path / "in.parquet", ["x"] * 4, messages=chats)
    plan = plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}",
                                          f"model.path={tiny_llama}", "input.messages_column=messages",
                                          "input.on_too_long=truncate", "generation.max_new_tokens=4")))
    rows = pa.concat_tables(prepare_chunk(chunk, plan.settings) for chunk in plan.chunks)
    tokenizer = load_tokenizer(tiny_llama)

    def ids(messages):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    assert rows[ERROR].to_pylist() == [None] * 4
    dropped, alone, short, long = rows[PROMPT_IDS].to_pylist()
    assert len(ids(chats[0])) > 2048 - 4 >= len(ids([system, *recent]))
    assert dropped == ids([system, *recent]) == short
    # One turn too long on its own is cut like a plain prompt, after its leading special tokens.
    whole = ids(chats[1])
    assert alone == whole[:1] + whole[-(2048 - 4 - 1):] and tokenizer.convert_ids_to_tokens(alone[0]) == "<|user|>"
    assert rows["num_prompt_tokens"].to_pylist()[:3] == [len(ids(chats[0])), len(whole), len(short)]
    # The long one keeps its turns from the first user turn where they fit on.
    first = next(k for k in range(1, 41) if turns[k]["role"] == "user" and len(ids([system, *turns[k:]])) <= 2048 - 4)
    assert first > 2 and long == ids([system, *turns[first:]])


# -- bad jobs: stop before any model loads, one message, nothing touched -------------------------
def corrupt(d):
    (d / "bad.parquet").write_bytes(b"PAR1 this is not really parquet PAR1")
    return d / "bad.parquet"


def truncated(d):
    path = write_prompts(d / "cut.parquet", ["a", "b"])
    path.write_bytes(path.read_bytes()[:-30])
    return path


def corrupt_column(path, row_group: int, column: int):
    """Overwrite one column's pages in one row group: the footer (read when planning) stays intact,
    as when a disk or a copy garbled the data."""
    meta = pq.ParquetFile(path).metadata.row_group(row_group).column(column)
    start = meta.dictionary_page_offset if meta.has_dictionary_page else meta.data_page_offset
    data = bytearray(path.read_bytes())
    data[start:start + meta.total_compressed_size] = b"Z" * meta.total_compressed_size
    path.write_bytes(bytes(data))
    return path


def rows_in_row_groups(path, rows: int, row_group_rows: int):
    pq.write_table(pa.table({"id": range(rows), "prompt": [f"row {i} says hi" for i in range(rows)]}), path,
                   row_group_size=row_group_rows)
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


def one_prompt(d):
    return write_prompts(d / "in.parquet", ["a"])


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


def test_data_that_cannot_be_read_mid_job_stops_it_naming_the_file(tmp_path):
    """Prompts that cannot be read are found only as their chunk is read (the plan reads every
    footer and the ids, not every prompt): the job stops with what is committed and one line that
    names the file, the row group and the column."""
    source = tmp_path / "in"
    source.mkdir()
    rows_in_row_groups(source / "a.parquet", 40, 10)
    corrupt_column(rows_in_row_groups(source / "b.parquet", 40, 10), row_group=3, column=1)
    out = tmp_path / "out"
    done = run_job(tmp_path, f"input.path={source}", f"output.path={out}", "engine=echo", "batching.chunk_rows=10",
                   "cluster.num_replicas=1")
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-3000:]
    stopped, cause = done.stderr.strip().splitlines()[-2:]
    assert re.fullmatch(rf"lmbatch: failed with \d of 8 chunks committed in {out}; fix the cause below and run the "
                        "same command again to resume", stopped), stopped
    assert re.fullmatch(rf"lmbatch: error: a worker failed: JobError: input file {source / 'b.parquet'} cannot be "
                        r"read \(row groups 3, columns id, prompt\): .* \(a corrupt file\? replace or remove it\)",
                        cause), cause
    assert not (out / "_SUCCESS").exists() and "part-00001-000000030.parquet" not in parts(out)
    TALLY["bad_input_kinds"].add("data that cannot be read, found mid-job")


class HangingFileSystem(LocalFileSystem):
    """Local files behind a mount that stops answering: once `hung` is set, opening a file blocks
    until `released` is, as a read from a stale NFS mount blocks."""
    protocol = "hanging"
    hung, released = threading.Event(), threading.Event()

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("hanging://"))

    def _open(self, path, *args, **kwargs):
        if self.hung.is_set():
            self.released.wait()
        return super()._open(path, *args, **kwargs)


def test_a_read_that_hangs_stops_the_job_naming_its_files(tmp_path, tiny_llama):
    """A chunk whose input read does not return within cluster.stall_timeout_s stops the job (Ray
    Data reports the task's error, as for a file that cannot be read, above), naming the files."""
    fsspec.register_implementation("hanging", HangingFileSystem, clobber=True)
    source = write_prompts(tmp_path / "in.parquet", ["a prompt", "another one"])
    plan = plan_job(to_job_config(compose(f"input.path=hanging://{source}", f"output.path={tmp_path / 'out'}",
                                          f"model.path={tiny_llama}", "cluster.num_replicas=1")))
    chunk = plan.chunks[0]
    assert prepare_within(chunk, plan.settings, [], timeout_s=30).equals(prepare_chunk(chunk, plan.settings))
    lmbatch_chunks._open_parquet.cache_clear()  # a prepare worker's process opens the file afresh
    HangingFileSystem.hung.set()
    try:
        with pytest.raises(ReadStalled, match=rf"reading chunk {chunk.id} of the input \(hanging://{source}\) did not "
                                              r"finish within cluster.stall_timeout_s=0.5 s: is its storage hung"):
            prepare_within(chunk, plan.settings, [], timeout_s=0.5)
    finally:
        HangingFileSystem.released.set()
    TALLY["bad_input_kinds"].add("a read that hangs")


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


def test_a_replica_that_cannot_load_the_model_fails_the_job_with_one_line(tmp_path, tiny_llama):
    """Weights that do not fit the config (or a model directory missing on a worker node) pass the
    driver's checks and fail in the replicas: the job ends with what is committed, the cause in one
    line, and exit status 1."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]}))
    out = tmp_path / "out"
    done = run_job(tmp_path, f"input.path={one_prompt(tmp_path)}", f"output.path={out}", f"model.path={model}",
                   "cluster.num_replicas=1")
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-3000:]
    stopped, cause = done.stderr.strip().splitlines()[-2:]
    assert stopped == (f"lmbatch: failed with 0 of 1 chunks committed in {out}; fix the cause below and run the "
                       "same command again to resume")
    assert re.fullmatch(r"lmbatch: error: a replica could not start: "
                        r"RuntimeError: .*ignore_mismatched_sizes.*", cause), cause
    assert not (out / "_SUCCESS").exists()
    TALLY["bad_input_kinds"].add("weights that do not fit the model's config")


def test_a_node_without_the_model_directory_says_so(tmp_path):
    """The driver checks model.path on its own node; a replica on a node that lacks the directory
    names it and the node, instead of transformers taking the path for a hub id."""
    job = to_job_config(compose(f"model.path={tmp_path / 'model'}", f"output.path={tmp_path / 'out'}"))
    with pytest.raises(FileNotFoundError, match=f"model.path {tmp_path / 'model'} does not exist on "
                                                f"{socket.gethostname()}: a local model directory must exist"):
        load_engine(job, "cpu")


def test_a_replica_that_cannot_see_the_output_fails_at_start(tmp_path):
    """On a cluster whose nodes do not share output.path (a local directory on the driver's node),
    parts would be written where the driver never looks, and the job would fail only at its end."""
    job = to_job_config(compose(f"output.path={tmp_path / 'out'}"))
    with pytest.raises(RuntimeError, match=f"output.path {tmp_path / 'out'}, as replica \\S+ sees it, does not hold "
                                           "this job's _lmbatch_job.json.*storage every node shares"):
        Replica(job, str(tmp_path / "out"), ["id"], fingerprint="0123456789abcdef")


def test_a_replica_whose_check_of_the_output_hangs_ends_its_process(tmp_path):
    """A hung mount (a stale NFS handle) blocks a replica's first read of the output, before its model
    load: like a hung load it must end within cluster.load_timeout_s, not keep the job at `replicas
    starting` forever. A named pipe blocks its reader just so, until a writer opens it."""
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "_lmbatch_job.json")
    script = (f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r})\n"
              "from conftest import compose\n"
              "from lmbatch.plan.job import to_job_config\n"
              "from lmbatch.replica.actor import Replica\n"
              f"job = to_job_config(compose('output.path={out}', 'cluster.load_timeout_s=2'))\n"
              f"Replica(job, {str(out)!r}, ['id'], fingerprint='0123456789abcdef')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Timeout (0:00:02)!" in done.stderr, done.stderr[-3000:]
    assert "check_shared" in done.stderr  # the stack printed says where it hung


def snapshot(directory):
    return {p: (os.stat(os.path.join(directory, p)).st_mtime_ns, os.path.getsize(os.path.join(directory, p)))
            for p in os.listdir(directory)}


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


def test_labels_without_the_space_a_model_writes_are_noted(tmp_path, capsys):
    """generation.choices=[the] after "Answer:": the tiny tokenizer spells " the" in one token and
    "the" in two, so the model would be forced into unlikely tokens. The job says so, and is quiet
    for " the", and for a template that ends in a space."""
    source = one_prompt(tmp_path)
    for choices, template, noted in [("[the,a]", "Q: {prompt} Answer:", True), ('[" the"," a"]', "Q: {prompt} Answer:",
                                      False), ("[the,a]", "Q: {prompt} Answer: ", False)]:
        plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}",
                                       f"generation.choices={choices}", f"input.template='{template}'")))
        said = capsys.readouterr().out
        assert ("lmbatch: note: generation.choices holds 'the', which the model's tokens spell in 2 but ' the' in 1"
                in said) == noted, (choices, template, said)


def test_an_adapter_is_part_of_the_job_and_of_the_model_it_checks(tmp_path, tiny_llama, tiny_gpt2):
    """model.adapter makes another job (fingerprint), an adapter retrained in place is another model
    (a partial output is not resumed with it), and an adapter given as model.path is named as one."""
    adapter = save_lora_adapter(tiny_llama, tmp_path / "adapter", seed=0)
    source = one_prompt(tmp_path)
    out = tmp_path / "out"

    def plan(*extra):
        return plan_job(to_job_config(compose(f"input.path={source}", f"output.path={out}", f"model.path={tiny_llama}",
                                              *extra)))
    with_adapter = plan(f"model.adapter={adapter}")
    assert with_adapter.fingerprint != plan().fingerprint
    assert with_adapter.model_identity == f"{model_identity(tiny_llama)} with adapter {model_identity(str(adapter))}"
    with_adapter.begin_output()  # a run that died before its first part
    save_lora_adapter(tiny_llama, adapter, seed=1)  # retrained in place
    with pytest.raises(JobError, match="holds part of this job made with other model files than model.path holds now"):
        plan(f"model.adapter={adapter}")
    said = (f"model.path {adapter} holds a PEFT adapter, not a model: set model.path to the model it was fine-tuned "
            f"from (its adapter_config.json names {tiny_llama}) and model.adapter={adapter}")
    with pytest.raises(JobError, match=f"^{re.escape(said)}$"):
        plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'other'}",
                                       f"model.path={adapter}")))
    # An adapter fine-tuned from another model: one with other layers, one with wider ones.
    with pytest.raises(JobError, match=f"^model.adapter {adapter} does not fit model.path: Target modules .* not "
                                       "found in the base model"):
        plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'other'}",
                                       f"model.path={tiny_gpt2}", f"model.adapter={adapter}")))
    config = AutoConfig.from_pretrained(tiny_llama)
    config.hidden_size *= 2
    wider = save_lora_adapter(AutoModelForCausalLM.from_config(config), tmp_path / "wider", seed=0)
    with pytest.raises(JobError, match=r"does not fit model.path: 4 of its 8 tensors have other shapes than the "
                                       r"model's layers give them \(base_model.model.model.layers.0.self_attn.q_proj."
                                       r"lora_A.weight: \[4, 128\] in the adapter, \[4, 64\] for the model\)"):
        plan(f"model.adapter={wider}")

    from peft import PromptTuningConfig

    PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4).save_pretrained(tmp_path / "prompt-tuning")
    with pytest.raises(JobError, match="is a PROMPT_TUNING adapter, which does not merge into the weights"):
        plan(f"model.adapter={tmp_path / 'prompt-tuning'}")
    TALLY["bad_input_kinds"].update(["an adapter retrained during a job", "an adapter as model.path",
                                     "an adapter that does not merge"])


def test_several_adapters_are_part_of_the_job_and_checked_each(tmp_path, tiny_llama):
    """model.adapters: each is checked as model.adapter is, names the job (fingerprint) and the model it is
    made with (identity), must share the model's tokenizer, and is what generation.adapter names."""
    first, second = (save_lora_adapter(tiny_llama, tmp_path / name, seed=s) for s, name in enumerate(["a", "b"]))
    source = one_prompt(tmp_path)

    def plan(*extra):
        return plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}",
                                              f"model.path={tiny_llama}", *extra)))
    both = plan(f"+model.adapters.first={first}", f"+model.adapters.second={second}")  # as the README adds them
    assert both.job.model.adapters == {"first": str(first), "second": str(second)}
    assert both.model_identity == (f"{model_identity(tiny_llama)} with adapters first {model_identity(str(first))}, "
                                   f"second {model_identity(str(second))}")
    assert len({plan().fingerprint, both.fingerprint, plan(f"+model.adapters.first={first}").fingerprint,
                plan(f"+model.adapters.first={first}", "generation.adapter=first").fingerprint}) == 4
    with pytest.raises(JobError, match=f"^model.adapters.other {tmp_path} holds no adapter_config.json"):
        plan(f"++model.adapters={{first: {first}, other: {tmp_path}}}")  # a mapping at once
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = THINKING_CHAT_TEMPLATE
    tokenizer.save_pretrained(second)
    with pytest.raises(JobError, match=f"^model.adapters.second {second} holds a tokenizer whose chat template differs "
                                       "from model.path's"):
        plan(f"+model.adapters.first={first}", f"+model.adapters.second={second}", "input.apply_chat_template=true")
    # a chat template that renders no prompt does not matter: plain prompts, or the job's own template
    (tmp_path / "own.jinja").write_text("{{ messages[0]['content'] }}")
    for own in ([], ["input.apply_chat_template=true", f"input.chat_template={tmp_path / 'own.jinja'}"]):
        plan(f"+model.adapters.first={first}", f"+model.adapters.second={second}", *own)
    for overrides, message in [(["generation.adapter=third", f"+model.adapters.first={first}"],
                                "generation.adapter=third is not one of model.adapters (first)"),
                               (["generation.adapter=first"], "generation.adapter=first is not one of model.adapters, "
                                                              "which names none"),
                               (["input.param_columns=[adapter]"], "input.param_columns names adapter, but "
                                                                   "model.adapters names none"),
                               ([f"model.adapter={first}", f"+model.adapters.first={first}"],
                                "model.adapter and model.adapters: set one")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            plan(*overrides)


def test_embedding_settings_are_checked_against_the_model(tmp_path, tiny_llama, capsys):
    """generation.embedding and the keys that shape it name the job (its fingerprint), the others only with
    it; embedding_dimensions beyond the model's hidden size stops the job as it plans; a model saved without
    its LM head (an embedding model) is warned of when it generates texts, not when it only embeds; the dry
    run of a job that only embeds speaks of no decode steps or KV cache."""
    headless, source = save_headless(tiny_llama, tmp_path / "headless"), one_prompt(tmp_path)

    def plan(*extra):
        return plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}", *extra)))
    with pytest.raises(JobError, match=re.escape(f"generation.embedding_dimensions=65 exceeds the 64 dimensions of "
                                                 f"{tiny_llama}'s hidden states")):
        plan(f"model.path={tiny_llama}", "generation.embedding=last", "generation.embedding_dimensions=65")
    embedded = [plan(f"model.path={tiny_llama}", *extra).fingerprint for extra in [
        (), ("generation.embedding=last",), ("generation.embedding=mean",),
        ("generation.embedding=last", "generation.embedding_dimensions=64"),
        ("generation.embedding=last", "generation.embedding_normalize=false")]]
    assert len(set(embedded)) == 5  # each is another job; and without embedding, its other keys change nothing:
    assert plan(f"model.path={tiny_llama}", "generation.embedding_normalize=false").fingerprint == embedded[0]
    plan(f"model.path={headless}")
    assert f"warning: {headless} is a LlamaModel, saved without a language-model head" in capsys.readouterr().out
    embedding_alone = plan(f"model.path={headless}", "generation.max_new_tokens=0", "generation.embedding=last")
    plan(f"model.path={tiny_llama}")
    assert "language-model head" not in capsys.readouterr().out
    dry_run(embedding_alone)  # says what such a job computes: no decode steps, no KV cache
    said = capsys.readouterr().out
    assert "nothing is generated: each micro-batch is one forward pass over its prompts" in said
    assert "decode steps" not in said and "KV cache" not in said


def test_an_encoder_only_embeds_and_its_sentence_transformers_pipeline_is_compared(tmp_path, tiny_llama, tiny_bert,
                                                                                  tiny_roberta, capsys):
    """An encoder (BERT, RoBERTa) is refused for anything but embedding, as the job plans; `cls` pooling is
    refused for a decoder; an encoder's context is its tokenizer's length (RoBERTa's 514 positions hold 512
    tokens); a sentence-transformers model whose own pipeline pools otherwise, adds a Dense module, normalizes
    otherwise, cuts texts shorter (as a newer or an older version saves it), puts a default prompt before each
    text or pools without a prompt's tokens is warned of, and one that matches is not."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

    source = one_prompt(tmp_path)

    def plan(model, *extra):
        return plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}",
                                              f"model.path={model}", *extra)))
    embed = ("generation.max_new_tokens=0", "generation.embedding=cls")
    with pytest.raises(JobError, match=re.escape(f"{tiny_bert} is an encoder (BertModel): it reads text both ways, "
                                                 "so it embeds but cannot generate or score text: set "
                                                 "generation.max_new_tokens=0 and generation.embedding=cls or mean")):
        plan(tiny_bert)
    with pytest.raises(JobError, match=r", without generation.prompt_logprobs, without generation.logprobs$"):
        plan(tiny_bert, *embed, "generation.prompt_logprobs=true", "generation.logprobs=true")
    with pytest.raises(JobError, match=re.escape("generation.embedding=cls pools the first token, which in a decoder "
                                                 "(LlamaForCausalLM) has seen nothing after it")):
        plan(tiny_llama, *embed)
    assert plan(tiny_roberta, *embed).settings.context_limit == plan(tiny_bert, *embed).settings.context_limit == 512
    assert AutoConfig.from_pretrained(tiny_roberta).max_position_embeddings == 513
    assert "warning" not in capsys.readouterr().out

    modules = [Transformer(tiny_bert), Pooling(64, pooling_mode="cls"), Normalize()]
    SentenceTransformer(modules=modules).save(str(tmp_path / "st"))
    SentenceTransformer(modules=[*modules[:2], Dense(64, 32), Normalize()]).save(str(tmp_path / "dense"))
    plan(tmp_path / "st", *embed)
    assert "warning" not in capsys.readouterr().out
    plan(tmp_path / "dense", "generation.max_new_tokens=0", "generation.embedding=mean",
         "generation.embedding_normalize=false")
    assert (f"warning: {tmp_path / 'dense'} is a sentence-transformers model whose own pipeline (modules.json) "
            "differs from this job's, so its vectors will differ from its encode(): it pools by cls "
            "(generation.embedding=cls); it has a Dense module, which lmbatch does not apply; it normalizes its "
            "vectors (generation.embedding_normalize=true)") in capsys.readouterr().out
    # as versions before 6 save it (all-MiniLM-L6-v2's files): pooling flags, and the length it embeds at
    (tmp_path / "st" / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    (tmp_path / "st" / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256}))
    plan(tmp_path / "st", *embed)
    assert ("its encode(): it pools by mean_tokens (generation.embedding=mean); it embeds at most 256 tokens (its "
            "max_seq_length: input.max_prompt_tokens=256 input.on_too_long=truncate_end cuts as it does)"
            ) in capsys.readouterr().out
    plan(tmp_path / "st", "generation.max_new_tokens=0", "generation.embedding=mean", "input.max_prompt_tokens=256")
    assert "warning" not in capsys.readouterr().out
    # E5-style: a prompt its encode() puts before every text, and pooling that leaves the prompt's tokens out
    modules = [Transformer(tiny_bert), Pooling(64, pooling_mode="mean", include_prompt=False), Normalize()]
    prompted = SentenceTransformer(modules=modules, prompts={"query": "query: {x} ", "passage": "passage: "},
                                   default_prompt_name="query")
    prompted.save(str(tmp_path / "prompted"))
    assert prompted.encode("a").tolist() != prompted.encode("query: {x} a", prompt="").tolist()
    prompted[1].include_prompt = True  # pooled over prompt and text, as lmbatch pools the templated text
    assert prompted.encode("a").tolist() == prompted.encode("query: {x} a", prompt="").tolist()
    embed = ("generation.max_new_tokens=0", "generation.embedding=mean")
    write_prompts(source, ["a"], text=["a"])
    plan(tmp_path / "prompted", *embed, "input.prompt_column=text")
    assert ("its encode(): it pools without the tokens of its prompt, which lmbatch pools with; it puts "
            "\"query: {x} \" before every text (its default_prompt_name, query): "
            "'input.template=\"query: {{x}} {text}\"' does as it does") in capsys.readouterr().out
    templated = plan(tmp_path / "prompted", *embed, "input.prompt_column=text", "input.template='query: {{x}} {text}'")
    assert capsys.readouterr().out.endswith("encode(): it pools without the tokens of its prompt, which lmbatch pools "
                                           "with\n")  # and no more
    assert row_prompt({"id": 0, "text": "a"}, templated.settings) == "query: {x} a"  # the text encode() embeds


def test_a_classifier_only_classifies(tmp_path, tiny_llama, tiny_bert):
    """A classifier (a *ForSequenceClassification) is refused for anything but classifying (and embedding
    beside), and generation.classify for a model that is not one; classify names another job."""
    classifier, source = save_classifier(tiny_bert, tmp_path / "classifier", ["no", "yes"]), one_prompt(tmp_path)

    def plan(model, *extra):
        return plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}",
                                              f"model.path={model}", *extra)))
    with pytest.raises(JobError, match=re.escape(f"{classifier} is a classifier (BertForSequenceClassification): its "
                                                 "head labels text, and it cannot generate or score text: set "
                                                 "generation.classify=true and generation.max_new_tokens=0")):
        plan(classifier)
    with pytest.raises(JobError, match=r"max_new_tokens=0, without generation.prompt_logprobs$"):
        plan(classifier, "generation.max_new_tokens=0", "generation.classify=true", "generation.prompt_logprobs=true")
    for model, name in [(tiny_llama, "LlamaForCausalLM"), (tiny_bert, "BertModel")]:
        with pytest.raises(JobError, match=re.escape(f"generation.classify needs a classifier (a fine-tuned "
                                                     f"*ForSequenceClassification), and {model} is a {name}")):
            plan(model, "generation.max_new_tokens=0", "generation.classify=true")
    classifying = plan(classifier, "generation.max_new_tokens=0", "generation.classify=true")
    both = plan(classifier, "generation.max_new_tokens=0", "generation.classify=true", "generation.embedding=cls")
    assert classifying.settings.context_limit == 512 and classifying.fingerprint != both.fingerprint
    with pytest.raises(ConfigError, match="or generation.classify: score, embed or classify the prompts"):
        plan(classifier, "generation.max_new_tokens=0")
    # input.pair_column: a second text read with each prompt, by an encoder only; part of the job
    write_prompts(source, ["a"], passage=["b"])
    pairs = plan(classifier, "generation.max_new_tokens=0", "generation.classify=true", "input.pair_column=passage")
    assert pairs.fingerprint != classifying.fingerprint and "passage" in pairs.settings.row_columns
    with pytest.raises(JobError, match=re.escape(f"input.pair_column is read by encoders (cross-encoders, NLI "
                                                 f"classifiers), which tell a pair's texts apart; {tiny_llama} is a "
                                                 "decoder (LlamaForCausalLM)")):
        plan(tiny_llama, "generation.max_new_tokens=0", "generation.embedding=last", "input.pair_column=passage")
    with pytest.raises(JobError, match="has no column 'hypothesis'"):
        plan(classifier, "generation.max_new_tokens=0", "generation.classify=true", "input.pair_column=hypothesis")


def test_a_cross_encoder_that_gives_its_logits_is_warned_of(tmp_path, tiny_bert, capsys):
    """sentence-transformers' CrossEncoder.predict scores through the activation a reranker's config names:
    ms-marco-MiniLM's names Identity (the logits), where label_scores, as transformers' pipeline gives them, go
    through a sigmoid. The job warns, with the relation between the two, which predict() and the pipeline bear
    out; a config that names none (predict() then applies a sigmoid too) is not warned of."""
    from sentence_transformers import CrossEncoder
    from transformers import pipeline

    reranker = save_classifier(tiny_bert, tmp_path / "reranker", ["relevance"])
    config = json.loads((tmp_path / "reranker" / "config.json").read_text())
    source = write_prompts(tmp_path / "in.parquet", ["a query"], passage=["a passage"])
    job = to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}", f"model.path={reranker}",
                                "experiment=classify", "input.pair_column=passage"))
    plan_job(job)
    assert "warning" not in capsys.readouterr().out
    identity = "torch.nn.modules.linear.Identity"
    for saved in ({"sentence_transformers": {"activation_fn": identity}},  # sentence-transformers 4 and later
                  {"sbert_ce_default_activation_function": identity}):  # before
        (tmp_path / "reranker" / "config.json").write_text(json.dumps({**config, **saved}))
        plan_job(job)
        assert (f"warning: {reranker} is a sentence-transformers cross-encoder whose predict() gives its scores "
                "through identity (the logits: ln(p / (1 - p)) of a label score p), which rank alike; label_scores "
                "go through sigmoid, as transformers' text-classification pipeline gives them"
                ) in capsys.readouterr().out
        p = pipeline("text-classification", model=reranker, top_k=None, device="cpu")(
            {"text": "a query", "text_pair": "a passage"})[0]["score"]
        logit = CrossEncoder(reranker, device="cpu").predict([("a query", "a passage")])[0]
        assert logit == pytest.approx(math.log(p / (1 - p)), rel=1e-4, abs=1e-5)


def test_a_pair_is_tokenized_as_the_tokenizer_joins_one_and_cut_at_its_second_texts_end(tmp_path, tiny_bert):
    """input.pair_column: each prompt and its row's second text are one pair, as the tokenizer joins it
    ([CLS] query [SEP] passage [SEP]); with on_too_long=truncate_end a long pair keeps the query whole and
    loses the end of the passage, as the tokenizer's only_second truncation cuts it, and a query that leaves no
    room for the passage is an error row (the tokenizer refuses it); so is a null or empty second text. Where the
    passage begins is noted for the token types, a [SEP] typed into the query being the query's."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    queries = ["what is a cat", "why", "how", "who", "what " * 29, "what " * 28, "what [SEP] is a cat",
               "why [SEP] " + "what " * 28]
    passages = ["word " * 100, "because", None, "  ", "b", "b", "word " * 100, "b"]
    source = write_prompts(tmp_path / "in.parquet", queries, passage=passages)
    plan = plan_job(to_job_config(compose(
        f"input.path={source}", f"output.path={tmp_path / 'out'}", f"model.path={tiny_bert}", "experiment=embed",
        "generation.embedding=cls", "input.pair_column=passage", "input.max_prompt_tokens=32",
        "input.on_too_long=truncate_end")))
    rows = pa.concat_tables(prepare_chunk(chunk, plan.settings) for chunk in plan.chunks)
    cut = {i: tokenizer(q, p, truncation="only_second", max_length=32)
           for i, (q, p) in enumerate(zip(queries, passages)) if i in (0, 1, 5, 6)}
    assert {i: rows[PROMPT_IDS][i].as_py() for i in cut} == {i: c["input_ids"] for i, c in cut.items()}
    assert {i: rows[SECOND_TEXT][i].as_py() for i in cut} == {i: c["token_type_ids"].index(1) for i, c in cut.items()}
    too_long = ("too long: pair has {} tokens; it exceeds input.max_prompt_tokens=32, and its first text takes {} of "
                "the 32 tokens it may have (input.on_too_long=truncate_end cuts the second text only)")
    assert rows[ERROR].to_pylist() == [None, None, "null pair: column 'passage' is null",
                                       "empty pair: column 'passage' is empty or whitespace", too_long.format(33, 31),
                                       None, None, too_long.format(34, 32)]
    with pytest.raises(Exception, match="Sequence to truncate too short"):  # as the tokenizer refuses it
        tokenizer(queries[4], "b b", truncation="only_second", max_length=32)


def test_an_adapter_with_a_tokenizer_of_its_own_is_read_with_it(tmp_path, tiny_llama):
    """A fine-tune that set a chat template saves its tokenizer beside the adapter (TRL's trainers do):
    the job checks, renders and decodes with that one, in the plan, the prepare step and the replica."""
    adapter = save_lora_adapter(tiny_llama, tmp_path / "adapter", seed=0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = THINKING_CHAT_TEMPLATE
    tokenizer.save_pretrained(adapter)
    source = write_prompts(tmp_path / "in.parquet", ["what is two and two?"])
    # enable_thinking: a variable only the adapter's template reads
    plan = plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}",
                                          f"model.path={tiny_llama}", f"model.adapter={adapter}",
                                          "+input.chat_template_kwargs.enable_thinking=false")))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "what is two and two?"}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
    assert "<think>" in text
    ids = prepare_chunk(plan.chunks[0], plan.settings)[PROMPT_IDS].to_pylist()
    assert ids == [tokenizer(text, add_special_tokens=False)["input_ids"]]
    engine = HFEngine.load(tiny_llama, plan.job.model, BatchingConfig(), device="cpu")
    assert engine.tokenizer.chat_template == THINKING_CHAT_TEMPLATE


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
from lmbatch.plan import plan_job
from lmbatch.replica import load_engine
from lmbatch.tokens import load_tokenizer

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


def test_the_commit_check_counts_every_part_and_fails_on_a_short_or_missing_one(tmp_path, tiny_llama):
    """The check before _SUCCESS, on parts written by hand: rows and error rows are counted over
    every chunk's part; a part holding a row too few, or no part, fails the commit."""
    source = write_prompts(tmp_path / "in.parquet", [f"prompt {i}" for i in range(10)])
    out = tmp_path / "out"
    plan = plan_job(to_job_config(compose(f"input.path={source}", f"output.path={out}", f"model.path={tiny_llama}",
                                          "batching.chunk_rows=4", "cluster.num_replicas=1")))
    plan.begin_output()
    for chunk in plan.chunks:
        plan.output.write_part(chunk.id, pa.table({"error": [None] * (chunk.num_rows - 1) + ["too long: ..."]}))
    assert count_committed(plan) == {"rows": 10, "rows_ok": 7, "rows_error": 3, "rows_error_by_kind": {"too long": 3},
                                     "parts": 3}
    last = plan.chunks[-1]
    plan.output.write_part(last.id, pa.table({"error": pa.array([None] * (last.num_rows - 1), pa.string())}))
    with pytest.raises(JobFailed, match=f"parts of chunk {last.id} hold {last.num_rows - 1} rows, expected "
                                        f"{last.num_rows}: delete {out / part_name(last.id)} and run"):
        count_committed(plan)
    os.remove(out / part_name(last.id))
    with pytest.raises(JobFailed, match=f"parts for chunks \\['{last.id}'\\] are missing"):
        count_committed(plan)


# -- faults during the run ------------------------------------------------------------------------
def replica_pids(root_pid):
    found = []
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            if "Replica" in " ".join(p.cmdline()) or "Replica" in p.name():
                found.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def test_a_killed_replica_is_replaced_and_nothing_is_lost(tmp_path, long_input):
    path, ids = long_input
    out = tmp_path / "out"
    proc = start_job(tmp_path, *slow_job(path, out))
    wait_for_parts(out, 3, proc)
    victims = replica_pids(proc.pid)
    assert len(victims) == 2
    os.kill(victims[0], signal.SIGKILL)
    TALLY["faults"] += 1
    killed_at = len(parts(out))
    replacement = None
    deadline = time.time() + 120
    while replacement is None and proc.poll() is None and time.time() < deadline:
        replacement = next((p for p in replica_pids(proc.pid) if p not in victims), None)
        time.sleep(0.1)
    finish(proc)
    assert killed_at < 50
    assert replacement is not None, "no replica process replaced the killed one"
    assert account(out, ids) == (0, 0)


def test_a_lost_node_is_survived(tmp_path, long_input):
    from ray.cluster_utils import Cluster

    path, ids = long_input
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    worker = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    try:
        out = tmp_path / "out"
        proc = start_job(tmp_path, *slow_job(path, out, "cluster.cpus_per_replica=0.25", "cluster.prepare_cpus=0.2"),
                         env={"RAY_ADDRESS": cluster.address})
        wait_for_parts(out, 3, proc)
        cluster.remove_node(worker, allow_graceful=False)  # SIGKILLs the node's raylet and every worker on it
        TALLY["faults"] += 1
        finish(proc)
        assert account(out, ids) == (0, 0)
    finally:
        cluster.shutdown()


def llama_with_remote_code(tiny_llama, directory, model_class: str):
    """tiny_llama whose model class is `model_class`'s source, a subclass `RemoteLlama` of
    LlamaForCausalLM, as remote code (the job needs model.trust_remote_code=true)."""
    model = directory / "remote-code-model"
    shutil.copytree(tiny_llama, model)
    (model / "modeling_remote.py").write_text("import ctypes, time\nfrom transformers import LlamaForCausalLM\n"
                                              + model_class)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_remote.RemoteLlama"}
    (model / "config.json").write_text(json.dumps(config))
    return model


def failing_model(tiny_llama, directory, crash_on: int, hang_on: int):
    """tiny_llama that, on a prompt holding token `crash_on`, segfaults as a bug in native code
    would, and on one holding `hang_on` hangs: rows that kill or stall whichever process generates them."""
    return llama_with_remote_code(tiny_llama, directory, f"""
class RemoteLlama(LlamaForCausalLM):
    def forward(self, input_ids=None, **kwargs):
        if input_ids.shape[1] > 1:  # a prompt's prefill
            if ({crash_on} == input_ids).any():
                ctypes.string_at(0)
            if ({hang_on} == input_ids).any():
                time.sleep(3600)
        return super().forward(input_ids=input_ids, **kwargs)
""")


def test_replicas_that_die_or_hang_loading_the_model_stop_the_job(tmp_path, tiny_llama):
    """A replica process that dies as it loads the model (killed for memory: each replica loads a
    copy; here a segfault) is restarted by Ray without end, and one whose load hangs (a hung mount
    or download) is never restarted: either way the job would wait forever with `replicas
    starting: 0/1 ready`. Here the first load crashes and the next hangs past
    cluster.load_timeout_s (15 s: above the imports a load begins with, which took over 3 s here); after
    these 2 deaths in a row, with no replica loaded, the job stops."""
    crashed_once = tmp_path / "crashed-once"
    model = llama_with_remote_code(tiny_llama, tmp_path, f"""
class RemoteLlama(LlamaForCausalLM):
    def __init__(self, config):
        import os
        if not os.path.exists({str(crashed_once)!r}):
            open({str(crashed_once)!r}, "w").close()
            ctypes.string_at(0)
        time.sleep(3600)
""")
    out = tmp_path / "out"
    done = run_job(tmp_path, f"input.path={one_prompt(tmp_path)}", f"output.path={out}", f"model.path={model}",
                   "model.trust_remote_code=true", "cluster.num_replicas=1", "cluster.load_timeout_s=15",
                   env={"HF_MODULES_CACHE": str(tmp_path / "hf-modules")})
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-3000:]
    assert crashed_once.exists(), done.stderr[-5000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "lmbatch: error: a replica could not start: RuntimeError: replica processes died 2 times in a row loading "
        "the model, and no replica has it loaded: killed for memory (each replica loads its own copy of the model: "
        "fewer cluster.num_replicas, a smaller model.dtype or nodes with more memory), a crash in native code or a "
        "load that hung past cluster.load_timeout_s; the replica logs above say why")
    TALLY["faults"] += 2
    TALLY["bad_input_kinds"].update(["a model that kills the process loading it", "a model load that hangs"])


def test_deaths_while_loading_are_counted_per_replica_and_stop_only_a_job_with_none_loaded():
    """The counts behind the test above. While another replica has the model loaded the job goes on
    (Ray Data gives it the chunks) and the dying replica is only warned of."""
    live = LiveChunks()
    assert live.start_load("a") == (0, 0) and live.start_load("b") == (0, 0)
    assert live.start_load("a") == (1, 0)  # its process died loading: Ray started it again
    check_load_deaths(1, 0)
    live.replica_ready("b")
    assert live.start_load("a") == (2, 1)
    check_load_deaths(2, 1)  # b generates meanwhile
    live.start_load("b")  # b's process died generating: it loads again
    deaths, ready = live.start_load("a")
    with pytest.raises(RuntimeError, match="died 3 times in a row loading the model, and no replica has it"):
        check_load_deaths(deaths, ready)
    live.replica_ready("a")
    assert live.start_load("a") == (0, 0)  # a count of deaths in a row
    assert live.snapshot()[1] == 0


def test_rows_that_kill_or_stall_their_process_become_error_rows(tmp_path, short_tmp_path, tiny_llama):
    """Ray retries a chunk whose replica died on a fresh replica, without end: a row that kills every
    process that generates it (here a segfault) would loop forever, and one that hangs (a hung GPU
    kernel) would stall the job. The stall watchdog ends a process with no micro-batch done for
    cluster.stall_timeout_s. After two deaths on a chunk it is generated a row at a time, so each
    further death names a row, which the next replica writes as an error row."""
    prompts = [f"row {i} says hello" for i in range(12)]
    prompts[5] = "row 5 holds <|system|> in its text"
    prompts[6] = "row 6 holds <|user|> in its text"
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = failing_model(tiny_llama, tmp_path, crash_on=tokenizer.convert_tokens_to_ids("<|system|>"),
                          hang_on=tokenizer.convert_tokens_to_ids("<|user|>"))
    out = tmp_path / "out"
    # The replicas' own logs (RAY_TMPDIR): Ray forwards a dying worker's last lines to the driver's
    # output only at times (a CI run saw 2 of its 3 segfaults there).
    log = finish(start_job(tmp_path, f"input.path={write_prompts(tmp_path / 'in.parquet', prompts)}",
                           f"output.path={out}", f"model.path={model}", "model.trust_remote_code=true",
                           "batching.chunk_rows=4", "cluster.num_replicas=1", "cluster.stall_timeout_s=8",
                           "generation.max_new_tokens=4",
                           env={"HF_MODULES_CACHE": str(tmp_path / "hf-modules"), "RAY_TMPDIR": str(short_tmp_path)}))
    replica_logs = "".join(p.read_text(errors="replace")
                           for p in short_tmp_path.glob("ray/session_latest/logs/**/worker-*.err"))
    TALLY["faults"] += 4
    TALLY["bad_input_kinds"].update(["row that kills its process", "row that hangs its process"])
    # Rows 5 and 6 share a chunk: two deaths on it (the segfault comes first), then one for each row alone.
    assert (replica_logs.count("Fatal Python error: Segmentation fault") == 3
            and replica_logs.count("Timeout (0:00:08)!") == 1), log[-4000:]
    assert ("chunk 00000-000000004: 2 replica processes died generating it; generating its rows one at a time"
            in replica_logs)
    assert account(out, range(12)) == (0, 0)
    assert "12/12 rows (100%) | " in log and "| 4 chunks restarted" in log  # the progress line
    assert "chunks restarted           4 (their replica process died: see the log)" in log  # the summary
    assert json.loads((out / "_metrics.json").read_text())["chunk_restarts"] == 4
    rows = pq.read_table(out).sort_by("id").to_pylist()
    for row in rows[5:7]:
        assert row["error"] == CRASHED and row["finish_reason"] == "error"
    for row in rows[:5] + rows[7:]:
        assert row["generated_text"] == oracle(tiny_llama, row["prompt"], 4), row["id"]


def test_deaths_on_a_chunk_are_counted_across_processes_and_bounded():
    """The counts behind the test above, which LiveChunks keeps for the replicas (it outlives them)."""
    live = LiveChunks()
    assert live.start_chunk("a") == (0, []) and live.start_chunk("b") == (0, [])
    assert live.start_chunk("a") == (1, [])  # its process died: Ray started it again
    live.row_started("a", 3)  # generated alone; the process dies on it
    assert live.start_chunk("a") == (2, [3])
    live.row_started("a", 4)
    live.row_started("a", None)  # all rows done, then the process died writing the part: no row to blame
    assert live.start_chunk("a") == (3, [3])
    assert [isolating("a", deaths) for deaths in range(DEATHS_BEFORE_ISOLATING + CRASHING_ROWS_PER_CHUNK + 1)] == (
        [False] * DEATHS_BEFORE_ISOLATING + [True] * (CRASHING_ROWS_PER_CHUNK + 1))
    with pytest.raises(RuntimeError, match="chunk a: 9 replica processes died generating it, 7 of them on its rows "
                                           "alone; so many point at the node or the model"):
        isolating("a", DEATHS_BEFORE_ISOLATING + CRASHING_ROWS_PER_CHUNK + 1)


def engine_short_of_memory(model_path, rows, batching):
    """An engine whose model raises torch.OutOfMemoryError for batches above 3 rows; its requests, and
    their texts as generated before the limit was injected."""
    engine = HFEngine.load(model_path, ModelConfig(path=model_path), batching, device="cpu")
    requests = [Request(i, engine.tokenizer(p)["input_ids"], 6) for i, p in enumerate(varied_prompts(rows, max_words=20))]
    expected = {c.key: c.text for c in engine.generate(requests)}
    forward = engine.model.forward

    def forward_with_small_memory(*args, **kwargs):
        if kwargs["input_ids"].shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return forward(*args, **kwargs)

    engine.model.forward = forward_with_small_memory
    TALLY["faults"] += 1
    return engine, requests, expected


def test_out_of_memory_halves_the_micro_batch_and_retries(tiny_llama, caplog):
    """Batches above 3 rows run out of memory: halved until they fit, output unchanged."""
    engine, requests, expected = engine_short_of_memory(tiny_llama, 12, BatchingConfig(min_padding_efficiency=0.0))
    assert engine.stats.micro_batches == 1
    with caplog.at_level("WARNING", logger="lmbatch.engine"):
        got = engine.generate(requests)
    assert {c.key: c.text for c in got} == expected and all(c.error is None for c in got)
    assert engine.stats.split_retries == 3  # 12 -> 6 + 6 -> 3 + 3 + 3 + 3
    assert any("out of memory" in r.getMessage() for r in caplog.records)


def test_out_of_memory_shrinks_the_budget_of_later_micro_batches(tiny_llama):
    """A token budget too large for the device costs one failed micro-batch, not one per micro-batch:
    after the first out-of-memory error the rest is planned under half the failed batch's size, and
    so is the next chunk (the budget belongs to the replica)."""
    engine, requests, expected = engine_short_of_memory(
        tiny_llama, 24, BatchingConfig(max_batch_rows=8, min_padding_efficiency=0.0, min_decode_efficiency=0.0))
    assert engine.stats.micro_batches == 3
    splits_after_each_batch = []
    got = engine.generate(requests, lambda done: splits_after_each_batch.append(engine.stats.split_retries))
    assert {c.key: c.text for c in got} == expected and all(c.error is None for c in got)
    first = splits_after_each_batch[0]
    assert first > 0 and set(splits_after_each_batch) == {first}  # only the first micro-batch failed
    assert engine.batching.max_batch_tokens < BatchingConfig().max_batch_tokens
    engine.generate(requests)
    assert engine.stats.split_retries == first  # the next chunk: planned to fit from the start


def test_a_lost_device_stops_the_replica_instead_of_failing_every_row(tiny_llama):
    """After CUDA's sticky errors (an illegal memory access, a device-side assert) every later call
    fails, so isolating rows would write each one, to the end of the job, as an error row. The
    engine asks the device whether it still works, and stops if it does not. (No GPU here: the
    error is raised in the model's forward and the device answers as a CUDA device would then.)"""
    engine = HFEngine.load(tiny_llama, ModelConfig(path=tiny_llama), BatchingConfig(), device="cpu")
    requests = [Request(i, engine.tokenizer(p)["input_ids"], 4) for i, p in enumerate(varied_prompts(6, max_words=8))]

    def forward_after_an_illegal_access(*args, **kwargs):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered\nCompile with ...")

    engine.model.forward = forward_after_an_illegal_access
    failed = engine.generate(requests)  # the device still works: the failure is isolated, row by row
    assert {c.error for c in failed} == {"generation failed: AcceleratorError: CUDA error: an illegal memory access "
                                         "was encountered\nCompile with ..."}
    engine._device_lost = lambda: True
    with pytest.raises(EngineFailed, match="the cpu device failed and this process can no longer use it "
                                         r"\(AcceleratorError: CUDA error: an illegal memory access was encountered\); "
                                         "the job stops rather than write every later row as an error row"):
        engine.generate(requests)
    TALLY["faults"] += 1


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


def test_a_model_that_fails_on_every_row_stops_the_job(tiny_llama, tmp_path, capsys):
    """A broken model fails every row: here a tokenizer that does not match it (tokens added past
    the model's embedding; remote code that no longer fits transformers fails alike). Rather than
    write the whole job as error rows and exit 0, the engine stops once rows have failed alone many
    times and none has succeeded. (This mismatch the driver also warns of as the job starts.)"""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.add_tokens([f"<new{i}>" for i in range(8)])
    tokenizer.save_pretrained(model)
    plan_job(to_job_config(compose(f"input.path={one_prompt(tmp_path)}", f"output.path={tmp_path / 'out'}",
                                   f"model.path={model}")))
    assert (f"lmbatch: warning: the tokenizer of {model} has {len(tokenizer):,} tokens, the model's embedding "
            f"{len(tokenizer) - 8:,}: a row holding one of the last 8 fails (index out of range)"
            in capsys.readouterr().out)
    engine = HFEngine.load(str(model), ModelConfig(path=str(model)), BatchingConfig(), device="cpu")
    requests = [Request(i, engine.tokenizer(f"row {i} <new{i % 8}>")["input_ids"], 4) for i in range(40)]
    with pytest.raises(EngineFailed, match=f"generation failed for each of the first {FAILED_ROWS_BEFORE_ANY_SUCCESS} "
                                           r"rows tried alone and has not succeeded for any \(IndexError: index out "
                                           r"of range in self\): the model or engine is broken, not the rows"):
        engine.generate(requests)
    TALLY["faults"] += 1


def test_a_row_that_breaks_generation_is_isolated(tiny_llama):
    engine = HFEngine.load(tiny_llama, ModelConfig(path=tiny_llama), BatchingConfig(min_padding_efficiency=0.0),
                      device="cpu")
    requests = [Request(i, engine.tokenizer(p)["input_ids"], 5) for i, p in enumerate(varied_prompts(10, max_words=20))]
    poison = 7  # a token id only the bad row carries
    requests[4].prompt_ids = requests[4].prompt_ids + [poison]
    expected = {c.key: c.text for c in engine.generate([r for r in requests if r.key != 4])}
    forward = engine.model.forward

    def forward_failing_on_poison(*args, **kwargs):
        if (kwargs["input_ids"] == poison).any():
            raise ValueError("index out of range in self")
        return forward(*args, **kwargs)

    engine.model.forward = forward_failing_on_poison
    got = {c.key: c for c in engine.generate(requests)}
    TALLY["faults"] += 1
    TALLY["bad_input_kinds"].add("row that breaks generation")
    assert got[4].finish_reason == "error" and got[4].text is None
    assert got[4].error == "generation failed: ValueError: index out of range in self"
    assert {k: c.text for k, c in got.items() if k != 4} == expected


# -- resume ----------------------------------------------------------------------------------------
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
    # them (left alone, the dead driver's Ray processes linger for a minute): the waiting run, on the
    # same machine, sees the lease's process gone, takes the lease and resumes.
    victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    TALLY["faults"] += 1
    proc.wait(timeout=30)
    psutil.wait_procs(victims, timeout=30)
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


def test_reliability_figures(capsys):
    """The figure line (run last in this module): nothing lost, nothing duplicated."""
    line = (f"reliability: {len(TALLY['bad_input_kinds'])} kinds of bad input tried, {TALLY['faults']} faults "
            f"injected, {TALLY['lost']} rows lost, {TALLY['duplicated']} rows duplicated")
    with capsys.disabled():
        print("\n" + line)
    assert TALLY["lost"] == 0 and TALLY["duplicated"] == 0
