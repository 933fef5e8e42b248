"""The `model` group: which model replicas load and how (conf/model/).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from lmbatch.config.checks import require


@dataclass
class ModelConfig:
    path: str = "builtin://tiny-llama"
    """Hugging Face hub id or local directory; `builtin://tiny-llama` / `tiny-gpt2` / `tiny-bert` build offline."""
    dtype: str = "auto"
    """`auto` (float32 on CPU, bfloat16 on GPU), `float32`, `bfloat16` or `float16`."""
    device_map: Optional[str] = None
    """Passed to from_pretrained; `auto` spreads one replica over its `cluster.gpus_per_replica` GPUs."""
    attn_implementation: Optional[str] = None
    """Attention kernel (`sdpa`, `flash_attention_2`, `eager`); null: FlashAttention-2 on GPU when the
    flash_attn package is installed and the model supports it, else transformers' choice (SDPA where the
    model supports it)."""
    kv_cache: Optional[str] = None
    """`static` (allocated once per micro-batch) or `dynamic` (grows every decode step); null: static
    on GPU, where growing the cache cost 1.4-5x more per decode step on an H200, dynamic on CPU."""
    trust_remote_code: bool = False
    """Allow model repositories that ship their own code."""
    revision: Optional[str] = None
    """A hub model's branch, tag or commit; null: where `main` points when the job is planned. Either
    way the plan pins the commit, and every replica and tokenizer loads that one (each node of a
    cluster downloads a hub model itself): a job never mixes two commits of a model."""
    adapter: Optional[str] = None
    """A PEFT adapter (LoRA and kin) fine-tuned from this model: a local directory with its
    `adapter_config.json` and weights, as peft's `save_pretrained` writes it. Each replica merges it
    into the weights as it loads them, so it costs nothing per token; a tokenizer saved with it (a
    fine-tune's own chat template) is used instead of the model's. Needs `pip install peft`."""
    adapters: dict[str, str] = field(default_factory=dict)
    """Several PEFT adapters of this model by name (`{support: /adapters/support, ...}`), each replica
    holding them all beside the weights, unmerged; generation.adapter (per row: an `adapter` column)
    picks the one that generates a row, null the model alone. They share the model's tokenizer."""

    def __post_init__(self) -> None:
        require(bool(self.path), "model.path must be set")
        require(not (self.adapter and self.adapters), "model.adapter and model.adapters: set one (one of "
                 "model.adapters can generate every row, with generation.adapter)")
        require(all(isinstance(name, str) and name and path for name, path in self.adapters.items()),
                 "model.adapters must map names to adapter directories")
        require(self.dtype in ("auto", "float32", "bfloat16", "float16"),
                 f"model.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        require(self.kv_cache in (None, "static", "dynamic"),
                 f"model.kv_cache must be static, dynamic or null, got {self.kv_cache!r}")
