"""What a replica hands an engine and gets back; free of torch, so the echo path never imports it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import pyarrow as pa

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class Pooling:
    """How a prompt's last hidden states become its embedding (generation.embedding and the keys after it)."""

    kind: str
    """`last`: the last token's hidden state; `mean`: the mean over the prompt's tokens; `cls`: the first token's."""
    dimensions: Optional[int] = None
    """Keep the first N dimensions (before normalizing); None: all."""
    normalize: bool = True
    """Scale to length 1."""


@dataclass(frozen=True)
class SamplingParams:
    """Everything that must be equal for rows to share one `generate` call."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    num_return_sequences: int = 1
    logprobs: bool = False
    """Record each row's log-probability (generation.logprobs); the same for every row of a job."""
    top_logprobs: int = 0
    """Record each token's and its step's likeliest tokens' log-probabilities (generation.top_logprobs)."""
    prompt_logprobs: bool = False
    """Record each prompt's log-probability (generation.prompt_logprobs); the same for every row of a job."""
    adapter: Optional[str] = None
    """The adapter of model.adapters that generates the row (generation.adapter); None: the model alone."""
    embedding: Optional[Pooling] = None
    """Record each prompt's embedding, pooled so (generation.embedding); the same for every row of a job."""
    classify: bool = False
    """Record each prompt's label and label scores (generation.classify); the same for every row of a job."""


@dataclass
class Request:
    key: int
    """Caller's handle for the row (its position in the chunk)."""
    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    """Sampling seed of this row (derived from the job seed and the row's id)."""
    choices: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """(text, token ids) of each text the row must answer with (generation.choices); () for free text."""
    pattern: Optional[str] = None
    """The regular expression the row's text must match whole (generation.json_schema or regex), or None."""
    second_text_start: Optional[int] = None
    """Where a pair's second text begins in prompt_ids (input.pair_column): an encoder that reads token types
    reads it and what follows as type 1. None: one text."""


@dataclass
class Completion:
    key: int
    sample_index: int
    text: Optional[str]
    num_generated_tokens: int
    finish_reason: str  # stop | length | error
    error: Optional[str] = None
    logprob: Optional[float] = None
    """With generation.logprobs: the model's log-probability of the text's tokens given the prompt."""
    choice_logprobs: Optional[list[float]] = None
    """With generation.logprobs, for a row with choices: each choice's log-probability given the prompt."""
    prompt_logprob: Optional[float] = None
    """With generation.prompt_logprobs: the model's log-probability of the prompt, each token given those before."""
    token_logprobs: Optional[pa.StructArray] = None
    """With generation.top_logprobs: an `output.columns.TOKEN_LOGPROB` per counted token (Arrow, not a dict per token: a
    chunk of long texts holds millions of them)."""
    embedding: Optional[pa.Array] = None
    """With generation.embedding: the prompt's embedding (float32 values)."""
    label: Optional[str] = None
    """With generation.classify: the name of the prompt's likeliest label."""
    label_scores: Optional[pa.Array] = None
    """With generation.classify: every label's score (float32 values, in the model's label order)."""


def error_rows(r: Request, message: str) -> list[Completion]:
    """A request's completions when it cannot be generated: one error row per sample it asked for."""
    return [Completion(r.key, s, None, 0, "error", message) for s in range(r.params.num_return_sequences)]


@dataclass
class EngineStats:
    """Counters for the efficiency figures of the benchmark and the run summary."""

    micro_batches: int = 0
    prompt_tokens: int = 0
    padded_prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_slots: int = 0
    """rows x decode steps computed; generated_tokens / decode_slots is the decode slot efficiency."""
    decode_steps: int = 0
    """Forward passes of decoding; decode_slots / decode_steps is the average batch per step."""
    split_retries: int = 0
    shared_prefix_tokens: int = 0
    """Prompt tokens not computed again: a shared prefix's, for every sequence of its micro-batch but one."""


