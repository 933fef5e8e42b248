"""Checks at plan of what the prompts ask of the tokenizer: a pattern no text of it can follow, and
structured output without outlines-core.
"""


import pytest

from helpers.config import compose
from helpers.data import write_prompts
from lmbatch.errors import JobError
from lmbatch.plan.job import plan_job, to_job_config


def test_a_job_whose_pattern_cannot_be_followed_stops_as_it_is_planned(tmp_path, tiny_llama):
    """Checked against the job's tokenizer before anything starts, as the replicas would find it; a job
    held to a pattern is another job than one without (or with another)."""
    source = write_prompts(tmp_path / "in.parquet", ["a b", "c d"])

    def plan(*overrides):
        return plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}",
                                              f"model.path={tiny_llama}", *overrides)))

    with pytest.raises(JobError, match=r"^generation.regex: the pattern '\(ab' cannot be followed with this tokenizer"):
        plan("generation.regex='(ab'")
    with pytest.raises(JobError, match="^generation.json_schema .* cannot be followed: Unsupported type: colour"):
        plan("generation.json_schema={type: colour}")
    fingerprints = {plan().fingerprint, plan("generation.regex='a|b'").fingerprint,
                    plan("generation.json_schema={type: boolean}").fingerprint,
                    plan("generation.json_schema={}").fingerprint,  # an empty schema, any JSON, is one too
                    plan("generation.json_schema={}", "generation.json_whitespace=''").fingerprint}
    assert len(fingerprints) == 5
    lines = plan("generation.json_schema={type: boolean}", "generation.json_whitespace='[\\n ]{0,16}'")  # docs/prompts-and-settings.md's
    assert lines.job.generation.json_whitespace == r"[\n ]{0,16}"
    documented = plan("generation.json_schema={type: object, properties: {urgent: {type: boolean}, team: {enum: [billing, "
                  "tech]}}, required: [urgent, team]}")  # docs/prompts-and-settings.md's, in Hydra's own syntax
    assert documented.job.generation.json_schema == {"type": "object", "required": ["urgent", "team"], "properties": {
        "urgent": {"type": "boolean"}, "team": {"enum": ["billing", "tech"]}}}


def test_without_outlines_core_the_job_says_what_to_install(tmp_path, tiny_llama, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "outlines_core", None)  # as if not installed: importing it fails
    source = write_prompts(tmp_path / "in.parquet", ["a b"])
    with pytest.raises(JobError, match=r"^generation.regex: structured output needs outlines-core: pip install "
                                       r"'lmbatch\[structured\]'"):
        plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}",
                                       f"model.path={tiny_llama}", "generation.regex=ab")))
