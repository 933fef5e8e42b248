"""The columns lmbatch adds to every output row, after the kept input ones, as the job's settings call for
them; and the split of a reasoning model's text into its reasoning and its answer.
"""

from __future__ import annotations

from typing import Optional, Sequence

import pyarrow as pa

from lmbatch.config import JobConfig
from lmbatch.output.json_column import arrow_type

_TOKEN = [("token_id", pa.int64()), ("token", pa.string()), ("logprob", pa.float64())]
TOP_LOGPROB = pa.struct(_TOKEN)
"""One of the likeliest tokens at a step (generation.top_logprobs): its id, its text alone, its log-probability."""


TOKEN_LOGPROB = pa.struct([*_TOKEN, ("top_logprobs", pa.list_(TOP_LOGPROB))])
"""A generated token as TOP_LOGPROB, with the likeliest tokens at its step, likeliest first."""


GENERATED_COLUMNS = pa.schema([
    ("generated_text", pa.string()),
    ("num_prompt_tokens", pa.int64()),
    ("num_generated_tokens", pa.int64()),
    ("finish_reason", pa.string()),
    ("error", pa.string()),
])


REASONING = pa.field("reasoning", pa.string())


SAMPLE_INDEX = pa.field("sample_index", pa.int64())


LOGPROB = pa.field("logprob", pa.float64())


CHOICE_LOGPROBS = pa.field("choice_logprobs", pa.list_(pa.float64()))


PROMPT_LOGPROB = pa.field("prompt_logprob", pa.float64())


EMBEDDING = pa.field("embedding", pa.list_(pa.float32()))


LABEL = pa.field("label", pa.string())


LABEL_SCORES = pa.field("label_scores", pa.list_(pa.float32()))


TOKEN_LOGPROBS = pa.field("token_logprobs", pa.list_(TOKEN_LOGPROB))


def output_columns(job: JobConfig) -> list[pa.Field]:
    """The columns lmbatch adds to every output row, after the kept input columns."""
    g, columns = job.generation, list(GENERATED_COLUMNS)
    if job.output.reasoning_tags:
        columns.append(REASONING)
    if g.num_return_sequences > 1:
        columns.append(SAMPLE_INDEX)
    if g.logprobs:
        columns.append(LOGPROB)
        if g.choices or "choices" in job.input.param_columns:  # rows with choices, maybe all
            columns.append(CHOICE_LOGPROBS)
        if g.top_logprobs:
            columns.append(TOKEN_LOGPROBS)
    if g.prompt_logprobs:
        columns.append(PROMPT_LOGPROB)
    if g.embedding:
        columns.append(EMBEDDING)
    if g.classify:
        columns += [LABEL, LABEL_SCORES]
    if job.output.parse_json:
        columns.append(pa.field("generated_json", arrow_type(job.generation.json_schema)))
    return columns


def split_reasoning(text: Optional[str], opening: str, closing: str) -> tuple[Optional[str], Optional[str]]:
    """(reasoning, answer) of a reasoning model's text: the reasoning is what comes before the first
    closing tag (its opening tag dropped: a chat template may put that in the prompt instead), the
    answer what follows. Without a closing tag, a text that opens with the tag was cut short while
    reasoning (its answer is empty), and any other text is all answer (thinking turned off)."""
    if text is None:  # an error row
        return None, None
    head, closed, answer = text.partition(closing)
    head = head.strip()
    if head.startswith(opening):
        head = head[len(opening):].strip()
    elif not closed:
        return None, text
    return head, answer.lstrip() if closed else ""


def list_column(rows: Sequence[Optional[pa.Array]], value_type: pa.DataType) -> pa.ListArray:
    """One list per row from each row's array of values (None: a null list), without a Python object per value."""
    offsets = [0]
    for r in rows:
        offsets.append(offsets[-1] + (len(r) if r is not None else 0))
    present = [r for r in rows if r is not None]
    values = pa.concat_arrays(present) if present else pa.array([], value_type)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, type=pa.list_(value_type),
                                    mask=pa.array([r is None for r in rows], pa.bool_()))
