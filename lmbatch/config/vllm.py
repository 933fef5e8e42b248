"""The `vllm` group: the settings of engine=vllm, the vLLM engine each replica holds (`engine/vllm.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lmbatch.config.checks import require


@dataclass
class VLLMConfig:
    max_model_len: Optional[int] = None
    """Longest prompt plus generated tokens a sequence may hold; null: the model's context length."""
    max_num_seqs: int = 256
    """Sequences vLLM schedules at once (its continuous batch)."""
    max_num_batched_tokens: Optional[int] = None
    """Tokens vLLM computes in one step, prompts' chunks included; null: vLLM's default."""
    gpu_memory_utilization: float = 0.9
    """Share of each GPU's memory vLLM takes for the weights and the KV cache (GPU only)."""
    enable_prefix_caching: bool = True
    """Reuse the KV cache of a prompt prefix rows share (a long instruction, a system prompt)."""
    enforce_eager: bool = True
    """Run without CUDA graphs or compilation: start-up 27 s instead of 61 s on a 2-core CPU, and
    about 10% slower after; set false on a GPU for long jobs."""
    cpu_kvcache_space_gb: float = 4.0
    """GB of memory for each CPU replica's KV cache (VLLM_CPU_KVCACHE_SPACE; vLLM otherwise takes most
    of the machine's free memory)."""

    def __post_init__(self) -> None:
        require(self.max_model_len is None or self.max_model_len > 0,
                f"vllm.max_model_len must be > 0 or null, got {self.max_model_len}")
        require(self.max_num_seqs >= 1, f"vllm.max_num_seqs must be >= 1, got {self.max_num_seqs}")
        require(self.max_num_batched_tokens is None or self.max_num_batched_tokens > 0,
                f"vllm.max_num_batched_tokens must be > 0 or null, got {self.max_num_batched_tokens}")
        require(0 < self.gpu_memory_utilization <= 1,
                f"vllm.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        require(self.cpu_kvcache_space_gb > 0,
                f"vllm.cpu_kvcache_space_gb must be > 0, got {self.cpu_kvcache_space_gb}")
