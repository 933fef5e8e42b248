"""The typed schema of the job's config, one module per conf/ group.

The YAML files under conf/ are the user-facing surface; these dataclasses are registered in Hydra's
ConfigStore (`register_configs`, called once by each entrypoint) so that a wrong type or an unknown
key fails when the config is composed, and each `__post_init__` checks values when
`OmegaConf.to_object` builds the job config. The package hands the dataclasses on: import them from here.
"""

from lmbatch.config.batching import BatchingConfig
from lmbatch.config.checks import ConfigError
from lmbatch.config.cluster import ClusterConfig
from lmbatch.config.generation import EMBEDDING_POOLINGS, MAX_TOP_LOGPROBS, PER_ROW_PARAMETERS, GenerationOptions
from lmbatch.config.input import InputConfig
from lmbatch.config.job import JobConfig, register_configs
from lmbatch.config.model import ModelConfig
from lmbatch.config.output import PARQUET_CODECS, OutputConfig
from lmbatch.config.storage import StorageConfig
from lmbatch.config.vllm import VLLMConfig

__all__ = ["BatchingConfig", "ClusterConfig", "ConfigError", "EMBEDDING_POOLINGS", "GenerationOptions", "InputConfig",
           "JobConfig", "MAX_TOP_LOGPROBS", "ModelConfig", "OutputConfig", "PARQUET_CODECS", "PER_ROW_PARAMETERS",
           "StorageConfig", "VLLMConfig", "register_configs"]
