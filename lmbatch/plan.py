"""Planning a job: everything that can fail does so here, before Ray starts or a model loads.

`plan_job` checks the input files, the model (config, tokenizer, weights, chat template) and the
output directory, fingerprints the job, cuts the input into chunks and finds the chunks already
committed, so that a resumed job skips them. `lmbatch.pipeline` runs the plan.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmbatch import io, structured
from lmbatch.config import PER_ROW_PARAMETERS, ConfigError, JobConfig, ModelConfig
from lmbatch.io import Chunk, InputPlan, JobError
from lmbatch.models import adapter_misfit, ending_ids, model_identity, tokenizer_source
from lmbatch.output import MAX_NAME_BYTES, OutputDir, OutputState, partition_dir
from lmbatch.prepare import (PrepareSettings, RowError, direct_class_path, encode, fit_to_context, load_tokenizer,
                             template_fields)
from lmbatch.interface import FAILED_IN_GENERATION
from lmbatch.replica import SAMPLE_INDEX, error_kind, output_columns
from lmbatch.structured import Indexes, PatternError


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
    """`models.model_identity` of the model, recorded with the output so that a resume can check it."""
    kv_bytes_per_token: Optional[int] = None
    """KV cache a token of a sequence takes in the replicas' dtype (`models.kv_cache_bytes_per_token`)."""
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
    from lmbatch.models import BUILTIN
    from lmbatch.samples import builtin_input_path

    if path.startswith(BUILTIN):
        try:
            return builtin_input_path(path[len(BUILTIN):])
        except ValueError as e:
            raise JobError(f"input.path {path}: {e}") from None
    return absolute(path)


def absolute(path: str) -> str:
    """A URI as it is; a local path absolute (Ray's workers run elsewhere), `~` expanded: the shell
    leaves a `~` quoted for Hydra or read from a config file, and `output.path` made a directory `~`."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def check_model(job: JobConfig) -> tuple[ModelConfig, Optional[int], Optional[int]]:
    """(the model config as workers should see it: a local path absolute, a hub model pinned to its
    commit; context length; KV cache bytes per token in the replicas' dtype). Fails early on a
    missing model."""
    from transformers import AutoConfig

    from lmbatch.models import (BUILTIN, check_weights, hub_commit, kv_cache_bytes_per_token, load_generation_config,
                                resolve_model_path, settings_not_applied)

    path, revision = job.model.path, job.model.revision
    if not path.startswith(BUILTIN):
        expanded = os.path.expanduser(path)
        if os.path.exists(expanded):
            path = os.path.abspath(expanded)
            if Path(path, ADAPTER_CONFIG).is_file() and not Path(path, "config.json").exists():
                base = json.loads(Path(path, ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
                raise JobError(f"model.path {job.model.path} holds a PEFT adapter, not a model: set model.path to "
                               f"the model it was fine-tuned from (its {ADAPTER_CONFIG} names {base}) and "
                               f"model.adapter={job.model.path}")
            try:
                check_weights(path)
            except ValueError as e:
                raise JobError(f"model.path {job.model.path}: {e}") from None
        elif expanded.startswith(("/", ".")):
            raise JobError(f"model.path {job.model.path} does not exist")
    try:
        local = resolve_model_path(path)
        config = AutoConfig.from_pretrained(local, trust_remote_code=job.model.trust_remote_code, revision=revision)
        hub = not os.path.isdir(local)
        if hub:  # pinned to the commit its config came from: the checks below and every worker load that one
            revision = hub_commit(path, revision) or revision
    except Exception as e:  # noqa: BLE001 - hub, parsing and remote-code errors alike
        raise JobError(f"model.path {job.model.path} cannot be loaded: {str(e).splitlines()[0]}") from None
    if revision and not hub:
        raise JobError(f"model.revision={revision} names a commit of a hub model, but model.path {job.model.path} "
                       "is a local directory")
    adapter = check_adapter(job.model.adapter, config, job.model.trust_remote_code)
    # The model's tokenizer, or the adapter's own where it holds one; `source` names it in messages.
    tokenizer_path, tokenizer_revision = tokenizer_source(path, revision, adapter)
    own = tokenizer_path == adapter
    source = f"model.adapter {job.model.adapter}" if own else job.model.path
    try:  # called as plan_job calls it again, which then finds this load cached
        tokenizer = load_tokenizer(tokenizer_path, job.model.trust_remote_code, revision=tokenizer_revision)
    except Exception as e:  # noqa: BLE001 - hub, parsing and remote-code errors alike
        what = f"the tokenizer in {source}" if own else f"model.path {job.model.path}"
        raise JobError(f"{what} cannot be loaded: {str(e).splitlines()[0]}") from None
    if job.input.chat:
        check_chat_template(job, tokenizer, source)
    if note := unspaced_choices(job, tokenizer):
        print(f"lmbatch: note: {note}")
    generation_config = load_generation_config(path, revision)
    check_structured(job, tokenizer, generation_config.eos_token_id)
    ignored = {k: v for k, v in settings_not_applied(generation_config).items()
               if getattr(job.generation, k, None) != v}  # what the job sets alike is applied, as the job's
    if ignored:
        print(f"lmbatch: note: the generation_config.json of {job.model.path} sets "
              f"{', '.join(f'{k}={v}' for k, v in ignored.items())}, which lmbatch does not apply: it generates "
              "with the job's generation.* settings alone, so that the config saved with the output says all "
              "that shaped it")
    text_config = getattr(config, "get_text_config", lambda: config)()
    limit = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
    vocab = getattr(text_config, "vocab_size", None)
    if vocab and len(tokenizer) > vocab:  # tokens added to the tokenizer, the model's embedding not resized
        print(f"lmbatch: warning: the tokenizer of {source} has {len(tokenizer):,} tokens, the model's "
              f"embedding {vocab:,}: a row holding one of the last {len(tokenizer) - vocab:,} fails "
              "(index out of range)")
    model = dataclasses.replace(job.model, path=path, revision=revision, adapter=adapter)
    return model, limit, kv_cache_bytes_per_token(text_config, job.replica_dtype)


def check_structured(job: JobConfig, tokenizer, model_eos) -> None:
    """Structured output that cannot run stops the job here, not as every row's error: no outlines-core, a
    tokenizer whose tokens cannot be spelled as bytes, no EOS, or a job-level json_schema or regex that no
    text of the tokenizer's can match (compiled once here, as each replica compiles it again)."""
    if not job.held_to_pattern:
        return
    g = job.generation
    key = "generation.regex" if g.regex is not None else "generation.json_schema"
    try:
        indexes = Indexes(tokenizer, ending_ids(model_eos, tokenizer))  # as each replica will build it
        if regex := structured.pattern(g):
            indexes.index(regex)
    except PatternError as e:
        message = str(e).removeprefix("invalid parameter: ")
        raise JobError(f"generation.{message}" if message.startswith("json_schema") else f"{key}: {message}") from None


def unspaced_choices(job: JobConfig, tokenizer) -> Optional[str]:
    """A likely mistake in generation.choices: labels without the leading space a model writes after a
    prompt that ends in a word or a colon ("Sentiment:"), where the space is part of the label's token.
    Forced to spell the label otherwise, the model's answer and its probabilities mean little."""
    template = job.input.template or "?"  # a prompt of its own most often ends in a word or a colon
    if job.input.chat or template[-1:].isspace():
        return None
    for choice in job.generation.choices:
        alone, spaced = (encode(tokenizer, [text], add_special_tokens=False)[0] for text in (choice, " " + choice))
        if not choice[:1].isspace() and len(spaced) < len(alone):
            return (f"generation.choices holds {choice!r}, which the model's tokens spell in {len(alone)} but "
                    f"{' ' + choice!r} in {len(spaced)}: after a prompt that ends in a word or a colon a model "
                    f"writes the space, so write the labels with it ({' ' + choice!r}) unless the prompt ends in one")
    return None


ADAPTER_CONFIG = "adapter_config.json"


def check_adapter(adapter: Optional[str], model_config, trust_remote_code: bool) -> Optional[str]:
    """model.adapter, absolute, once it is found to be an adapter peft can merge into the weights of
    the model `model_config` describes (its layers and their sizes: replicas would fail to load it)."""
    if adapter is None:
        return None
    path = absolute(adapter)
    if not os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        found = f"holds no {ADAPTER_CONFIG}" if os.path.isdir(path) else "does not exist"
        raise JobError(f"model.adapter {adapter} {found}: it must be a local directory that peft's save_pretrained "
                       "wrote (download a hub adapter first, with `hf download`)")
    try:
        from peft import PeftConfig
    except ImportError:
        raise JobError("model.adapter needs the peft package: pip install peft") from None
    try:
        config = PeftConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - a config peft cannot read, of whatever kind
        raise JobError(f"model.adapter {adapter} cannot be read: {str(e).splitlines()[0]}") from None
    if config.is_prompt_learning:
        kind = getattr(config.peft_type, "value", config.peft_type)  # an enum of strings
        raise JobError(f"model.adapter {adapter} is a {kind} adapter, which does not merge into the "
                       "weights; lmbatch takes adapters that do (LoRA and its kin)")
    misfit = adapter_misfit(model_config, path, trust_remote_code)
    if misfit:
        raise JobError(f"model.adapter {adapter} does not fit model.path: {misfit}; was it fine-tuned from another "
                       f"model? (its {ADAPTER_CONFIG} names {config.base_model_name_or_path})")
    return path


def check_chat_template(job: JobConfig, tokenizer, source: str) -> None:
    """The chat template must render the conversation the job builds around each row's text (a
    user message, after the system prompt if any): else every row would become an error row
    (templates raise on what they refuse, e.g. a system message). Conversations of a messages
    column vary by row, so there only the system prompt is tried."""
    if not tokenizer.chat_template:
        raise JobError(f"the tokenizer of {source} has no chat template, which input.messages_column, "
                       "input.system_prompt, input.apply_chat_template and input.chat_template_kwargs need")
    variables, read = job.input.chat_template_kwargs, template_variables(tokenizer.chat_template)
    if taken := sorted(set(variables) & {"conversation", "messages", "tokenize", "add_generation_prompt"}):
        raise JobError(f"input.chat_template_kwargs cannot set {', '.join(taken)}: lmbatch passes the chat template "
                       "each row's messages, with the prompt for the model's turn")
    if variables and read is not None and set(variables) - read:
        raise JobError(f"input.chat_template_kwargs sets {', '.join(sorted(set(variables) - read))}, which the chat "
                       f"template of {source} does not read, so it would change nothing; it reads "
                       f"{', '.join(sorted(read))}")
    if job.input.messages_column and not job.input.system_prompt:
        return
    system = [{"role": "system", "content": job.input.system_prompt}] if job.input.system_prompt else []
    try:
        tokenizer.apply_chat_template([*system, {"role": "user", "content": "Hello"}], tokenize=False,
                                      add_generation_prompt=True, **variables)
    except Exception as e:  # noqa: BLE001 - whatever the template raises
        raise JobError(f"the chat template of {source} fails on a single user message"
                       f"{' after input.system_prompt' if system else ''}: {e}") from None


def template_variables(chat_template) -> Optional[set[str]]:
    """The variables a chat template reads from its caller; None where it cannot be parsed here (a
    template of tags that transformers alone knows), so that nothing is refused for that."""
    import jinja2.meta
    from transformers.utils import chat_template_utils

    sources = chat_template.values() if isinstance(chat_template, dict) else [chat_template]
    try:  # parsed in the environment transformers renders it in (its tags and extensions)
        environment = chat_template_utils._compile_jinja_template("").environment
        return set().union(*(jinja2.meta.find_undeclared_variables(environment.parse(s)) for s in sources))
    except Exception:  # noqa: BLE001 - a private function of transformers, or a template it alone parses
        return None


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


def _fingerprint(job: JobConfig, inputs: InputPlan) -> str:
    """What makes two runs the same job: the input files and everything that shapes a row's output."""
    identity = {
        "files": [(f.path, f.size, f.num_rows) for f in inputs.files],
        # limit is left to "files", which hold the rows taken: a limit above the input's rows is the
        # same job as none (and jobs from before the key keep their fingerprint)
        # (chat_template_kwargs, added later, counts when set: jobs from before it keep their fingerprint)
        "input": {k: v for k, v in dataclasses.asdict(job.input).items()
                  if k not in ("path", "limit") and not (k == "chat_template_kwargs" and not v)},
        # kv_cache is like batching: how rows are computed, not what they are (and 0.2.0 jobs resume);
        # revision and adapter, added later, count when set (jobs from before them keep their fingerprint)
        "model": {k: v for k, v in dataclasses.asdict(job.model).items()
                  if k != "kv_cache" and not (k in ("revision", "adapter") and v is None)},
        # choices, logprobs, the OpenAI penalties, json_schema, regex and prompt_logprobs, added later, count
        # when set (jobs from before them keep their fingerprint; an empty schema, any JSON, is set)
        "generation": {k: v for k, v in dataclasses.asdict(job.generation).items()
                       if not (k in ("choices", "logprobs", "presence_penalty", "frequency_penalty", "json_schema",
                                     "regex", "prompt_logprobs") and v in (None, [], False, 0))},
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


def plan_job(job: JobConfig) -> JobPlan:
    i = job.input
    input_uri = resolve_input_uri(i.path)
    output_uri = absolute(job.output.path)
    if io.is_inside(output_uri, input_uri) or io.is_inside(input_uri, output_uri):
        raise JobError(f"output.path {output_uri} overlaps input.path {input_uri}; write the output elsewhere")
    keep = i.keep_columns or []
    required = {**{c: "any" for c in [i.id_column, *keep, *template_fields(i.template)]},
                **{c: PER_ROW_PARAMETERS[c] for c in i.param_columns},
                i.text_column: "messages" if i.messages_column else "string"}  # the kinds checked win over "any"
    inputs = io.inspect_inputs(input_uri, required).head(i.limit)
    passthrough = _passthrough_columns(job, inputs)
    model, context_limit, kv_bytes_per_token = check_model(job)

    if job.output.partition_by:
        _check_partition_by(job, inputs, passthrough)
    output = OutputDir(output_uri, job.output.partition_by)
    fingerprint = _fingerprint(job, inputs)
    identity = model_identity(model.path, model.revision)
    if model.adapter:  # a retrained adapter is another model as much as retrained weights are
        identity = f"{identity} with adapter {model_identity(model.adapter)}"
    state = output.inspect(fingerprint, job.output.mode, identity)
    retrying = _failed_in_generation(output, state.done_chunks) if job.output.mode == "retry_errors" else {}
    if retrying:
        if state.model_changed:
            raise JobError(f"output.path {output_uri} was made with other model files than model.path holds now: "
                           "retrying its failed rows would mix the outputs of two models; point model.path at the "
                           "model it was made with, or use output.mode=overwrite to start again")
        state = dataclasses.replace(state, done_chunks=state.done_chunks - retrying.keys(), finished=False)
    configured = job.batching.chunk_rows
    if job.output.max_rows_per_file:  # one part per chunk: a smaller chunk is a smaller file
        configured = min(configured, max(1, job.output.max_rows_per_file // job.generation.num_return_sequences))
    chunk_rows = state.chunk_rows or io.choose_chunk_rows(inputs.num_rows, configured, job.cluster.num_replicas)
    tokenizer_path, tokenizer_revision = tokenizer_source(model.path, model.revision, model.adapter)
    settings = PrepareSettings(
        input_uri=input_uri, prompt_column=i.text_column, passthrough_columns=tuple(passthrough),
        tokenizer_path=tokenizer_path, tokenizer_revision=tokenizer_revision, generation=job.generation,
        param_columns=tuple(i.param_columns),
        context_limit=context_limit, on_too_long=i.on_too_long,
        template=i.template, chat=i.chat, chat_template_kwargs=i.chat_template_kwargs,
        system_prompt=i.system_prompt,
        trust_remote_code=job.model.trust_remote_code,
        tokenizer_class=direct_class_path(
            load_tokenizer(tokenizer_path, model.trust_remote_code, revision=tokenizer_revision),
            tokenizer_path, tokenizer_revision),
        input_schema=inputs.schema,
    )
    check_room_for_prompts(job, settings)
    job = dataclasses.replace(job, model=model)
    chunks = io.plan_chunks(inputs.files, chunk_rows)
    plan = JobPlan(job, inputs, settings, output, state, fingerprint, chunk_rows, chunks, model_identity=identity,
                   kv_bytes_per_token=kv_bytes_per_token, retrying=retrying)
    if i.on_duplicate_id != "ignore" and not state.finished:
        plan.duplicate_rows = _duplicates_by_chunk(chunks, io.find_duplicate_ids(input_uri, inputs.files, i.id_column))
    return plan


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
    if not io.is_text(type_):
        return  # numbers, dates and booleans print short
    # A UTF-8 byte quotes to at most 3 ("%C3"): shorter values fit, so only the longer are looked at.
    shortest_suspect = (MAX_NAME_BYTES - len(column) - 1) // 3
    too_long = [v for v in io.long_strings(inputs.uri, inputs.files, column, shortest_suspect)
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
