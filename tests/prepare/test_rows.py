"""Preparing rows: templates and chat templates rendered, the tokens of choices counted, parameter cells
read as their settings' types; a row they refuse is an error row, its neighbours go on.
"""

# Many real chat templates raise on what they refuse (Mistral's and Llama 2's on roles that do not alternate).

import json
import shutil

import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from helpers.config import compose
from helpers.data import write_prompts
from helpers.models import THINKING_CHAT_TEMPLATE
from helpers.tally import TALLY
from lmbatch.config import ConfigError
from lmbatch.errors import JobError
from lmbatch.models.tokens import load_tokenizer
from lmbatch.plan.job import plan_job, to_job_config
from lmbatch.prepare.chunk import prepare_chunk
from lmbatch.prepare.settings import ERROR, MAX_NEW, PARAMS, PROMPT_IDS
from lmbatch.replica.requests import row_options, sampling_params

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
