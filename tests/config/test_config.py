"""Every shipped config composes and validates; bad keys, types and values fail with a clear message."""

import dataclasses
import re

import pytest
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf.errors import ValidationError

from helpers.config import CONF, REPO, compose
from helpers.data import write_prompts
from lmbatch.config import ConfigError, JobConfig
from lmbatch.plan.job import plan_job, to_job_config

BENCHMARK_GROUPS = {"preset"}  # options of conf/benchmark.yaml, composed below
GROUP_OPTIONS = [(group.name, f.stem) for group in sorted(CONF.iterdir())
                 if group.is_dir() and group.name not in {"__pycache__", *BENCHMARK_GROUPS}
                 for f in sorted(group.glob("*.yaml"))]


def test_every_group_option_is_found():
    assert {g for g, _ in GROUP_OPTIONS} == {"model", "generation", "batching", "cluster", "experiment"}


@pytest.mark.parametrize("group,option", GROUP_OPTIONS)
def test_every_shipped_config_composes_and_validates(group, option, tmp_path):
    cfg = compose(f"{group}={option}", f"output.path={tmp_path}")
    job = to_job_config(cfg)
    assert isinstance(job, JobConfig)


@pytest.mark.parametrize("config,overrides", [
    ("benchmark", []), ("benchmark", ["preset=cpu"]), ("benchmark", ["preset=gpu"]), ("scale", []),
])
def test_benchmark_configs_compose_and_validate(config, overrides, tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from lmbatch.bench import benchmark, scale

    benchmark.register_config()
    scale.register_config()

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name=config, overrides=[*overrides, f"{'work_dir' if config == 'scale' else 'output_dir'}={tmp_path}"])
    assert OmegaConf.to_object(cfg)


def test_contract_keys_exist(tmp_path):
    job = to_job_config(compose(f"output.path={tmp_path}"))
    for key in ["input.path", "input.prompt_column", "input.id_column", "output.path", "model.path",
                "generation.max_new_tokens", "generation.do_sample", "generation.temperature", "generation.top_p",
                "generation.seed", "generation.num_return_sequences", "batching.strategy",
                "batching.max_batch_tokens", "cluster.num_replicas", "cluster.gpus_per_replica"]:
        section, name = key.split(".")
        assert hasattr(getattr(job, section), name), key
    assert (job.input.prompt_column, job.input.id_column) == ("prompt", "id")


def test_experiment_is_the_classic_gpt2_example(tmp_path):
    g = to_job_config(compose("experiment=gpt2_samples", f"output.path={tmp_path}")).generation
    assert (g.do_sample, g.temperature, g.num_return_sequences, g.max_length) == (True, 0.7, 5, 50)


def test_a_hive_style_output_path_is_quoted_as_the_operations_page_says(tmp_path):
    """A scheduled job's dated output (`dt=2026-11-29`): Hydra's override grammar refuses a bare `=`."""
    with pytest.raises(OverrideParseException, match="mismatched input '='"):
        compose(f"output.path={tmp_path}/dt=2026-11-29")
    assert to_job_config(compose(f'output.path="{tmp_path}/dt=2026-11-29"')).output.path == f"{tmp_path}/dt=2026-11-29"


def test_unknown_key_fails():
    with pytest.raises(ConfigCompositionException) as e:
        compose("generation.temprature=0.5")
    assert "temprature" in str(e.value.__cause__ or e.value)


def test_wrong_type_fails():
    with pytest.raises(ConfigCompositionException) as e:
        compose("generation.max_new_tokens=lots")
    assert isinstance(e.value.__cause__, ValidationError)


@pytest.mark.parametrize("override,message", [
    ("generation.max_new_tokens=-3", "max_new_tokens must be >= 1"),
    ("generation.max_new_tokens=0", "max_new_tokens must be >= 1 (or 0 with generation.prompt_logprobs, generation.embedding or"),
    ("generation.top_logprobs=3", "generation.top_logprobs needs generation.logprobs=true"),
    ("generation.min_p=1.5", "generation.min_p must be in [0, 1], got 1.5"),
    ("generation.embedding=first", "generation.embedding must be last, mean, cls or null, got 'first'"),
    ("generation.embedding_dimensions=64", "generation.embedding_dimensions needs generation.embedding"),
    ("generation.embedding_dimensions=0", "generation.embedding_dimensions must be >= 1 or null, got 0"),
    ("generation.top_logprobs=21", "generation.top_logprobs must be in [0, 20], got 21"),
    ("generation.top_p=0", "top_p must be in (0, 1]"),
    ("generation.top_p=1.5", "top_p must be in (0, 1]"),
    ("generation.temperature=-0.5", "temperature must be >= 0"),
    ("generation.top_k=-2", "top_k must be >= 0 (or -1: disabled)"),
    ("generation.presence_penalty=2.5", "generation.presence_penalty must be in [-2, 2], got 2.5"),
    ("generation.num_return_sequences=3", "needs generation.do_sample=true"),
    ("batching.strategy=random", "batching.strategy must be"),
    ("batching.max_batch_tokens=0", "max_batch_tokens must be >= 1"),
    ("cluster.num_replicas=0", "num_replicas must be >= 1"),
    ("cluster.stall_timeout_s=0", "cluster.stall_timeout_s must be > 0 or null"),
    ("cluster.load_timeout_s=-1", "cluster.load_timeout_s must be > 0 or null"),
    ("output.mode=append", "output.mode must be"),
    ("input.on_too_long=skip", "on_too_long must be"),
    ("input.limit=0", "input.limit must be >= 1 or null"),
    ("input.max_prompt_tokens=0", "input.max_prompt_tokens must be >= 1 or null, got 0"),
    ("model.dtype=int8", "model.dtype must be"),
    ("model.kv_cache=paged", "model.kv_cache must be static, dynamic or null"),
    ("output.compression=lzma", "output.compression must be one of snappy, zstd"),
    ('output.reasoning_tags=["<think>"]', "output.reasoning_tags must be [] or an opening and a closing tag"),
    ("output.max_error_fraction=1.5", "output.max_error_fraction must be between 0 and 1 or null, got 1.5"),
])
def test_invalid_values_fail_with_the_key_named(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        to_job_config(compose(override, f"output.path={tmp_path}"))


@pytest.mark.parametrize("override, message", [
    ("input.apply_chat_template=true", "input.pair_column pairs plain texts (as a cross-encoder reads them); it "
                                       "cannot be combined with a chat template or input.messages_column"),
    ("input.on_too_long=truncate", "input.on_too_long=truncate would cut a pair's first text (the query) from its "
                                   "start: use truncate_end"),
])
def test_a_pair_is_plain_text_cut_at_its_end(override, message, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)):
        to_job_config(compose("input.pair_column=passage", override, f"output.path={tmp_path}"))


def test_missing_interpolation_is_a_config_error():
    with pytest.raises(ConfigError):
        to_job_config(compose("output.path=${oc.env:LMBATCH_SURELY_UNSET_VARIABLE}"))


@pytest.mark.parametrize("overrides, strategy, rows", [
    (["cluster=gpu_node"], "bucketed", 1024), (["cluster=multi_node"], "bucketed", 1024),
    (["cluster=gpu_node", "batching=bucketed"], "bucketed", 64), (["batching=fixed", "cluster=gpu_node"], "fixed", 64),
    (["cluster=gpu_node", "batching.max_batch_rows=256"], "bucketed", 256), ([], "bucketed", 64)])
def test_the_gpu_cluster_presets_choose_gpu_batching_unless_told_otherwise(overrides, strategy, rows, tmp_path):
    batching = to_job_config(compose(*overrides, f"output.path={tmp_path}")).batching
    assert (batching.strategy, batching.max_batch_rows) == (strategy, rows)


@pytest.mark.parametrize("overrides, engine", [(["cluster=gpu_node"], "vllm"), (["cluster=multi_node"], "vllm"),
                                               (["cluster=gpu_node", "engine=hf"], "hf"), ([], "hf")])
def test_the_gpu_cluster_presets_choose_engine_vllm_unless_told_otherwise(overrides, engine, tmp_path):
    assert to_job_config(compose(*overrides, f"output.path={tmp_path}")).engine == engine


def test_gpu_batching_plans_far_fewer_decode_steps(tmp_path):
    """batching=gpu exists for step-bound GPUs: on a GPU-sized workload it must cut the decode steps
    the job runs (its cost there), not just compose."""
    import math
    import random

    from lmbatch.engine.batching import decode_steps, plan_micro_batches
    from lmbatch.input.chunks import choose_chunk_rows

    rng = random.Random(0)
    lengths = [min(1024, max(4, int(rng.lognormvariate(math.log(128), 1.0)))) for _ in range(20_000)]
    new_tokens = [rng.randint(16, 256) for _ in lengths]

    def job_steps(option: str) -> int:
        b = to_job_config(compose(f"batching={option}", f"output.path={tmp_path}")).batching
        window = choose_chunk_rows(len(lengths), b.chunk_rows, num_replicas=1)  # the planner sees one chunk
        steps = 0
        for start in range(0, len(lengths), window):
            rows = slice(start, start + window)
            steps += decode_steps(plan_micro_batches(lengths[rows], new_tokens[rows], **b.planner_settings),
                                  new_tokens[rows])
        return steps

    assert job_steps("gpu") * 5 < job_steps("bucketed")


def test_home_relative_paths_are_expanded(tmp_path, monkeypatch):
    """A `~` reaches the job unexpanded (from a config file, or an override quoted for Hydra, whose
    grammar refuses a bare `~`): `output.path` with one once made a directory named `~` here."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write_prompts(tmp_path / "home" / "in.parquet", ["a"])
    plan = plan_job(to_job_config(compose("input.path='~/in.parquet'", "output.path='~/out'")))
    assert plan.inputs.uri == str(tmp_path / "home" / "in.parquet")
    assert plan.output.uri == str(tmp_path / "home" / "out")


def test_openai_and_vllm_conventions_mean_what_they_mean_there():
    """Request files exported from OpenAI's API or vLLM hold temperature 0 (greedy) and top_k -1 (off)."""
    from lmbatch.config import GenerationOptions
    from lmbatch.engine.types import SamplingParams
    from lmbatch.replica.requests import sampling_params

    assert sampling_params(GenerationOptions(do_sample=True, temperature=0.0, top_k=5, top_p=0.5)) == SamplingParams()
    assert sampling_params(GenerationOptions(temperature=0.3, top_k=5)) == SamplingParams()  # greedy: nothing to sample
    sampled = sampling_params(GenerationOptions(do_sample=True, temperature=0.7, top_k=-1))
    assert (sampled.do_sample, sampled.temperature, sampled.top_k) == (True, 0.7, 0)


def schema_keys(cls=JobConfig, prefix="") -> list[str]:
    """Every key of the typed schema, dotted (`input.path`), groups followed into their fields."""
    found = []
    for f in dataclasses.fields(cls):
        group = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        found += schema_keys(group, f"{prefix}{f.name}.") if dataclasses.is_dataclass(group) else [prefix + f.name]
    return found


def documented_keys(page: str) -> set[str]:
    """The keys the first column of docs/configuration.md's table names: `input.path`, and the short forms
    of a row that names several (`generation.temperature` / `top_p` / `top_k`)."""
    found = set()
    for row in re.findall(r"^\| ([^|]+) \|", page, re.M):
        names = re.findall(r"`([a-z_.]+)`", row)
        groups = [n.split(".")[0] for n in names if "." in n]
        found |= {n if "." in n or not groups else f"{groups[0]}.{n}" for n in names}
    return found


def test_every_key_of_the_schema_is_in_the_configuration_page():
    page = (REPO / "docs" / "configuration.md").read_text()
    keys = schema_keys()
    assert len(keys) > 70 and "batching.strategy" in keys  # the walk reaches every group's fields
    assert [k for k in keys if k not in documented_keys(page)] == []
