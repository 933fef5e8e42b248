"""The engine without a model, for measuring everything but generation (`engine=echo`)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from lmbatch.config import BatchingConfig
from lmbatch.engine.types import Completion, EngineStats, Request


class EchoEngine:
    """No model: every row 'generates' one fixed token of text. Measures the pipeline alone."""

    TEXT = "ok"

    def __init__(self, batching: BatchingConfig):
        self.batching = batching
        self.stats = EngineStats()

    def generate(self, requests: Sequence[Request],
                 on_batch: Optional[Callable[[list[Completion]], None]] = None) -> list[Completion]:
        self.stats.prompt_tokens += sum(len(r.prompt_ids) for r in requests)
        self.stats.generated_tokens += sum(r.params.num_return_sequences for r in requests)
        done = [Completion(r.key, s, self.TEXT, 1, "stop")
                for r in requests for s in range(r.params.num_return_sequences)]
        if on_batch:  # all rows are one "micro-batch"
            on_batch(done)
        return done
