"""The `batching` group: how a chunk is cut into micro-batches (conf/batching/; the planner is engine/batching.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmbatch.config.checks import require


@dataclass
class BatchingConfig:
    strategy: str = "bucketed"
    """`bucketed`: order a window by length and cut token-budget micro-batches; `fixed`: input order, fixed size."""
    max_batch_tokens: int = 16384
    """Budget for one micro-batch: sequences x (longest prompt + max_new_tokens), padding included; a
    row sampled generation.num_return_sequences times is that many sequences."""
    max_batch_rows: int = 64
    """Cap on the sequences of one bucketed micro-batch (rows, unless num_return_sequences > 1)."""
    min_padding_efficiency: float = 0.8
    """A bucketed micro-batch closes before real / padded prompt tokens would drop below this."""
    min_decode_efficiency: float = 0.8
    """...or before sum(max_new_tokens) / (rows x largest max_new_tokens) would drop below this."""
    fixed_batch_size: int = 16
    """Rows per micro-batch with strategy=fixed."""
    share_prefix: bool = True
    """Compute the tokens all prompts of a micro-batch begin with (a template's instructions, a system
    prompt; 16 or more) once, for all its rows, into either kind of KV cache (model.kv_cache)."""
    group_prefixes: bool = True
    """With share_prefix and strategy=bucketed: bucket the rows of each template of a job that mixes them
    apart, so that their micro-batches share it (`engine.requests.prefix_groups`). False: order by length
    alone, in fewer micro-batches (on a GPU, where a job's time goes by decode steps, fewer of them)."""
    chunk_rows: int = 4096
    """Rows in one unit of work: read, bucketed, generated and committed as one output file together,
    so also the window the planner buckets (larger: wider micro-batches, fewer decode steps).
    Small inputs are cut finer so that every replica gets two chunks."""

    def __post_init__(self) -> None:
        require(self.strategy in ("bucketed", "fixed"),
                 f"batching.strategy must be 'bucketed' or 'fixed', got {self.strategy!r}")
        for key in ("max_batch_tokens", "max_batch_rows", "fixed_batch_size", "chunk_rows"):
            require(getattr(self, key) >= 1, f"batching.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("min_padding_efficiency", "min_decode_efficiency"):
            require(0 <= getattr(self, key) <= 1, f"batching.{key} must be in [0, 1], got {getattr(self, key)}")

    @property
    def planner_settings(self) -> dict:
        """These settings as the planner's keyword arguments: `plan_micro_batches(lengths, new_tokens,
        **batching.planner_settings)` (the planner imports nothing of ours, configs included)."""
        return dict(strategy=self.strategy, max_batch_tokens=self.max_batch_tokens, max_batch_rows=self.max_batch_rows,
                    fixed_batch_size=self.fixed_batch_size, min_padding_efficiency=self.min_padding_efficiency,
                    min_decode_efficiency=self.min_decode_efficiency)
