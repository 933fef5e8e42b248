"""A job's fingerprint: what makes two runs the same job (the input files and everything that shapes a
row's output), so that a resumed run continues only its own output. Keys added since 0.2.0 count only when
set, so that an output an older version left half-written still resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from lmbatch.config import JobConfig
from lmbatch.input.files import InputPlan

ADDED_GENERATION_KEYS = ("choices", "logprobs", "presence_penalty", "frequency_penalty", "json_schema", "regex",
                         "prompt_logprobs", "top_logprobs", "json_whitespace", "adapter", "min_p", "embedding",
                         "classify")
"""generation keys added after 0.2.0 jobs were first made: they count in a job's fingerprint only when set
(and embedding_dimensions and embedding_normalize only with embedding)."""


ADDED_INPUT_KEYS = ("chat_template_kwargs", "chat_template", "max_prompt_tokens", "pair_column")
"""input keys added after 0.2.0 jobs were first made: they count in a job's fingerprint only when set."""


def job_fingerprint(job: JobConfig, inputs: InputPlan) -> str:
    """What makes two runs the same job: the input files and everything that shapes a row's output."""
    identity = {
        "files": [(f.path, f.size, f.num_rows) for f in inputs.files],
        # limit is left to "files", which hold the rows taken: a limit above the input's rows is the
        # same job as none (and jobs from before the key keep their fingerprint)
        "input": {k: v for k, v in dataclasses.asdict(job.input).items() if k not in ("path", "limit")
                  and not (k in ADDED_INPUT_KEYS and not v)},
        # kv_cache is like batching: how rows are computed, not what they are (and 0.2.0 jobs resume);
        # revision, adapter and adapters, added later, count when set (jobs from before them keep their fingerprint)
        "model": {k: v for k, v in dataclasses.asdict(job.model).items()
                  if k != "kv_cache" and not (k in ("revision", "adapter", "adapters") and not v)},
        # ADDED_GENERATION_KEYS count when set (an empty schema, any JSON, and an empty json_whitespace are set)
        "generation": {k: v for k, v in dataclasses.asdict(job.generation).items()
                       if not (k in ADDED_GENERATION_KEYS and v in (None, [], False, 0))
                       and not (k.startswith("embedding_") and not job.generation.embedding)},
        "engine": job.engine,
        "partition_by": job.output.partition_by,
        **({"reasoning_tags": job.output.reasoning_tags} if job.output.reasoning_tags else {}),  # added later
        **({"parse_json": True} if job.output.parse_json else {}),  # added later
        "chunk_layout": 2,  # chunks span files since 0.2: parts of an older layout must not be resumed
    }
    # Parts written before partition columns were read lack them: not the same job. Added only when
    # present, so other jobs keep their fingerprint (and resume).
    if inputs.partition_columns:
        identity["partition_columns"] = inputs.partition_columns
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
