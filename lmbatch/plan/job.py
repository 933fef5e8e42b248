"""Planning a job: everything that can fail does so here, before Ray starts or a model loads.

`plan_job` checks the input files, the model (config, tokenizer, weights, chat template: in
`model_checks`) and the output directory, fingerprints the job, cuts the input into chunks
and finds the chunks already committed, so that a resumed job skips them. `lmbatch.pipeline` runs the plan;
the fingerprint is `fingerprint`'s.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow as pa
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmbatch.config import PER_ROW_PARAMETERS, ConfigError, JobConfig, ModelConfig
from lmbatch.errors import FAILED_IN_GENERATION, JobError, RowError, error_kind
from lmbatch.input.chunks import Chunk, choose_chunk_rows, plan_chunks
from lmbatch.input.files import InputPlan, inspect_inputs, is_text
from lmbatch.input.scans import find_duplicate_ids, long_strings
from lmbatch.models import model_identity
from lmbatch.models.files import tokenizer_source
from lmbatch.models.tokens import direct_class_path, load_tokenizer
from lmbatch.output.columns import SAMPLE_INDEX, output_columns
from lmbatch.output.directory import MAX_NAME_BYTES, OutputDir, OutputState, partition_dir
from lmbatch.output.json_column import arrow_type
from lmbatch.plan.engine_checks import check_vllm_installed
from lmbatch.plan.fingerprint import job_fingerprint
from lmbatch.plan.model_checks import check_model
from lmbatch.prepare.context import fit_to_context
from lmbatch.prepare.settings import PrepareSettings, template_fields
from lmbatch.retrying import set_policy
from lmbatch.storage import absolute, is_inside


@dataclass
class JobPlan:
    job: JobConfig
    inputs: InputPlan
    settings: PrepareSettings
    output: OutputDir
    state: OutputState
    fingerprint: str
    chunk_rows: int
    chunks: list[Chunk]
    model_identity: Optional[str] = None
    """`models.files.model_identity` of the model, recorded with the output so that a resume can check it."""
    kv_bytes_per_token: Optional[int] = None
    """KV cache a token of a sequence takes in the replicas' dtype (`models.architecture.kv_cache_bytes_per_token`)."""
    duplicate_rows: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    """Chunk id -> positions of rows repeating an earlier id (empty with on_duplicate_id=ignore)."""
    retrying: dict[str, collections.Counter] = dataclasses.field(default_factory=dict)
    """With output.mode=retry_errors: chunk id -> kinds of its rows that failed in generation, for the
    committed chunks that hold any; these chunks are generated again."""

    @property
    def num_duplicate_rows(self) -> int:
        return sum(map(len, self.duplicate_rows.values()))

    def error_duplicates(self, chunk_id: str) -> list[int]:
        """Rows of a chunk to write as `duplicate id` error rows (only with on_duplicate_id=error)."""
        return self.duplicate_rows.get(chunk_id, []) if self.job.input.on_duplicate_id == "error" else []

    def begin_output(self) -> None:
        """Create or clear the output and record the job in it, before any part is written."""
        self.output.begin(self.state, self.fingerprint, self.chunk_rows, self.model_identity)

    @property
    def pending(self) -> list[Chunk]:
        return [c for c in self.chunks if c.id not in self.state.done_chunks]

    @property
    def replicas(self) -> int:
        """Replicas this run starts: no more than the chunks it has to generate."""
        return min(self.job.cluster.num_replicas, len(self.pending))

    @property
    def rows_per_input_row(self) -> int:
        return self.job.generation.num_return_sequences


def to_job_config(cfg: Any) -> JobConfig:
    """Hydra's DictConfig -> the validated dataclass (runs every __post_init__ check)."""
    if isinstance(cfg, JobConfig):
        return cfg
    try:
        node = cfg if OmegaConf.get_type(cfg) is JobConfig else OmegaConf.merge(OmegaConf.structured(JobConfig), cfg)
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0]) from None


def resolve_input_uri(path: str) -> str:
    from lmbatch.input.builtin import builtin_input_path
    from lmbatch.models import BUILTIN

    if path.startswith(BUILTIN):
        try:
            return builtin_input_path(path[len(BUILTIN):])
        except ValueError as e:
            raise JobError(f"input.path {path}: {e}") from None
    return absolute(path)


def check_room_for_prompts(job: JobConfig, settings: PrepareSettings) -> None:
    """Refuse a job whose generation settings leave no room for even a one-token prompt (by
    prepare's own rule, fit_to_context): every row would become a `too long` error row after the
    whole job had run."""
    if {"max_new_tokens", "max_length", "choices"} & set(job.input.param_columns) or job.generation.choices:
        return  # per-row settings may make room (choices replace max_new_tokens)
    try:
        fit_to_context([0], settings, job.generation)
    except RowError:
        limit = settings.context_limit
        raise JobError(f"generation.max_new_tokens={job.generation.max_new_tokens} leaves no room for a prompt in "
                       f"the model's context of {limit} tokens; set it to at most {limit - 1}, or cap prompt and "
                       f"output together with generation.max_length={limit}") from None


def _passthrough_columns(job: JobConfig, inputs: InputPlan) -> list[str]:
    i = job.input
    keep = inputs.schema.names if i.keep_columns is None else i.keep_columns
    columns = list(dict.fromkeys([i.id_column, *keep]))
    clash = set(columns) & {f.name for f in [*output_columns(job), SAMPLE_INDEX]}
    if clash:
        raise JobError(f"input columns {sorted(clash)} clash with output columns; "
                       "rename them or leave them out with input.keep_columns")
    return columns


def plan_job(job: JobConfig) -> JobPlan:
    """Check the input, the model and the output, and plan the job: its chunks, those already committed
    (a resumed run skips them) and how its rows are prepared. Raises JobError for a job that cannot run."""
    set_policy(job.storage.policy)  # before the first request to storage
    check_vllm_installed(job)
    check_parse_json(job)
    i = job.input
    input_uri = resolve_input_uri(i.path)
    output_uri = absolute(job.output.path)
    if is_inside(output_uri, input_uri) or is_inside(input_uri, output_uri):
        raise JobError(f"output.path {output_uri} overlaps input.path {input_uri}; write the output elsewhere")
    inputs = inspect_inputs(input_uri, _required_columns(job)).head(i.limit)
    passthrough = _passthrough_columns(job, inputs)
    model, context_limit, kv_bytes_per_token = check_model(job)

    if job.output.partition_by:
        _check_partition_by(job, inputs, passthrough)
    output = OutputDir(output_uri, job.output.partition_by)
    fingerprint = job_fingerprint(job, inputs)
    identity = _model_identity(model)
    state, retrying = _output_state(job, output, fingerprint, identity)
    chunk_rows = state.chunk_rows or _chunk_rows(job, inputs.num_rows)
    settings = _prepare_settings(job, model, input_uri, inputs, passthrough, context_limit)
    check_room_for_prompts(job, settings)
    job = dataclasses.replace(job, model=model)
    chunks = plan_chunks(inputs.files, chunk_rows)
    plan = JobPlan(job, inputs, settings, output, state, fingerprint, chunk_rows, chunks, model_identity=identity,
                   kv_bytes_per_token=kv_bytes_per_token, retrying=retrying)
    if i.on_duplicate_id != "ignore" and not state.finished:
        plan.duplicate_rows = _duplicates_by_chunk(chunks, find_duplicate_ids(input_uri, inputs.files, i.id_column))
    return plan


def check_parse_json(job: JobConfig) -> None:
    """output.parse_json types its column by the job's schema: refuse a schema with a part of no one type."""
    if job.output.parse_json:
        try:
            arrow_type(job.generation.json_schema)
        except ValueError as e:
            raise ConfigError(f"output.parse_json cannot type the generated_json column: {e}") from None


def _required_columns(job: JobConfig) -> dict[str, str]:
    """The input columns the job reads, each with the kind of value it must hold (COLUMN_KINDS)."""
    i = job.input
    keep = i.keep_columns or []
    return {**{c: "any" for c in [i.id_column, *keep, *template_fields(i.template)]},
            **{c: PER_ROW_PARAMETERS[c] for c in i.param_columns},
            i.text_column: "messages" if i.messages_column else "string",  # the kinds checked win over "any"
            **({i.pair_column: "string"} if i.pair_column else {})}


def _model_identity(model: ModelConfig) -> Optional[str]:
    """The model's identity (`model_identity`) with its adapters': a retrained adapter is another model as
    much as retrained weights are."""
    identity = model_identity(model.path, model.revision)
    if model.adapter:
        identity = f"{identity} with adapter {model_identity(model.adapter)}"
    if model.adapters:
        identity = f"{identity} with adapters " + ", ".join(f"{name} {model_identity(local)}"
                                                             for name, local in sorted(model.adapters.items()))
    return identity


def _output_state(job: JobConfig, output: OutputDir, fingerprint: str,
                  identity: Optional[str]) -> tuple[OutputState, dict[str, collections.Counter]]:
    """What the output holds of this job; with output.mode=retry_errors, the committed chunks whose rows
    failed in generation are taken out of it, to be generated again."""
    state = output.inspect(fingerprint, job.output.mode, identity)
    retrying = _failed_in_generation(output, state.done_chunks) if job.output.mode == "retry_errors" else {}
    if retrying:
        if state.model_changed:
            raise JobError(f"output.path {output.uri} was made with other model files than model.path holds now: "
                           "retrying its failed rows would mix the outputs of two models; point model.path at the "
                           "model it was made with, or use output.mode=overwrite to start again")
        state = dataclasses.replace(state, done_chunks=state.done_chunks - retrying.keys(), finished=False)
    return state, retrying


def _chunk_rows(job: JobConfig, input_rows: int) -> int:
    """Rows per chunk for a new output (a resumed one keeps those it was begun with)."""
    configured = job.batching.chunk_rows
    if job.output.max_rows_per_file:  # one part per chunk: a smaller chunk is a smaller file
        configured = min(configured, max(1, job.output.max_rows_per_file // job.generation.num_return_sequences))
    return choose_chunk_rows(input_rows, configured, job.cluster.num_replicas)


def _prepare_settings(job: JobConfig, model: ModelConfig, input_uri: str, inputs: InputPlan, passthrough: list[str],
                      context_limit: Optional[int]) -> PrepareSettings:
    """What the prepare tasks need of the job, its tokenizer's class found once here."""
    i = job.input
    tokenizer_path, tokenizer_revision = tokenizer_source(model.path, model.revision, model.adapter)
    return PrepareSettings(
        input_uri=input_uri, prompt_column=i.text_column, passthrough_columns=tuple(passthrough),
        tokenizer_path=tokenizer_path, tokenizer_revision=tokenizer_revision, generation=job.generation,
        param_columns=tuple(i.param_columns), adapters=tuple(job.model.adapters),
        context_limit=context_limit, max_prompt_tokens=i.max_prompt_tokens, on_too_long=i.on_too_long,
        template=i.template, pair_column=i.pair_column, chat=i.chat, chat_template_kwargs=i.chat_template_kwargs,
        chat_template=i.chat_template, system_prompt=i.system_prompt,
        trust_remote_code=job.model.trust_remote_code,
        tokenizer_class=direct_class_path(
            load_tokenizer(tokenizer_path, model.trust_remote_code, revision=tokenizer_revision),
            tokenizer_path, tokenizer_revision),
        input_schema=inputs.schema,
    )


def _failed_in_generation(output: OutputDir, chunk_ids) -> dict[str, collections.Counter]:
    """Committed chunks holding rows that failed in generation -> how many of each kind."""
    found = {}
    for chunk_id, (_, messages) in output.errors(chunk_ids).items():
        kinds = collections.Counter(k for k in map(error_kind, messages) if k in FAILED_IN_GENERATION)
        if kinds:
            found[chunk_id] = kinds
    return found


def _check_partition_by(job: JobConfig, inputs: InputPlan, passthrough: list[str]) -> None:
    """Refuse, before any generation, a partition column whose values cannot all name a directory:
    found only as a chunk is written, such a value used to fail the job after the chunk's work."""
    column = job.output.partition_by
    if column not in passthrough or column == job.input.id_column:
        raise JobError(f"output.partition_by={column!r} must name a kept input column other than the id")
    type_ = inputs.schema.field(column).type
    if pa.types.is_nested(type_) or pa.types.is_binary(type_) or pa.types.is_large_binary(type_) \
            or pa.types.is_fixed_size_binary(type_):  # Spark refuses these too
        raise JobError(f"output.partition_by={column!r} is a {type_} column; partition by a column of strings, "
                       "numbers, booleans or dates, whose values can name a directory")
    if not is_text(type_):
        return  # numbers, dates and booleans print short
    # A UTF-8 byte quotes to at most 3 ("%C3"): shorter values fit, so only the longer are looked at.
    shortest_suspect = (MAX_NAME_BYTES - len(column) - 1) // 3
    too_long = [v for v in long_strings(inputs.uri, inputs.files, column, shortest_suspect)
                if len(partition_dir(column, v).encode()) > MAX_NAME_BYTES]
    if too_long:
        example = too_long[0][:60] + "…"
        raise JobError(f"output.partition_by={column!r}: {len(too_long)} value(s) would name a directory longer "
                       f"than the {MAX_NAME_BYTES} bytes file systems allow (with URL quoting), e.g. {example!r}; "
                       "partition by a column of short values (a category, a date)")


def _duplicates_by_chunk(chunks: list[Chunk], positions: list[int]) -> dict[str, list[int]]:
    """Input positions (sorted) -> {chunk id: positions within the chunk}."""
    found: dict[str, list[int]] = {}
    for c in chunks:
        rows = positions[bisect.bisect_left(positions, c.start):bisect.bisect_left(positions, c.stop)]
        if rows:
            found[c.id] = [r - c.start for r in rows]
    return found
