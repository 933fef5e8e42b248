"""From a prepared chunk's rows to engine Requests: each row's settings (the job's, with its overrides) as
the engine's SamplingParams, its seed and its pattern.
"""

from __future__ import annotations

import dataclasses
import json

import pyarrow as pa

from lmbatch.config import GenerationOptions
from lmbatch.decoding.structured import pattern
from lmbatch.engine.requests import row_seed
from lmbatch.engine.types import Pooling, Request, SamplingParams
from lmbatch.prepare.settings import CHOICES, ERROR, MAX_NEW, PARAMS, PROMPT_IDS, SECOND_TEXT


def sampling_params(g: GenerationOptions) -> SamplingParams:
    """What the engine needs of a row's settings. Temperature 0 decodes greedily, as in OpenAI's API
    and vLLM, and top_k -1 is vLLM's "disabled", our 0. A greedy row's sampling controls are left at
    their defaults, as they change nothing, so that greedy rows share micro-batches (and repeats)
    whatever their columns say."""
    if g.do_sample and g.temperature > 0:
        sampling = dict(do_sample=True, temperature=g.temperature, top_p=g.top_p, top_k=max(g.top_k, 0), min_p=g.min_p)
    else:
        sampling = {}
    return SamplingParams(**sampling, repetition_penalty=g.repetition_penalty, presence_penalty=g.presence_penalty,
                          frequency_penalty=g.frequency_penalty, stop=tuple(g.stop),
                          num_return_sequences=g.num_return_sequences, logprobs=g.logprobs,
                          top_logprobs=g.top_logprobs, prompt_logprobs=g.prompt_logprobs, adapter=g.adapter,
                          embedding=Pooling(g.embedding, g.embedding_dimensions, g.embedding_normalize)
                          if g.embedding else None, classify=g.classify)


def row_options(generation: GenerationOptions, overrides: str | None) -> GenerationOptions:
    """The job's generation settings with a row's parameter overrides (JSON, as prepare wrote them)."""
    return dataclasses.replace(generation, **json.loads(overrides)) if overrides else generation


def chunk_requests(rows: pa.Table, generation: GenerationOptions, id_column: str) -> list[Request]:
    """A request per valid row of a prepared chunk (error rows have none), keyed by its position."""
    job_params, job_pattern = sampling_params(generation), pattern(generation)
    requests = []
    for i, (ids, max_new, err, row_id, overrides, choices, second_text_start) in enumerate(zip(
            rows[PROMPT_IDS].to_pylist(), rows[MAX_NEW].to_pylist(), rows[ERROR].to_pylist(),
            rows[id_column].to_pylist(), rows[PARAMS].to_pylist(), rows[CHOICES].to_pylist(),
            rows[SECOND_TEXT].to_pylist())):
        if err is not None:
            continue
        g = row_options(generation, overrides)
        params = sampling_params(g) if overrides else job_params
        # The seed comes from the row's id, not its position: samples do not depend on chunking.
        requests.append(Request(key=i, prompt_ids=ids, max_new_tokens=max_new, params=params,
                                seed=row_seed(g.seed, row_id) if params.do_sample else 0,
                                choices=tuple(zip(g.choices, map(tuple, choices))) if choices else (),
                                pattern=pattern(g) if overrides else job_pattern,
                                second_text_start=second_text_start))
    return requests
